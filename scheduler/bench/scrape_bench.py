"""``kvsched bench scrape``: what one replica pays, at rest, to follow N endpoints.

A simulated fleet runs in its own process: N endpoints, each serving a realistic vLLM 0.33
``/metrics`` page (``sim/vllm_metrics.busy_page``: 62 KB, histograms and
``vllm:lora_requests_info`` included; each endpoint's load gauges are its own, two variants
served in turn) over HTTP/1.1, and publishing KV events on its own ZMQ PUB socket in vLLM's
framing. This process is the replica: a real ``Scheduler``, the ``MetricsScraper`` and the
``KVEventIngestService`` exactly as ``kvsched serve`` composes them. Its CPU (every thread:
ZMQ's I/O thread included) is read over a window for each of:

* ``scrape``: the scraper at the interval asked for (default 0.1 s, kvsched's default);
* ``events``: the KV-event subscriptions alone (the scraper stopped);
* ``baseline``: the same scraper with every page on the Python page client
  (``adapters/page_client.py``, the event loop's sockets, the page copied out and scanned by
  ``promlines.pyx``) instead of the native thread, at the same interval, in the same run;
  its figure is CPU per scrape, so the ratio stays per scrape.

The fleet shares the machine, and a busy machine may serve fewer pages than asked: the
table gives scrapes per second achieved beside CPU per scrape, and projects cores at the
full rate as (CPU per scrape) x N / interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from scheduler.adapters.kv_receive_thread import RECEIVE_THREAD_NAME, native_receiver_available
from scheduler.adapters.kv_subscriber import MAX_ZMQ_SOCKETS, KVEventIngestService, SubscriberConfig
from scheduler.adapters.native_page_client import NATIVE_THREAD_NAME
from scheduler.adapters.scraper import DEFAULT_INTERVAL_S, DEFAULT_MAX_PAGES_PER_S, MetricsScraper
from scheduler.codec.kvevents import encode_batch, encode_seq
from scheduler.codec.prom import MetricsSpec
from scheduler.core.events import BlockRemoved, BlockStored, EventBatch
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import Endpoint, Scheduler, SchedulerConfig
from scheduler.sim.vllm_metrics import busy_page

DEFAULT_SIZES = (8, 64, 256, 1000)
# Per endpoint: a pod at moderate load stores the blocks of a few prompts a second; each
# batch here stores 4 blocks of 16 tokens and removes the previous batch's 4.
DEFAULT_EVENTS_PER_S = 5.0
GOAL_CORES = 0.25
DEFAULT_IDLE_INTERVAL_S = 1.0
# What the simulated fleet, one Python process, serves on this 2-core machine beside the
# replica and everyone else's work: 1,300-2,300 pages of 62 KB a second (256 endpoints at
# 0.1 s, load average 8-16). Asked for much more, its answers come later than the 1 s
# timeout and the aborted connections add to its work. Larger fleets are scraped at this
# rate and their cost at the interval asked for projected per scrape.
DEFAULT_FLEET_PAGES_PER_S = 1_500.0
_VARIANTS = 2
_BLOCK_SIZE = 16


# --- the fleet (its own process) ------------------------------------------------------------


class _PageServer(asyncio.Protocol):
    """Answers every request on the connection with the next prebuilt response, in turn."""

    def __init__(self, responses: Sequence[bytes]) -> None:
        self.responses = responses
        self.served = 0
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            self.pending = self.pending[end + 4 :]
            assert self.transport is not None
            self.transport.write(self.responses[self.served % len(self.responses)])
            self.served += 1


_GAUGE = re.compile(
    rb"^(vllm:(?:num_requests_waiting|num_requests_running|kv_cache_usage_perc)\{[^\n]*\}) \S+$", re.M
)


def _endpoint_pages(base: bytes, endpoint: int, rng: random.Random) -> list[bytes]:
    """The base page with this endpoint's own gauge values, as complete HTTP responses."""
    out = []
    for _ in range(_VARIANTS):
        values = {
            b"vllm:num_requests_waiting": f"{rng.randrange(0, 20)}.0".encode(),
            b"vllm:num_requests_running": f"{rng.randrange(0, 64)}.0".encode(),
            b"vllm:kv_cache_usage_perc": f"{rng.random():.6f}".encode(),
        }

        def own(match: re.Match[bytes], values: dict[bytes, bytes] = values) -> bytes:
            return match.group(1) + b" " + values[match.group(1).split(b"{")[0]]

        page = _GAUGE.sub(own, base)
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(page)}\r\n"
        )
        out.append(head.encode() + b"\r\n" + page)
    return out


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _batch(endpoint: int, step: int) -> bytes:
    base = (endpoint << 40) | (step << 3)
    events: list[Any] = [
        BlockStored(
            [base + i for i in range(4)],
            None,
            [(base + j) & 0xFFFF for j in range(4 * _BLOCK_SIZE)],
            _BLOCK_SIZE,
        )
    ]
    if step:
        previous = (endpoint << 40) | ((step - 1) << 3)
        events.append(BlockRemoved([previous + i for i in range(4)]))
    return encode_batch(EventBatch(time.time(), events, 0))


async def _serve_fleet(
    conn: multiprocessing.connection.Connection, endpoints: int, events_per_s: float
) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(endpoints)
    base = busy_page()
    servers = []
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, endpoints + 64)
    pubs: list[zmq.Socket[bytes]] = []
    addresses = []
    for i in range(endpoints):
        pages = _endpoint_pages(base, i, rng)
        server = await loop.create_server(lambda pages=pages: _PageServer(pages), "127.0.0.1", 0)  # type: ignore[misc]
        servers.append(server)
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind("tcp://127.0.0.1:*")
        pubs.append(pub)
        port = server.sockets[0].getsockname()[1]
        addresses.append((f"http://127.0.0.1:{port}/metrics", pub.getsockopt_string(zmq.LAST_ENDPOINT)))
    conn.send(addresses)
    stop = asyncio.Event()
    publishing = asyncio.Event()

    def command() -> None:
        try:
            if not conn.poll():
                return
            message = conn.recv()
        except (EOFError, OSError):  # the replica is gone: so is the fleet (it logged forever)
            loop.remove_reader(conn.fileno())
            stop.set()
            publishing.set()
            return
        if message == "stop":
            stop.set()
        elif message == "events":  # publish only while the subscriptions are measured
            publishing.set()
        else:
            conn.send(time.process_time())

    loop.add_reader(conn.fileno(), command)
    topics = [f"kv@127.0.0.1@e{i}".encode() for i in range(endpoints)]
    steps = [0] * endpoints
    await asyncio.wait(
        {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(publishing.wait())},
        return_when=asyncio.FIRST_COMPLETED,
    )
    period = 1.0 / (events_per_s * endpoints) if events_per_s > 0 else math.inf
    started = loop.time()
    sent = 0
    while not stop.is_set():
        # A fleet that fell behind (a busy machine) skips what it missed instead of sending
        # it in one burst that holds its loop.
        due = int((loop.time() - started) / period)
        sent = max(sent, due - 256)
        while sent < due:
            i = sent % endpoints
            with contextlib.suppress(zmq.Again):
                pubs[i].send_multipart([topics[i], encode_seq(steps[i]), _batch(i, steps[i])], zmq.NOBLOCK)
            steps[i] += 1
            sent += 1
        await asyncio.sleep(0.01)
    for server in servers:
        server.close()
    for pub in pubs:
        pub.close(linger=0)
    context.term()


def _fleet_main(conn: multiprocessing.connection.Connection, endpoints: int, events_per_s: float) -> None:
    _raise_fd_limit()
    asyncio.run(_serve_fleet(conn, endpoints, events_per_s))


# --- the replica (this process) -------------------------------------------------------------


@dataclass(slots=True)
class Window:
    cpu_s: float
    wall_s: float
    count: int  # good scrapes, or KV-event batches applied
    failed: int = 0  # scrapes that failed (a fleet too slow for this machine: timeouts)
    thread_cpu_s: float = 0.0  # of cpu_s, the native scraper thread's

    @property
    def thread_us_each(self) -> float:
        return self.thread_cpu_s / self.count * 1e6 if self.count else float("nan")

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s

    @property
    def cpu_us_each(self) -> float:
        return self.cpu_s / self.count * 1e6 if self.count else float("nan")

    @property
    def per_s(self) -> float:
        return self.count / self.wall_s


def _native_thread_cpu_s(name: str = NATIVE_THREAD_NAME) -> float:
    """CPU of this process's threads named ``name`` (the native scraper's by default), from
    /proc (schedstat: nanoseconds; stat's clock ticks are 10 ms, coarser than a window's
    share); 0 elsewhere."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/self/task/{task}/comm") as comm:
                    if comm.read().strip() != name:
                        continue
                with open(f"/proc/self/task/{task}/schedstat") as schedstat:
                    total += int(schedstat.read().split()[0])
    return total / 1e9


async def _window(count: Any, seconds: float, thread_name: str = NATIVE_THREAD_NAME) -> Window:
    cpu, wall, before = time.process_time(), time.monotonic(), count()
    thread = _native_thread_cpu_s(thread_name)
    await asyncio.sleep(seconds)
    return Window(
        time.process_time() - cpu,
        time.monotonic() - wall,
        count() - before,
        thread_cpu_s=_native_thread_cpu_s(thread_name) - thread,
    )


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _scheduler(names: Sequence[str]) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(index=IndexConfig(max_workers=max(256, len(names)))))
    scheduler.set_endpoints([Endpoint(name=name, address=name) for name in names], time.monotonic())
    return scheduler


async def _measure_scraper(
    urls: dict[str, str], interval: float, window_s: float, *, native: bool | None = None
) -> Window:
    """The scraper as ``kvsched serve`` runs it; ``native=False``: every page on the Python
    page client (the baseline)."""
    scheduler = _scheduler(list(urls))
    async with MetricsScraper(
        scheduler, interval_s=interval, spec=MetricsSpec(engine="vllm"), native=native
    ) as scraper:
        await scraper.set_targets(urls)
        # Warm: every endpoint connected and scraped once.
        await _until(lambda: all(s.scrapes > 1 for s in scraper.all_stats().values()), 30.0)

        def failures() -> int:
            return sum(s.failures for s in scraper.all_stats().values())

        before = failures()
        result = await _window(
            lambda: sum(s.scrapes - s.failures for s in scraper.all_stats().values()), window_s
        )
        result.failed = failures() - before
    return result


async def _measure_events(kv: dict[str, str], window_s: float, *, receive_thread: bool) -> Window:
    """The subscriptions as ``kvsched serve`` makes them; ``receive_thread=False``: every live
    socket received on the event loop with pyzmq (the baseline)."""
    scheduler = _scheduler(list(kv))
    context = zmq.asyncio.Context()
    # A subscription holds three sockets (the SUB, its monitor's PAIR and the PAIR libzmq
    # makes inside for the monitor): the cap kvsched itself sets. With one per endpoint the
    # subscriptions past the cap did not start, and context.term() never returned at 256
    # and 1,000 endpoints.
    context.set(zmq.MAX_SOCKETS, MAX_ZMQ_SOCKETS)
    ingest = KVEventIngestService(scheduler.index, context=context, receive_thread=receive_thread)
    try:
        for name, endpoint in kv.items():
            await ingest.add_endpoint(SubscriberConfig(name=name, endpoint=endpoint))

        def applied() -> int:
            return sum(s.stats.batches_applied for s in ingest.subscribers.values())

        await _until(lambda: applied() > 2 * len(kv), 30.0)
        if receive_thread and ingest.receive_mode != "native":
            raise RuntimeError("the native KV-event receive thread is not available here")
        return await _window(applied, window_s, RECEIVE_THREAD_NAME)
    finally:
        for name in list(kv):
            await ingest.remove_endpoint(name)
        context.term()


def measure_size(
    endpoints: int,
    *,
    interval_s: float,
    idle_interval_s: float,
    events_per_s: float,
    window_s: float,
    fleet_pages_per_s: float,
    baseline: bool,
) -> dict[str, Any]:
    """One fleet of ``endpoints``: the scraper busy and at rest, the subscriptions and the
    baseline scraper, each alone."""
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    fleet = spawn.Process(target=_fleet_main, args=(child, endpoints, events_per_s), daemon=True)
    fleet.start()
    busy_interval = max(interval_s, endpoints / fleet_pages_per_s)
    try:
        if not parent.poll(300):
            raise RuntimeError("the simulated fleet did not start")
        addresses = parent.recv()
        urls = {f"e{i}": url for i, (url, _) in enumerate(addresses)}
        kv = {f"e{i}": endpoint for i, (_, endpoint) in enumerate(addresses)}
        parent.send("cpu")
        fleet_cpu = parent.recv()
        started = time.monotonic()
        busy = asyncio.run(_measure_scraper(urls, busy_interval, window_s))
        rest = asyncio.run(_measure_scraper(urls, idle_interval_s, max(window_s, 2 * idle_interval_s)))
        parent.send("events")
        native_events = native_receiver_available()[0]
        events = (
            asyncio.run(_measure_events(kv, window_s, receive_thread=native_events))
            if events_per_s > 0
            else Window(0.0, 1.0, 0)
        )
        old_events = (
            asyncio.run(_measure_events(kv, window_s, receive_thread=False))
            if events_per_s > 0 and baseline and native_events
            else None
        )
        parent.send("cpu")
        fleet_cores = (parent.recv() - fleet_cpu) / (time.monotonic() - started)
        old = asyncio.run(_measure_scraper(urls, busy_interval, window_s, native=False)) if baseline else None
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        fleet.join(10)
        if fleet.is_alive():
            fleet.kill()
    target_scrapes = endpoints / interval_s
    report: dict[str, Any] = {
        "endpoints": endpoints,
        "busy_interval_s": busy_interval,
        "scrapes_per_s_target": endpoints / busy_interval,
        "scrapes_per_s": busy.per_s,
        "scrapes_failed": busy.failed,
        "scrape_cpu_us": busy.cpu_us_each,
        "scrape_thread_cpu_us": busy.thread_us_each,
        "scrape_cores_at_interval": busy.cpu_us_each * 1e-6 * target_scrapes,
        "rest_scrapes_per_s": rest.per_s,
        "rest_scrape_cpu_us": rest.cpu_us_each,
        "rest_cores": rest.cores,
        "event_batches_per_s": events.per_s,
        "event_receive": "native" if native_events else "python",
        "event_cpu_us": events.cpu_us_each if events.count else 0.0,
        "event_thread_cpu_us": events.thread_us_each if events.count else 0.0,
        "event_cores_at_rate": (events.cpu_us_each if events.count else 0.0)
        * 1e-6
        * events_per_s
        * endpoints,
        "fleet_cores": fleet_cores,
    }
    report["busy_cores"] = report["scrape_cores_at_interval"] + report["event_cores_at_rate"]
    # What kvsched serve spends by default: its page budget stretches the interval of a pool
    # larger than DEFAULT_MAX_PAGES_PER_S x interval_s (``scrape_max_pages_per_s``).
    budgeted_scrapes = min(target_scrapes, DEFAULT_MAX_PAGES_PER_S)
    report["budgeted_interval_s"] = endpoints / budgeted_scrapes
    report["budgeted_cores"] = busy.cpu_us_each * 1e-6 * budgeted_scrapes + report["event_cores_at_rate"]
    if old_events is not None and old_events.count:
        report["baseline_event_cpu_us"] = old_events.cpu_us_each
        report["event_cpu_vs_baseline"] = report["event_cpu_us"] / old_events.cpu_us_each
    if old is not None:
        report["baseline_scrapes_per_s"] = old.per_s
        report["baseline_scrape_cpu_us"] = old.cpu_us_each
        report["scrape_cpu_vs_baseline"] = busy.cpu_us_each / old.cpu_us_each
    return report


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    idle_interval_s: float = DEFAULT_IDLE_INTERVAL_S,
    events_per_s: float = DEFAULT_EVENTS_PER_S,
    window_s: float = 3.0,
    fleet_pages_per_s: float = DEFAULT_FLEET_PAGES_PER_S,
    baseline: bool = True,
) -> dict[str, Any]:
    _raise_fd_limit()
    page = busy_page()
    rows = [
        measure_size(
            n,
            interval_s=interval_s,
            idle_interval_s=idle_interval_s,
            events_per_s=events_per_s,
            window_s=window_s,
            fleet_pages_per_s=fleet_pages_per_s,
            baseline=baseline,
        )
        for n in sizes
    ]
    largest = rows[-1]
    n = largest["endpoints"]
    return {
        "interval_s": interval_s,
        "idle_interval_s": idle_interval_s,
        "events_per_s_per_endpoint": events_per_s,
        "page_bytes": len(page),
        "page_lines": page.count(b"\n"),
        "window_s": window_s,
        "by_endpoints": rows,
        "goal_cores": GOAL_CORES,
        "goals": {
            f"{n} endpoints busy (every {interval_s:g} s) in <= {GOAL_CORES} core": largest["busy_cores"]
            <= GOAL_CORES,
            f"{n} endpoints at rest (every {idle_interval_s:g} s) in <= {GOAL_CORES} core": largest[
                "rest_cores"
            ]
            <= GOAL_CORES,
            f"{n} endpoints busy within the default page budget ({DEFAULT_MAX_PAGES_PER_S:,.0f} pages/s: "
            f"every {largest['budgeted_interval_s']:g} s) in <= {GOAL_CORES} core": largest["budgeted_cores"]
            <= GOAL_CORES,
        },
    }


def format_report(report: dict[str, Any]) -> str:
    interval, idle = report["interval_s"], report["idle_interval_s"]
    lines = [
        f"one replica following N endpoints: a {report['page_bytes'] / 1000:.0f} KB vLLM page "
        f"({report['page_lines']} lines) per scrape, KV events {report['events_per_s_per_endpoint']:g} "
        f"batches/s per endpoint when busy; CPU of the replica process (all threads) over "
        f"{report['window_s']:g} s windows",
        f"{'':>9} {'busy: scrape every ' + format(interval, 'g') + ' s':-^50} "
        f"{'KV events':-^44} {'':>7} {'at rest: every ' + format(idle, 'g') + ' s':-^20}",
        f"{'endpoints':>9} {'scrapes/s':>15} {'us/scrape':>9} {'thread':>6} {'baseline':>8} {'ratio':>6} "
        f"{'batches/s':>10} {'us/batch':>9} {'thread':>6} {'baseline':>8} {'ratio':>6} "
        f"{'cores':>7} {'budgeted':>9} {'us/scrape':>9} {'cores':>8}",
    ]
    for row in report["by_endpoints"]:
        baseline = f"{row['baseline_scrape_cpu_us']:8.0f}" if "baseline_scrape_cpu_us" in row else f"{'':>8}"
        ratio = f"{row['scrape_cpu_vs_baseline']:5.2f}x" if "scrape_cpu_vs_baseline" in row else f"{'':>6}"
        event_baseline = (
            f"{row['baseline_event_cpu_us']:8.1f}" if "baseline_event_cpu_us" in row else f"{'':>8}"
        )
        event_ratio = (
            f"{row['event_cpu_vs_baseline']:5.2f}x" if "event_cpu_vs_baseline" in row else f"{'':>6}"
        )
        achieved = f"{row['scrapes_per_s']:,.0f}/{row['scrapes_per_s_target']:,.0f}"
        lines.append(
            f"{row['endpoints']:>9} {achieved:>15} {row['scrape_cpu_us']:9.1f} "
            f"{row['scrape_thread_cpu_us']:6.1f} {baseline} {ratio} "
            f"{row['event_batches_per_s']:10,.0f} {row['event_cpu_us']:9.1f} "
            f"{row['event_thread_cpu_us']:6.1f} {event_baseline} {event_ratio} {row['busy_cores']:7.3f} "
            f"{row['budgeted_cores']:9.3f} {row['rest_scrape_cpu_us']:9.1f} {row['rest_cores']:8.3f}"
        )
    lines += [
        "scrapes/s: achieved/asked; a fleet larger than the simulated one serves on this machine is "
        "scraped more slowly and its cost projected per scrape",
        f"busy cores: CPU per scrape x endpoints / {interval:g} s + CPU per event batch x batches asked for; "
        f"budgeted: the same within kvsched serve's default page budget ({DEFAULT_MAX_PAGES_PER_S:,.0f} "
        "pages/s, scrape_max_pages_per_s); "
        "ratio: CPU per scrape against the Python page client (baseline) in the same run; "
        "thread: of us/scrape, the native scraper thread's",
        "KV events: us/batch with the live sockets on the native receive thread (thread: its share), "
        "baseline: on the event loop with pyzmq, in the same run against the same fleet",
    ]
    for row in report["by_endpoints"]:
        if row["scrapes_failed"]:
            lines.append(
                f"{row['endpoints']} endpoints: {row['scrapes_failed']} scrapes failed in the busy window"
            )
    for goal, met in report["goals"].items():
        lines.append(f"goal {goal}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)
