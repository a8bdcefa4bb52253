"""EPP benchmark: latency Envoy + kvsched add over going to a worker directly, and picks/s.

Topology, as deployed: kvsched runs in its own process, the simulated workers in another,
Envoy in its own, and the load generator in the calling process. (With all of them on one
event loop, every ext_proc message would queue behind the client's and the workers' work and
the figure would measure that loop, not the gateway.) Both paths run in the same run against
the same workers, interleaved request by request on one arrival schedule and through one
client session, so load, machine noise and the client's own cost hit them alike. A direct
request for a prompt goes to the worker the gateway last chose for that prompt, so both paths
see the same prefix-cache state. The workers run far faster than real time and generate one
token, so a response's latency is almost all transport and picking; the figure reported is the
difference of the two paths' percentiles. CPU seconds per request of every process show where
the machine's time goes. Picks/s is measured separately on the Scheduler alone (the work one
EPP process does per request, without the transport).

Goals (issue: Endpoint Picker benchmark): added p50 <= 1 ms and p99 <= 3 ms at 200 req/s with
8k-token prompts; 220 KB prompts at 150 concurrent add <= 20 ms at p99. A run is judged only
against the goals whose conditions it meets (``goals``); ``goal_conditions`` says why a goal
was not judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulingRequest
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings

VOCAB = 32_000
SPEED = 1000.0
WORKER_HEADER = "x-kvsched-sim-worker"
# A large-prompt run of the size: 220 KB chat prompts, 150 requests in flight.
LARGE_PROMPT_BYTES = 220_000
LARGE_CONCURRENCY = 150
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- child processes --------------------------------------------------------------------------


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    # stdin becomes readable (at EOF) when the parent closes it, or exits.
    loop.add_reader(sys.stdin.fileno(), closed.set)
    try:
        await closed.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())


def _announce(message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _serve_pool(options: dict[str, Any]) -> None:
    from scheduler.sim.engine import EngineConfig
    from scheduler.sim.pool import PoolConfig, SimPool

    engine = EngineConfig(max_model_len=options["max_model_len"], capacity_blocks=27_000)
    async with SimPool(options["workers"], PoolConfig(speed=SPEED, engine=engine)) as pool:
        _announce([d.as_dict() for d in pool.descriptors])
        await _until_stdin_closes()


async def _serve_kvsched(options: dict[str, Any]) -> None:
    from scheduler.server.app import ServeApp
    from scheduler.server.config import ServeConfig

    async with ServeApp(ServeConfig.model_validate(options)) as app:
        _announce({"grpc_port": app.grpc_port, "health_port": app.health_port})
        await _until_stdin_closes()


_CHILDREN = {"workers": _serve_pool, "kvsched": _serve_kvsched}


def child_main(argv: list[str]) -> None:
    """``python -m scheduler.bench.epp_bench KIND OPTIONS_JSON``: one helper process of the bench."""
    # Children report through stdout; their INFO lines would interleave with the table.
    logging.basicConfig(level=logging.WARNING)
    kind, options = argv
    asyncio.run(_CHILDREN[kind](json.loads(options)))


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def _child(
    name: str, options: dict[str, Any], module: str = "scheduler.bench.epp_bench"
) -> Iterator[tuple[_Child, Any]]:
    """A helper process; yields it with the first line it prints (its addresses)."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, name, json.dumps(options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60.0)
        line = process.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"bench {name} process did not start (exit code {process.poll()})")
        yield _Child(name, process), json.loads(line)
    finally:
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads together (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # Fields 14 and 15 of proc(5) (utime, stime); the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time of a process's live threads, summed by thread name (Python's threads keep the
    process's name; gRPC C++ and ZMQ name theirs)."""
    by_name: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as comm:
                name = comm.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return by_name


# --- workload ---------------------------------------------------------------------------------


def request_bodies(
    model: str, rng: random.Random, count: int, *, prompt_tokens: int, prompt_bytes: int | None
) -> tuple[str, list[bytes]]:
    """``count`` distinct request bodies and their path: token-id completions, or chat text."""
    if prompt_bytes is None:
        bodies = [
            json.dumps(
                {
                    "model": model,
                    "prompt": [rng.randrange(1, VOCAB) for _ in range(prompt_tokens)],
                    "max_tokens": 1,
                }
            ).encode()
            for _ in range(count)
        ]
        return "/v1/completions", bodies
    words = ("cache", "prefix", "route", "token", "block", "worker", "gateway", "prompt")
    bodies = []
    for i in range(count):
        # Distinct from the first word on, so no two prompts share a prefix.
        parts = [f"document-{i}-{rng.randrange(1 << 30)}"]
        size = len(parts[0])
        while size < prompt_bytes:
            word = rng.choice(words)
            parts.append(word)
            size += len(word) + 1
        content = " ".join(parts)[:prompt_bytes]
        document = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
        bodies.append(json.dumps(document).encode())
    return "/v1/chat/completions", bodies


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, str | None]:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        await response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
        return elapsed, response.headers.get(WORKER_HEADER)


def _serve_config(descriptors: list[dict[str, Any]], transport: str = "auto") -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": None,
        "tls": {"mode": "plaintext"},
        "extproc": {"transport": transport},
        "endpoints": [
            {"address": d["address"], "kv_events": d["kv_endpoint"], "kv_replay": d["replay_endpoint"]}
            for d in descriptors
        ],
    }


async def _drive(
    *,
    gateway_url: str,
    workers: dict[str, str],
    bodies: list[bytes],
    rate: float,
    requests: int,
    concurrency: int,
    rng: random.Random,
    on_start: Callable[[], None],
) -> tuple[list[float], list[float], float]:
    """Send ``requests`` requests, odd ones through the gateway, even ones straight to a worker.

    ``rate`` > 0: Poisson arrivals at that rate, at most ``concurrency`` in flight; 0: a closed
    loop of ``concurrency`` clients, each sending its next request when the last one ends.
    """
    names = sorted(workers)
    # The worker the gateway last routed each prompt to; direct requests follow it.
    affinity: dict[int, str] = {}
    direct: list[float] = []
    via: list[float] = []

    async def send(session: aiohttp.ClientSession, i: int) -> None:
        slot = i % len(bodies)
        body = bodies[slot]
        if i % 2:
            elapsed, served = await _post(session, gateway_url, body)
            via.append(elapsed)
            if served is not None:
                affinity[slot] = served
        else:
            name = affinity.get(slot, names[(i // 2) % len(names)])
            direct.append((await _post(session, workers[name], body))[0])

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm connections, caches and affinity on both paths first.
        for slot in range(min(len(bodies), 8)):
            await send(session, 2 * slot + 1)
            await send(session, 2 * slot)
        direct.clear()
        via.clear()
        on_start()
        wall = time.perf_counter()
        if rate > 0:
            gate = asyncio.Semaphore(concurrency)
            start = time.perf_counter() + 0.1
            arrivals = np.cumsum([rng.expovariate(rate) for _ in range(requests)])

            async def scheduled(i: int, at: float) -> None:
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with gate:
                    await send(session, i)

            await asyncio.gather(*(scheduled(i, start + float(t)) for i, t in enumerate(arrivals)))
        else:
            counter = iter(range(requests))

            async def client() -> None:
                for i in counter:
                    await send(session, i)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - wall
    return direct, via, wall


@dataclass(frozen=True)
class Gateway:
    """What stands in front of the workers: Envoy, and the ext_proc process it asks, if any."""

    name: str
    # (module, kind) of the ext_proc child process; None: Envoy round-robins over the workers.
    extproc: tuple[str, str] | None
    # The child's options, from the pool's descriptors.
    options: Callable[[list[dict[str, Any]]], dict[str, Any]]


def kvsched_gateway(transport: str = "auto") -> Gateway:
    return Gateway("kvsched", ("scheduler.bench.epp_bench", "kvsched"), lambda d: _serve_config(d, transport))


async def measure_added_latency(
    *,
    rate: float,
    prompt_tokens: int,
    requests: int,
    concurrency: int,
    workers: int,
    seed: int,
    prompt_bytes: int | None = None,
    envoy_concurrency: int | None = None,
    gateway: Gateway | None = None,
) -> dict[str, Any]:
    gateway = gateway or kvsched_gateway()
    rng = random.Random(seed)
    # The sim's word tokenizer makes about one token per 6 bytes of text.
    prompt_len = prompt_tokens if prompt_bytes is None else prompt_bytes // 4
    max_model_len = max(8192, prompt_len + 16)
    pool_options = {"workers": workers, "max_model_len": max_model_len}
    with contextlib.ExitStack() as children:
        pool, descriptors = children.enter_context(_child("workers", pool_options))
        epp: _Child | None = None
        ports: dict[str, Any] = {"grpc_port": 0, "health_port": None}
        if gateway.extproc is not None:
            module, kind = gateway.extproc
            epp, ports = children.enter_context(_child(kind, gateway.options(descriptors), module))
        settings = EnvoySettings(
            "127.0.0.1",
            ports["grpc_port"],
            epp_health_port=ports["health_port"],
            concurrency=envoy_concurrency,
            ext_proc=epp is not None,
            pool=[d["address"] for d in descriptors] if epp is None else (),
        )
        async with EnvoyGateway(settings) as envoy:
            path, bodies = request_bodies(
                descriptors[0]["model"],
                rng,
                min(requests, 64),
                prompt_tokens=prompt_tokens,
                prompt_bytes=prompt_bytes,
            )
            urls = {d["name"]: f"{d['http_url']}{path}" for d in descriptors}
            pids = {"client": os.getpid(), "envoy": envoy.pid, "workers": pool.process.pid}
            if epp is not None:
                pids[gateway.name] = epp.process.pid
            cpu_before: dict[str, float] = {}
            threads_before: dict[str, float] = {}

            def on_start() -> None:
                cpu_before.update({name: cpu_seconds(pid) for name, pid in pids.items() if pid})
                if epp is not None:
                    threads_before.update(thread_cpu_seconds(epp.process.pid))

            direct, via, wall = await _drive(
                gateway_url=f"{envoy.url}{path}",
                workers=urls,
                bodies=bodies,
                rate=rate,
                requests=requests,
                concurrency=concurrency,
                rng=rng,
                on_start=on_start,
            )
            cpu = {
                name: (cpu_seconds(pid) - cpu_before[name]) * 1000.0 / requests
                for name, pid in pids.items()
                if pid and name in cpu_before
            }
            # The ext_proc process's CPU by thread: its protocol threads apart from Python's.
            threads = {
                name: (seconds - threads_before.get(name, 0.0)) * 1000.0 / requests
                for name, seconds in (thread_cpu_seconds(epp.process.pid) if epp else {}).items()
            }
    d, v = _percentiles(direct), _percentiles(via)
    return {
        "rate": rate,
        "prompt_tokens": prompt_tokens if prompt_bytes is None else None,
        "prompt_bytes": len(bodies[0]) if prompt_bytes is not None else None,
        "body_bytes": len(bodies[0]),
        "requests": requests,
        "concurrency": concurrency,
        "achieved_rps": requests / wall,
        "direct_ms": d,
        "gateway_ms": v,
        "added_p50_ms": v["p50"] - d["p50"],
        "added_p99_ms": v["p99"] - d["p99"],
        # CPU milliseconds per request (both paths averaged) of each process: where time goes.
        "cpu_ms_per_request": cpu,
        "cores": os.cpu_count(),
        "gateway": gateway.name,
        "routed_requests": len(via),
        "extproc_thread_cpu_ms_per_request": threads,
    }


def measure_picks_per_s(*, endpoints: int, prompt_tokens: int, picks: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    scheduler = Scheduler()
    names = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(endpoints)]
    scheduler.set_endpoints([Endpoint(n, n, kv_events="tcp://x:5557") for n in names], now=0.0)
    for n in names:
        scheduler.update_metrics(
            n, EndpointMetrics(rng.randrange(4), rng.randrange(8), rng.random()), now=0.0
        )
    prompts = [[rng.randrange(1, VOCAB) for _ in range(prompt_tokens)] for _ in range(32)]
    started = time.perf_counter()
    for i in range(picks):
        scheduler.pick(SchedulingRequest(f"b{i}", prompts[i % len(prompts)]), now=1.0)
        scheduler.on_completed(f"b{i}", now=1.0)
    elapsed = time.perf_counter() - started
    return {"endpoints": endpoints, "prompt_tokens": prompt_tokens, "picks_per_s": picks / elapsed}


def judge(report: dict[str, Any]) -> tuple[dict[str, bool], dict[str, str]]:
    """The goals this run's conditions allow judging, and for the others why not."""
    goals: dict[str, bool] = {}
    skipped: dict[str, str] = {}
    load_ok = report["rate"] >= 200.0 and report["achieved_rps"] >= 190.0
    tokens = report["prompt_tokens"]
    if tokens is not None and tokens >= 8192 and load_ok:
        goals["added_p50_le_1ms_at_200rps_8k_tokens"] = report["added_p50_ms"] <= 1.0
        goals["added_p99_le_3ms_at_200rps_8k_tokens"] = report["added_p99_ms"] <= 3.0
    else:
        skipped["added_p50_le_1ms/p99_le_3ms"] = (
            "needs >= 8192-token prompts at >= 200 req/s achieved "
            f"(ran {tokens or 'text'} tokens, {report['achieved_rps']:.0f} req/s)"
        )
    size = report["prompt_bytes"]
    if size is not None and size >= LARGE_PROMPT_BYTES and report["concurrency"] >= LARGE_CONCURRENCY:
        goals["added_p99_le_20ms_at_220kb_150_concurrent"] = report["added_p99_ms"] <= 20.0
    else:
        skipped["added_p99_le_20ms_at_220kb"] = (
            f"needs >= {LARGE_PROMPT_BYTES:,}-byte prompts at >= {LARGE_CONCURRENCY} concurrent "
            "(--prompt-bytes 220000 --concurrency 150)"
        )
    return goals, skipped


def run(
    *,
    rate: float,
    prompt_tokens: int,
    requests: int,
    concurrency: int,
    workers: int,
    seed: int,
    prompt_bytes: int | None = None,
    envoy_concurrency: int | None = None,
    transport: str = "auto",
) -> dict[str, Any]:
    report = asyncio.run(
        measure_added_latency(
            rate=rate,
            prompt_tokens=prompt_tokens,
            requests=requests,
            concurrency=concurrency,
            workers=workers,
            seed=seed,
            prompt_bytes=prompt_bytes,
            envoy_concurrency=envoy_concurrency,
            gateway=kvsched_gateway(transport),
        )
    )
    report["picks"] = measure_picks_per_s(
        endpoints=workers, prompt_tokens=prompt_tokens, picks=500, seed=seed
    )
    report["goals"], report["goal_conditions"] = judge(report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table ``kvsched bench epp`` prints."""
    d, v = report["direct_ms"], report["gateway_ms"]
    prompt = (
        f"{report['prompt_tokens']}-token prompts"
        if report["prompt_tokens"] is not None
        else f"{report['prompt_bytes']:,}-byte chat prompts"
    )
    load = f"{report['rate']:g} req/s" if report["rate"] > 0 else "closed loop"
    lines = [
        f"{prompt}, {load}, concurrency {report['concurrency']}, {report['requests']} requests",
        f"{'':24} {'direct':>10} {'via Envoy+kvsched':>18} {'added':>8}",
    ]
    for key in ("p50", "p90", "p99"):
        lines.append(
            f"{'latency ' + key + ' (ms)':24} {d[key]:>10.2f} {v[key]:>18.2f} {v[key] - d[key]:>8.2f}"
        )
    lines.append(
        f"achieved {report['achieved_rps']:.0f} req/s; "
        f"picks/s per process: {report['picks']['picks_per_s']:,.0f}"
    )
    cpu = report.get("cpu_ms_per_request", {})
    if cpu:
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
        lines.append(f"CPU ms per request ({report['cores']} cores): {parts}")
    for goal, met in report["goals"].items():
        lines.append(f"goal {goal}: {'met' if met else 'NOT met'}")
    for goal, why in report.get("goal_conditions", {}).items():
        lines.append(f"goal {goal}: not judged: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])
