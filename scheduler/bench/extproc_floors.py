"""Floors for ``kvsched bench epp``: what the data path costs before kvsched decides anything.

One run measures, one after another against the same kind of pool, workload and client (each
with its own interleaved direct baseline, as epp_bench measures kvsched):

    envoy_only      Envoy alone, round-robin over the workers (a static cluster, no ext_proc)
    floor_python    Envoy + a protocol-only ext_proc in Python (grpc.aio)
    floor_native    Envoy + the same protocol-only ext_proc in C++ (scheduler._native.extproc)
    kvsched_python  Envoy + ``kvsched serve``, Python transport
    kvsched_native  Envoy + ``kvsched serve``, native transport

A protocol-only ext_proc does what the GIE protocol requires and nothing more: it holds the
request headers until the body ends, answers with the destination header, ``envoy.lb``
metadata and Content-Length, streams the body back in 62,000-byte chunks and passes response
headers and chunks through; the workers take turns (round-robin, as Envoy alone). Both floors
send the answers kvsched sends (responses.py; the native twin in kernels/extproc).

Goals (same run, same machine), judged on the native transport:
  - the path kvsched adds in front of the workers is <= 1.1x the native floor's, at p50 and p99;
  - kvsched's CPU per routed request is <= 1.5x the native floor's plus the decision's own cost
    (measure_decision_ms: what kvsched's Python does for one request once the transport has
    read it: PickRunner with flow control, Scheduler.pick, first token, completion, the flow
    gate's poke; timed in this process on the same prompts, token ids as the native transport
    hands them over);
  - at 8k-token prompts and 200 req/s, kvsched's CPU per routed request is <= 0.5 ms.

``python -m scheduler.bench.extproc_floors KIND OPTIONS_JSON`` runs one floor as a child
process (``floor_python`` or ``floor_native``), like epp_bench's children.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import logging
import random
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_health.v1.health import aio as health_aio  # type: ignore[import-untyped]

from scheduler.adapters.extproc import responses
from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner
from scheduler.adapters.extproc.headers import request_hints
from scheduler.adapters.extproc.health import READINESS_SERVICES
from scheduler.adapters.extproc.native import load_native
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.flow_gate import FlowGate
from scheduler.adapters.tokenizer import ByteTokenizer
from scheduler.bench import epp_bench
from scheduler.bench.epp_bench import (
    Gateway,
    _announce,
    _child,
    _serve_config,
    cpu_seconds,
    kvsched_gateway,
    measure_added_latency,
    measure_picks_per_s,
)
from scheduler.codec.openai import InferenceRequestBody
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler
from scheduler.sim.pool_process import until_stdin_closes

GATEWAYS = ("envoy_only", "floor_python", "floor_native", "kvsched_python", "kvsched_native")
# kvsched behind the single ext_proc filter of the GIE layout (response phase on the decision
# stream), each before its two-filter twin so the pair runs back to back.
SINGLE_FILTER_SUFFIX = "_single_filter"
WITH_SINGLE_FILTER = (
    "envoy_only",
    "floor_python",
    "floor_native",
    "kvsched_python" + SINGLE_FILTER_SUFFIX,
    "kvsched_python",
    "kvsched_native" + SINGLE_FILTER_SUFFIX,
    "kvsched_native",
)
MODULE = "scheduler.bench.extproc_floors"
CHUNK_BYTES = ExtProcConfig().max_body_chunk_bytes


# --- the protocol-only ext_procs (child processes) -----------------------------------------------


class ProtocolOnlyServicer(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The GIE protocol with nothing decided: the Python floor."""

    def __init__(self, endpoints: list[str]) -> None:
        self._endpoints = itertools.cycle(endpoints)

    def _pick(self) -> str:
        return next(self._endpoints)

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        chunks: list[bytes] = []
        has_body = False
        decided = False
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                if message.request_headers.end_of_stream:
                    decided = True
                    yield responses.route_headers_response(self._pick(), None)
            elif kind == "request_body":
                has_body = True
                chunks.append(message.request_body.body)
                if message.request_body.end_of_stream:
                    decided = True
                    for answer in self._route(b"".join(chunks), True):
                        yield answer
            elif kind == "request_trailers":
                if not decided:
                    decided = True
                    for answer in self._route(b"".join(chunks), False, has_body):
                        yield answer
                yield responses.request_trailers_continue()
            elif kind == "response_headers":
                yield responses.response_headers_continue()
            elif kind == "response_body":
                body = message.response_body
                yield responses.response_body_passthrough(body.body, body.end_of_stream)
            elif kind == "response_trailers":
                yield responses.response_trailers_continue()

    def _route(self, body: bytes, end_of_stream: bool, has_body: bool = True) -> list[Any]:
        answers = [responses.route_headers_response(self._pick(), len(body) if has_body else None)]
        if has_body:
            answers.extend(responses.request_body_responses(body, CHUNK_BYTES, end_of_stream))
        return answers


async def _serve_python_floor(options: dict[str, Any]) -> None:
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(ProtocolOnlyServicer(options["endpoints"]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    health_server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
    health_port = health_server.add_insecure_port("127.0.0.1:0")
    for service in READINESS_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    await health_server.start()
    _announce({"grpc_port": port, "health_port": health_port})
    await until_stdin_closes()
    await server.stop(0)
    await health_server.stop(0)


async def _serve_native_floor(options: dict[str, Any]) -> None:
    module = load_native()
    if module is None:
        raise RuntimeError("scheduler._native.extproc is not built")
    transport = module.Transport(
        {
            "floor": True,
            "floor_endpoints": options["endpoints"],
            "host": "127.0.0.1",
            "port": 0,
            "health_host": "127.0.0.1",
            "health_port": 0,
            "readiness_services": list(READINESS_SERVICES),
            "max_body_chunk_bytes": CHUNK_BYTES,
        }
    )
    port, health_port = transport.start()
    _announce({"grpc_port": port, "health_port": health_port})
    # Python only waits here; every stream is served on gRPC's threads.
    await until_stdin_closes()
    await asyncio.to_thread(transport.shutdown, 0.0)


_CHILDREN = {"floor_python": _serve_python_floor, "floor_native": _serve_native_floor}


def child_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    kind, options = argv
    asyncio.run(_CHILDREN[kind](json.loads(options)))


def _floor_options(descriptors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"endpoints": [d["address"] for d in descriptors]}


def gateway(name: str) -> Gateway:
    if name == "envoy_only":
        return Gateway(name, None, _floor_options)
    if name in _CHILDREN:
        # The floors answer the response phase on the decision stream, the GIE way: they stay
        # the protocol's cost as a gateway that implements the Inference Extension runs it.
        return Gateway(name, (MODULE, name), _floor_options, observation=False)
    single = name.endswith(SINGLE_FILTER_SUFFIX)
    transport = name.removesuffix(SINGLE_FILTER_SUFFIX).removeprefix("kvsched_")
    base = kvsched_gateway(transport)
    return Gateway(name, base.extproc, base.options, base.reports_stages, observation=not single)


# --- the decision's own cost -------------------------------------------------------------------


async def _decisions(endpoints: int, prompt_tokens: int, decisions: int, seed: int) -> float:
    rng = random.Random(seed)
    scheduler = Scheduler()
    names = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(endpoints)]
    scheduler.set_endpoints([Endpoint(n, n, kv_events="tcp://x:5557") for n in names], now=time.monotonic())
    gate = FlowGate(scheduler.flow, scheduler.saturation, scheduler.saturation_states)
    runner = PickRunner(scheduler, ExtProcConfig(), ByteTokenizer(), time.monotonic, ExtProcStats(), gate)
    prompts = [array.array("Q", [rng.randrange(1, 32_000) for _ in range(prompt_tokens)]) for _ in range(32)]
    body = InferenceRequestBody("completions", model="m", max_tokens=1)
    elapsed = 0.0
    for i in range(decisions):
        # Fresh metrics before each request, untimed: the Scheduler counts what it routed since
        # the last scrape as queued there, and a dozen unscraped dispatches would saturate the
        # pool and hold this loop in flow control.
        for name in names:
            scheduler.update_metrics(name, EndpointMetrics(0, 1, 0.1), now=time.monotonic())
        started = time.perf_counter()
        hints = request_hints({":path": "/v1/completions"})
        decision = await runner.decide_parsed(hints, body, None, prompts[i % len(prompts)])
        now = time.monotonic()
        scheduler.on_first_token(hints.request_id, now)
        scheduler.on_completed(
            hints.request_id, now, served=decision.endpoints[0] if decision.endpoints else None
        )
        gate.poke()
        elapsed += time.perf_counter() - started
    return elapsed * 1000.0 / decisions


def measure_decision_ms(*, endpoints: int, prompt_tokens: int, decisions: int, seed: int) -> float:
    """Milliseconds of kvsched's Python per request beyond the transport (see the docstring)."""
    return asyncio.run(_decisions(endpoints, prompt_tokens, decisions, seed))


def measure_idle_ms_per_s(
    *, workers: int, transport: str, settle_s: float = 3.0, window_s: float = 6.0
) -> float:
    """CPU milliseconds per second ``kvsched serve`` spends with no traffic: scraping every
    endpoint, KV-event subscriptions, health. A fixed cost, whatever the request rate."""
    with contextlib.ExitStack() as children:
        _, descriptors = children.enter_context(
            _child("workers", {"workers": workers, "max_model_len": 8192})
        )
        epp, _ = children.enter_context(_child("kvsched", _serve_config(descriptors, transport)))
        time.sleep(settle_s)
        before = cpu_seconds(epp.process.pid)
        time.sleep(window_s)
        return (cpu_seconds(epp.process.pid) - before) * 1000.0 / window_s


# --- the run ----------------------------------------------------------------------------------


def plan(names: tuple[str, ...] = GATEWAYS) -> tuple[list[str], dict[str, str]]:
    """The gateways this install can run, and why the others are left out."""
    skipped: dict[str, str] = {}
    if load_native() is None:
        for name in ("floor_native", "kvsched_native", "kvsched_native" + SINGLE_FILTER_SUFFIX):
            skipped[name] = "scheduler._native.extproc is not built (no libgrpc++ when kvsched was installed)"
    return [name for name in names if name not in skipped], skipped


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
    names: tuple[str, ...] = GATEWAYS,
    idle_window_s: float = 6.0,
    stream_tokens: int | None = None,
) -> dict[str, Any]:
    """Every gateway of ``names`` measured in turn, then the goals judged against the floors."""
    runnable, skipped = plan(names)
    reports: dict[str, dict[str, Any]] = {}
    for name in runnable:
        try:
            reports[name] = asyncio.run(
                measure_added_latency(
                    rate=rate,
                    prompt_tokens=prompt_tokens,
                    requests=requests,
                    concurrency=concurrency,
                    workers=workers,
                    seed=seed,
                    prompt_bytes=prompt_bytes,
                    envoy_concurrency=envoy_concurrency,
                    gateway=gateway(name),
                    stream_tokens=stream_tokens,
                )
            )
        except RuntimeError as exc:
            # One set-up failing (a request answered other than 200, e.g. Envoy's own failures
            # on an overloaded machine) leaves the others' rows.
            skipped[name] = f"failed: {exc}"
    picks = measure_picks_per_s(endpoints=workers, prompt_tokens=prompt_tokens, picks=500, seed=seed)
    idle = measure_idle_ms_per_s(workers=workers, transport="native") if "kvsched_native" in reports else None
    summary = {
        "rate": rate,
        "prompt_tokens": prompt_tokens if prompt_bytes is None else None,
        "prompt_bytes": prompt_bytes,
        "requests": requests,
        "stream_tokens": stream_tokens,
        "gateways": {name: _row(report) for name, report in reports.items()},
        "reports": reports,
        "skipped": skipped,
        "decision_ms": measure_decision_ms(
            endpoints=workers, prompt_tokens=prompt_tokens, decisions=500, seed=seed
        ),
        # kvsched's CPU per second with no traffic (scrapes, subscriptions, health), same pool.
        "kvsched_idle_ms_per_s": idle,
        # Scheduler.pick + on_completed alone (epp_bench's picks/s), for comparison.
        "pick_ms": 1000.0 / picks["picks_per_s"],
    }
    summary["goals"], summary["goal_conditions"] = judge(summary)
    # kvsched as it runs by default ('auto'), reported the way epp_bench reports it alone.
    chosen = "kvsched_native" if "kvsched_native" in reports else "kvsched_python"
    if chosen in reports:
        kvsched = {**reports[chosen], "picks": picks}
        kvsched["goals"], kvsched["goal_conditions"] = epp_bench.judge(kvsched)
        summary["kvsched"] = kvsched
    return summary


def _row(report: dict[str, Any]) -> dict[str, Any]:
    """One gateway's line: the path it adds, and its ext_proc's CPU per routed request."""
    share = report["requests"] / max(report["routed_requests"], 1)
    cpu = report["cpu_ms_per_request"]
    extproc = [name for name in cpu if name not in ("client", "envoy", "workers")]
    threads = report.get("extproc_thread_cpu_ms_per_request", {})
    # Python's threads carry the interpreter's name; gRPC, the answer thread and ZMQ name theirs.
    python = sum(ms for name, ms in threads.items() if name.startswith("python"))
    return {
        "added_p50_ms": report["added_p50_ms"],
        "added_p99_ms": report["added_p99_ms"],
        "extproc_cpu_ms": cpu[extproc[0]] * share if extproc else None,
        "extproc_python_cpu_ms": python * share if extproc else None,
        "envoy_cpu_ms": cpu["envoy"] * share,
        "achieved_rps": report["achieved_rps"],
        "routed_share": 1.0 / share,
    }


def judge(summary: dict[str, Any]) -> tuple[dict[str, bool], dict[str, str]]:
    goals: dict[str, bool] = {}
    skipped: dict[str, str] = {}
    rows = summary["gateways"]
    floor, kvsched = rows.get("floor_native"), rows.get("kvsched_native")
    if floor is None or kvsched is None:
        skipped["native_transport_goals"] = "needs floor_native and kvsched_native in the run"
        return goals, skipped
    goals["path_p50_le_1.1x_native_floor"] = kvsched["added_p50_ms"] <= 1.1 * floor["added_p50_ms"]
    goals["path_p99_le_1.1x_native_floor"] = kvsched["added_p99_ms"] <= 1.1 * floor["added_p99_ms"]
    budget = 1.5 * floor["extproc_cpu_ms"] + summary["decision_ms"]
    goals["cpu_le_1.5x_native_floor_plus_decision"] = kvsched["extproc_cpu_ms"] <= budget
    tokens = summary["prompt_tokens"]
    if tokens is not None and tokens >= 8192 and summary["rate"] >= 200 and kvsched["achieved_rps"] >= 190:
        goals["cpu_le_0.5ms_at_200rps_8k_tokens"] = kvsched["extproc_cpu_ms"] <= 0.5
    else:
        skipped["cpu_le_0.5ms_at_200rps_8k_tokens"] = "needs >= 8192-token prompts at >= 200 req/s achieved"
    return goals, skipped


LABELS = {
    "envoy_only": "Envoy alone (round-robin)",
    "floor_python": "+ protocol-only ext_proc, Python",
    "floor_native": "+ protocol-only ext_proc, native",
    "kvsched_python": "+ kvsched, Python transport",
    "kvsched_native": "+ kvsched, native transport",
    "kvsched_python" + SINGLE_FILTER_SUFFIX: "+ kvsched, Python, single filter",
    "kvsched_native" + SINGLE_FILTER_SUFFIX: "+ kvsched, native, single filter",
}


def format_floors(summary: dict[str, Any]) -> str:
    prompt = (
        f"{summary['prompt_tokens']}-token prompts"
        if summary["prompt_tokens"] is not None
        else f"{summary['prompt_bytes']:,}-byte chat prompts"
    )
    load = f"{summary['rate']:g} req/s" if summary["rate"] > 0 else "closed loop"
    tokens = summary.get("stream_tokens")
    stream = f", {tokens}-token streamed answers" if tokens else ""
    floor = summary["gateways"].get("floor_native")
    lines = [
        f"floors: {prompt}{stream}, {load}, {summary['requests']} requests per set-up "
        "(half through the gateway)",
        f"{'in front of the workers':36} {'path p50':>9} {'path p99':>9} {'x floor':>8} "
        f"{'ext_proc CPU':>13} {'of it Python':>13} {'Envoy CPU':>10}",
    ]
    for name, row in summary["gateways"].items():
        ratio = (
            f"{row['added_p50_ms'] / floor['added_p50_ms']:.2f}" if floor and name != "envoy_only" else "-"
        )
        cpu = "-" if row["extproc_cpu_ms"] is None else f"{row['extproc_cpu_ms']:.3f}"
        python = "-" if row.get("extproc_python_cpu_ms") is None else f"{row['extproc_python_cpu_ms']:.3f}"
        lines.append(
            f"{LABELS[name]:36} {row['added_p50_ms']:>9.2f} {row['added_p99_ms']:>9.2f} {ratio:>8} "
            f"{cpu:>13} {python:>13} {row['envoy_cpu_ms']:>10.3f}"
        )
    lines.append(
        "(path: ms the set-up adds over a direct request; CPU: ms per request through the gateway; "
        "x floor: p50 path over the native floor's)"
    )
    lines.append(
        f"one decision in this process: {summary['decision_ms']:.3f} ms (flow control, pick, first token, "
        f"completion), of which Scheduler.pick + on_completed {summary['pick_ms']:.3f} ms",
    )
    idle, kvsched = summary.get("kvsched_idle_ms_per_s"), summary["gateways"].get("kvsched_native")
    if idle is not None and kvsched is not None:
        routed_per_s = kvsched["achieved_rps"] * kvsched.get("routed_share", 0.5)
        above = kvsched["extproc_cpu_ms"] - idle / max(routed_per_s, 1e-9)
        lines.append(
            f"kvsched with no traffic: {idle:.1f} ms CPU per second (scrapes, KV-event subscriptions, "
            f"health); at this rate that is {idle / max(routed_per_s, 1e-9):.3f} ms per routed request, "
            f"and the native transport's kvsched spends {above:.3f} ms per routed request above it"
        )
    for name, why in summary["skipped"].items():
        lines.append(f"{name}: not run: {why}")
    for goal, met in summary["goals"].items():
        lines.append(f"goal {goal}: {'met' if met else 'NOT met'}")
    for goal, why in summary["goal_conditions"].items():
        lines.append(f"goal {goal}: not judged: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])
