"""``kvsched demo``: the whole data path on loopback, once with kvsched picking and once
with round-robin picking, on the same workload against a fresh simulated pool each time.

simulated vLLM pool (HTTP + metrics + ZMQ KV events)  <-  kvsched serve (ext_proc)
   (a process of its own)
                          ^                                      ^
                          +------------ real Envoy --------------+  <- replay client
                                                                     (a process of its own)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler.core.scheduler import SchedulerConfig
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings
from scheduler.replay.live import replay_live
from scheduler.replay.report import build_report
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig
from scheduler.sim.pool_process import PoolProcess
from scheduler.sim.worker import WorkerDescriptor
from scheduler.workloads.model import RequestOutcome, Workload
from scheduler.workloads.oracle import oracle_hit_ratio

log = logging.getLogger(__name__)

DEMO_POLICIES = ("kvsched", "round_robin")


async def _ready(app: ServeApp, expected: int, timeout_s: float = 20.0) -> None:
    """Wait until every endpoint has been scraped once (the picker sees real load)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [app.scheduler.endpoint_state(e.name, time.monotonic()) for e in app.scheduler.endpoints()]
        if len(states) == expected and all(s.metrics_age_s is not None for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the simulated pool's metrics never reached kvsched")
        await asyncio.sleep(0.05)


@dataclass(frozen=True, slots=True)
class DemoStack:
    pool: PoolProcess
    app: ServeApp
    envoy: EnvoyGateway


class LocalPool(Protocol):
    """A simulated pool on this host: in this process (``SimPool``) or its own (``PoolProcess``)."""

    @property
    def descriptors(self) -> Sequence[WorkerDescriptor]: ...


def local_serve_config(pool: LocalPool, **settings: Any) -> ServeConfig:
    """``kvsched serve`` in front of a simulated pool on this host: ephemeral plaintext ports,
    a 50 ms scrape, every worker's KV events and replay socket, and the pool's own tokenizer
    (so text and chat prompts match its KV blocks); ``settings`` add to or replace these."""
    document: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": 0,
        "tls": {"mode": "plaintext"},
        "scrape_interval_s": 0.05,
        "tokenizer_dir": pool.descriptors[0].tokenizer_dir,
        "endpoints": [
            {"address": d.address, "kv_events": d.kv_endpoint, "kv_replay": d.replay_endpoint}
            for d in pool.descriptors
        ],
    }
    document.update(settings)
    return ServeConfig.model_validate(document)


@contextlib.asynccontextmanager
async def demo_stack(policy: str, *, workers: int, speed: float) -> AsyncIterator[DemoStack]:
    """A fresh simulated pool, ``kvsched serve`` picking by ``policy`` and a real Envoy in front.

    The pool runs in a process of its own (``sim/pool_process.py``): sharing this process's
    event loop, its simulated GPUs stood still while kvsched decided, which counted kvsched's
    CPU into its own TTFT and not into round-robin's."""
    async with PoolProcess(workers, speed=speed) as pool:
        config = local_serve_config(pool, scheduler=SchedulerConfig(policy=policy).model_dump())
        async with ServeApp(config) as app:
            await _ready(app, workers)
            await app.until_ready()
            settings = EnvoySettings("127.0.0.1", app.grpc_port, epp_health_port=app.health_port)
            async with EnvoyGateway(settings) as envoy:
                yield DemoStack(pool, app, envoy)


async def hold_stack(policy: str, *, workers: int, speed: float, stop: asyncio.Event) -> None:
    """Run the demo stack until ``stop``: for benchmark clients of one's own (inference-perf)."""
    async with demo_stack(policy, workers=workers, speed=speed) as stack:
        descriptor = stack.pool.descriptors[0]
        print(
            json.dumps(
                {
                    "gateway": stack.envoy.url,
                    "model": descriptor.model,
                    "tokenizer_dir": descriptor.tokenizer_dir,
                    "policy": policy,
                    "kvsched_metrics": f"http://127.0.0.1:{stack.app.metrics_port}/metrics",
                    "workers": [d.http_url for d in stack.pool.descriptors],
                }
            ),
            flush=True,
        )
        await stop.wait()


def _replay(
    workload: Workload, url: str, model: str, count_tokens: Callable[[str], int] | None
) -> list[RequestOutcome]:
    return asyncio.run(replay_live(workload, url, model=model, count_tokens=count_tokens))


async def replay_apart(
    workload: Workload, url: str, *, model: str, count_tokens: Callable[[str], int] | None = None
) -> list[RequestOutcome]:
    """``replay_live`` in a process of its own, as a load generator is: in this process its
    reading of every streamed token shared one event loop (and the GIL) with ``kvsched serve``,
    and each made the other wait. ``kvsched demo``, two alternating runs each on a 2-core
    machine: kvsched's TTFT p99 100.4 / 99.5 ms with one loop, 95.7 / 97.3 ms apart (p50 22.1
    / 22.4 against 21.7 / 22.4 ms; round-robin's 42-44 and 106-108 ms either way). Spawned,
    not forked: this process runs gRPC's and kvsched's native threads."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as replayer:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(replayer, _replay, workload, url, model, count_tokens)


async def run_policy(
    policy: str,
    workload: Workload,
    *,
    workers: int,
    speed: float,
    count_tokens: Callable[[str], int] | None = None,
) -> dict[str, Any]:
    async with demo_stack(policy, workers=workers, speed=speed) as stack:
        log.info(
            "%s: replaying %d requests through Envoy at %s", policy, len(workload.requests), stack.envoy.url
        )
        outcomes = await replay_apart(
            workload, stack.envoy.url, model=stack.pool.descriptors[0].model, count_tokens=count_tokens
        )
    # Simulated workers run `speed` times faster than the wall clock: report engine time.
    for outcome in outcomes:
        outcome.start_s *= speed
        if outcome.first_token_s is not None:
            outcome.first_token_s *= speed
        if outcome.end_s is not None:
            outcome.end_s *= speed
    return build_report(
        outcomes,
        policy=policy,
        mode="live",
        workers=workers,
        oracle_hit_ratio=oracle_hit_ratio(workload.requests, workload.block_tokens),
        token_scale=workload.token_scale,
        extra={
            "workload": workload.name,
            "speed": speed,
            "path": "client -> Envoy -> kvsched ext_proc -> sim",
        },
    )


async def run_demo(
    workload: Workload,
    *,
    workers: int,
    speed: float,
    count_tokens: Callable[[str], int] | None = None,
) -> dict[str, dict[str, Any]]:
    reports = {}
    for policy in DEMO_POLICIES:
        reports[policy] = await run_policy(
            policy, workload, workers=workers, speed=speed, count_tokens=count_tokens
        )
    return reports
