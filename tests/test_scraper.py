"""The metrics scraper against real HTTP servers on 127.0.0.1, reporting to a real Scheduler.

The servers are minimal aiohttp apps serving a fixed vLLM-format page (a stand-in for a model
server's /metrics whose answers a test can switch: errors, hangs, oversized or chunked pages).
Every test runs twice: with pages fetched on the native scraper thread (the default where it
is built) and on the Python page client (its fallback).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from scheduler.adapters import native_page_client
from scheduler.adapters.scraper import MetricsScraper
from scheduler.codec.prom import MetricsSpec
from scheduler.core.scheduler import Endpoint, EndpointMetrics, HealthConfig, Scheduler, SchedulerConfig


@pytest.fixture(autouse=True, params=["native", "python"])
def page_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        pytest.importorskip("scheduler._native.pagescrape")
    else:
        monkeypatch.setattr(native_page_client, "available", lambda: False)
    return str(request.param)


def vllm_text(waiting: int, running: int, usage: float) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="m",engine="0"}} {waiting}.0\n'
        f'vllm:num_requests_running{{model_name="m",engine="0"}} {running}.0\n'
        f'vllm:kv_cache_usage_perc{{model_name="m",engine="0"}} {usage}\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",engine="0"} 1.0\n'
    )


@dataclass
class StandIn:
    """One /metrics endpoint whose behaviour the test sets."""

    text: str = field(default_factory=lambda: vllm_text(1, 2, 0.5))
    mode: str = "ok"  # ok | error | hang | chunked
    hits: int = 0
    peers: set[int] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(peer[1])
        if self.mode == "error":
            return web.Response(status=503, text="busy")
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            body = self.text.encode()
            for start in range(0, len(body), 64):
                await response.write(body[start : start + 64])
            await response.write_eof()
            return response
        return web.Response(text=self.text, content_type="text/plain")


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[], StandIn]]:
    runners: list[web.AppRunner] = []
    stand_ins: list[StandIn] = []

    async def start() -> StandIn:
        stand_in = StandIn()
        app = web.Application()
        app.router.add_get("/metrics", stand_in.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stand_in.url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
        runners.append(runner)
        stand_ins.append(stand_in)
        return stand_in

    yield start  # type: ignore[misc]
    for stand_in in stand_ins:
        stand_in.release.set()
    for runner in runners:
        await runner.cleanup()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def scheduler_for(*names: str, unhealthy_after: int = 3) -> Scheduler:
    config = SchedulerConfig(health=HealthConfig(unhealthy_after_failures=unhealthy_after))
    scheduler = Scheduler(config)
    scheduler.set_endpoints([Endpoint(name=name, address=name) for name in names], time.monotonic())
    return scheduler


def scraped(scheduler: Scheduler, name: str) -> EndpointMetrics | None:
    state = scheduler.endpoint_state(name, time.monotonic())
    if state.metrics_age_s is None:
        return None
    return EndpointMetrics(state.waiting, state.running, state.kv_usage)


async def test_scrapes_reach_the_scheduler_and_follow_changes(servers: Callable[[], StandIn]) -> None:
    a, b = await servers(), await servers()  # type: ignore[misc]
    scheduler = scheduler_for("a", "b")
    async with MetricsScraper(scheduler, interval_s=0.02) as scraper:
        await scraper.set_targets({"a": a.url, "b": b.url})
        await until(lambda: scraped(scheduler, "a") is not None and scraped(scheduler, "b") is not None)
        assert scraped(scheduler, "a") == EndpointMetrics(1, 2, 0.5)
        a.text = vllm_text(7, 3, 0.25)
        await until(lambda: scraped(scheduler, "a") == EndpointMetrics(7, 3, 0.25))
        assert scraper.stats("a").failures == 0
        assert scraper.stats("a").last_bytes == len(a.text)
        # One keep-alive connection per endpoint, however many scrapes.
        await until(lambda: a.hits >= 5)
        assert len(a.peers) == 1


async def test_failures_make_an_endpoint_unhealthy_and_success_recovers_it(
    servers: Callable[[], StandIn],
) -> None:
    a = await servers()  # type: ignore[misc]
    scheduler = scheduler_for("a", unhealthy_after=3)
    async with MetricsScraper(scheduler, interval_s=0.01) as scraper:
        await scraper.add("a", a.url)
        await until(lambda: scraped(scheduler, "a") is not None)
        assert scheduler.is_healthy("a")
        a.mode = "error"
        await until(lambda: not scheduler.is_healthy("a"))
        stats = scraper.stats("a")
        assert stats.consecutive_failures >= 3
        assert stats.last_error == "HTTP 503"
        a.mode = "ok"
        await until(lambda: scheduler.is_healthy("a"))
        assert scraper.stats("a").consecutive_failures == 0


async def test_missing_metrics_count_as_failures_with_their_names(servers: Callable[[], StandIn]) -> None:
    a = await servers()  # type: ignore[misc]
    a.text = "vllm:num_requests_running 1\n"
    scheduler = scheduler_for("a")
    async with MetricsScraper(scheduler) as scraper:
        await scraper.add("a", a.url)
        assert not await scraper.scrape_once("a")
        error = scraper.stats("a").last_error
        assert "vllm:num_requests_waiting" in error
        assert "vllm:kv_cache_usage_perc" in error


async def test_timeout_is_a_failure(servers: Callable[[], StandIn]) -> None:
    a = await servers()  # type: ignore[misc]
    a.mode = "hang"
    scheduler = scheduler_for("a", unhealthy_after=1)
    async with MetricsScraper(scheduler, interval_s=60, timeout_s=0.2) as scraper:
        await scraper.add("a", a.url)
        assert not await scraper.scrape_once("a")
        assert scraper.stats("a").last_error == "timed out"
        assert not scheduler.is_healthy("a")


async def test_a_timeout_on_an_endpoint_seen_serving_leaves_it_healthy(
    servers: Callable[[], StandIn],
) -> None:
    """The scraper tells the Scheduler that a failure was a timeout: an engine whose KV
    events arrived a moment ago keeps its place while its /metrics answers late."""
    a = await servers()  # type: ignore[misc]
    a.mode = "hang"
    scheduler = scheduler_for("a", unhealthy_after=1)
    scheduler.on_kv_batch("a", time.monotonic())
    async with MetricsScraper(scheduler, interval_s=60, timeout_s=0.2) as scraper:
        await scraper.add("a", a.url)
        assert not await scraper.scrape_once("a")
        assert scraper.stats("a").last_error == "timed out"
        assert scheduler.is_healthy("a") and scheduler.scrape_timeouts_while_serving == 1


async def test_oversized_and_chunked_pages(servers: Callable[[], StandIn]) -> None:
    big, chunked = await servers(), await servers()  # type: ignore[misc]
    big.text = vllm_text(1, 1, 0.1) + "# padding " + "x" * 4096 + "\n"
    chunked.mode = "chunked"
    chunked.text = vllm_text(4, 5, 0.75) + "# padding " + "x" * 4096 + "\n"
    scheduler = scheduler_for("big", "chunked")
    async with MetricsScraper(scheduler, interval_s=60, max_body_bytes=2048) as scraper:
        await scraper.set_targets({"big": big.url, "chunked": chunked.url})
        assert not await scraper.scrape_once("big")
        assert "exceeds 2048" in scraper.stats("big").last_error
        assert not await scraper.scrape_once("chunked")
        assert "exceeds 2048" in scraper.stats("chunked").last_error
        scraper.max_body_bytes = 1 << 20
        assert await scraper.scrape_once("chunked")
        assert scraped(scheduler, "chunked") == EndpointMetrics(4, 5, 0.75)


async def test_unreachable_endpoint_is_a_failure() -> None:
    scheduler = scheduler_for("gone", unhealthy_after=1)
    async with MetricsScraper(scheduler, interval_s=60, timeout_s=1.0) as scraper:
        # Port 9 (discard) on loopback: nothing listens there in a test environment.
        await scraper.add("gone", "http://127.0.0.1:9/metrics")
        assert not await scraper.scrape_once("gone")
        assert "cannot connect to 127.0.0.1:9" in scraper.stats("gone").last_error
        assert not scheduler.is_healthy("gone")


async def test_sglang_spec_reads_sglang_names(servers: Callable[[], StandIn]) -> None:
    a = await servers()  # type: ignore[misc]
    a.text = "sglang:num_queue_reqs 3\nsglang:num_running_reqs 4\nsglang:token_usage 0.5\n"
    scheduler = scheduler_for("a")
    async with MetricsScraper(scheduler, spec=MetricsSpec(engine="sglang")) as scraper:
        await scraper.add("a", a.url)
        assert await scraper.scrape_once("a")
        assert scraped(scheduler, "a") == EndpointMetrics(3, 4, 0.5)


async def test_add_remove_and_stop_end_the_loops(servers: Callable[[], StandIn]) -> None:
    a, b = await servers(), await servers()  # type: ignore[misc]
    scheduler = scheduler_for("a", "b")
    scraper = MetricsScraper(scheduler, interval_s=0.01)
    await scraper.start()
    before = {task for task in asyncio.all_tasks() if task.get_name().startswith("scrape ")}
    await scraper.set_targets({"a": a.url, "b": b.url})
    await until(lambda: a.hits > 0 and b.hits > 0)
    await scraper.set_targets({"b": b.url})
    assert scraper.targets == {"b": b.url}
    hits = a.hits
    await until(lambda: b.hits > hits + 3)
    assert a.hits <= hits + 1  # at most the scrape already in flight at removal
    await scraper.stop()
    running = {task for task in asyncio.all_tasks() if task.get_name().startswith("scrape ")}
    assert running == before == set()
    with pytest.raises(RuntimeError):
        await scraper.add("a", a.url)


async def test_phases_spread_evenly() -> None:
    scheduler = scheduler_for()
    async with MetricsScraper(scheduler, interval_s=60) as scraper:
        for i in range(100):
            await scraper.add(f"e{i}", f"http://127.0.0.1:9/{i}")
        phases = sorted(scraper.phases().values())
        gaps = [b - a for a, b in zip(phases, [*phases[1:], phases[0] + 1.0], strict=True)]
        # Golden-ratio sequence: at most three distinct gaps, all within a small factor of 1/n.
        assert min(gaps) > 0.3 / 100
        assert max(gaps) < 3.0 / 100


# --- the HTTP client's framing, against a raw server ----------------------------------------


@dataclass
class RawServer:
    """Answers the n-th request on a connection with exactly ``responses[n]`` (the last one
    repeated), optionally closing the connection after each answer."""

    responses: list[bytes]
    close_after: bool = False
    connections: int = 0
    requests: int = 0
    url: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                response = self.responses[min(self.requests, len(self.responses) - 1)]
                self.requests += 1
                writer.write(response)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def start(self) -> asyncio.Server:
        listener = await asyncio.start_server(self.serve, self.host, 0)
        self.port = listener.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}/metrics"
        return listener


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes, bool], RawServer]]:
    started: list[asyncio.Server] = []

    async def start(response: bytes, close_after: bool) -> RawServer:
        raw = RawServer([response], close_after)
        started.append(await raw.start())
        return raw

    yield start  # type: ignore[misc]
    for server in started:
        server.close()


PAGE = vllm_text(2, 3, 0.25).encode()


async def test_keep_alive_serves_every_scrape_on_one_connection(raw_server: Callable[..., RawServer]) -> None:
    raw = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE), False)  # type: ignore[misc]
    scheduler = scheduler_for("a")
    async with MetricsScraper(scheduler, interval_s=60) as scraper:
        await scraper.add("a", raw.url)
        for _ in range(5):
            assert await scraper.scrape_once("a")
        assert raw.connections == 1
        assert scraped(scheduler, "a") == EndpointMetrics(2, 3, 0.25)


@pytest.mark.parametrize(
    "head",
    [
        # The server drops the kept-alive connection after each answer without saying so:
        # the next request goes out on a dead connection and is sent again on a new one.
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAGE),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(PAGE),
        b"HTTP/1.0 200 OK\r\n\r\n",  # framed by the connection's end
    ],
    ids=["silent-close", "connection-close", "http-1.0-eof"],
)
async def test_closed_connections_are_reopened_and_lose_no_scrape(
    raw_server: Callable[..., RawServer], head: bytes
) -> None:
    raw = await raw_server(head + PAGE, True)  # type: ignore[misc]
    scheduler = scheduler_for("a")
    async with MetricsScraper(scheduler, interval_s=60) as scraper:
        await scraper.add("a", raw.url)
        for _ in range(4):
            assert await scraper.scrape_once("a"), scraper.stats("a").last_error
        assert raw.connections == 4
        assert scraper.stats("a").failures == 0


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "Content-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    ],
)
async def test_malformed_responses_are_failures_that_say_why(
    raw_server: Callable[..., RawServer], response: bytes, error: str
) -> None:
    raw = await raw_server(response, False)  # type: ignore[misc]
    scheduler = scheduler_for("a")
    async with MetricsScraper(scheduler, interval_s=60) as scraper:
        await scraper.add("a", raw.url)
        assert not await scraper.scrape_once("a")
        assert error in scraper.stats("a").last_error


async def test_a_pool_too_large_for_the_page_budget_is_scraped_less_often(
    servers: Callable[[], StandIn],
) -> None:
    """Four endpoints every 0.02 s would be 200 pages a second; a budget of 50 stretches the
    interval to 4 / 50 = 0.08 s, and it comes back as endpoints go."""
    stand_ins = [await servers() for _ in range(4)]  # type: ignore[misc]
    names = [f"e{i}" for i in range(4)]
    scheduler = scheduler_for(*names)
    async with MetricsScraper(scheduler, interval_s=0.02, max_pages_per_s=50) as scraper:
        await scraper.add("e0", stand_ins[0].url)
        assert scraper.interval_s == 0.02
        for name, stand_in in zip(names[1:], stand_ins[1:], strict=True):
            await scraper.add(name, stand_in.url)
        assert scraper.interval_s == pytest.approx(0.08)
        loop = asyncio.get_running_loop()
        await until(lambda: all(s.scrapes >= 2 for s in scraper.all_stats().values()))
        counted, started = sum(s.scrapes for s in scraper.all_stats().values()), loop.time()
        await until(lambda: sum(s.scrapes for s in scraper.all_stats().values()) >= counted + 12)
        # Twelve more pages took at least three budgeted rounds (0.24 s less a tick's slack),
        # where the unbudgeted interval would have taken 0.06 s.
        assert loop.time() - started >= 0.16
        for name in names[2:]:
            await scraper.remove(name)
        assert scraper.interval_s == 0.04
    with pytest.raises(ValueError, match="budget"):
        MetricsScraper(scheduler, max_pages_per_s=0)


async def test_endpoint_with_nothing_routed_is_scraped_at_the_idle_rate(
    servers: Callable[[], StandIn],
) -> None:
    a = await servers()  # type: ignore[misc]
    busy = {"a": False}
    scheduler = scheduler_for("a")
    scraper = MetricsScraper(scheduler, interval_s=0.01, idle_interval_s=60, activity=lambda name: busy[name])
    async with scraper:
        await scraper.add("a", a.url)
        await until(lambda: scraper.stats("a").skipped_idle >= 10)
        assert a.hits == 1  # the first tick, then nothing for the idle minute
        busy["a"] = True
        await until(lambda: a.hits >= 4)


async def test_an_answer_past_the_timeout_is_a_failure_and_still_counts_when_it_comes(
    servers: Callable[[], StandIn],
) -> None:
    a = await servers()  # type: ignore[misc]
    a.mode = "hang"
    a.text = vllm_text(7, 8, 0.5)
    scheduler = scheduler_for("a", unhealthy_after=1)
    async with MetricsScraper(scheduler, interval_s=60, timeout_s=0.2) as scraper:
        await scraper.add("a", a.url)
        assert not await scraper.scrape_once("a")
        assert scraper.stats("a").last_error == "timed out"
        assert not scheduler.is_healthy("a")
        # The connection was kept: the late page arrives on it and is read.
        a.release.set()
        await until(lambda: scheduler.is_healthy("a"))
        assert scraped(scheduler, "a") == EndpointMetrics(7, 8, 0.5)
        assert len(a.peers) == 1
