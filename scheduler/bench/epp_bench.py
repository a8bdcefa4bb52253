"""EPP benchmark: latency Envoy + kvsched add over going to a worker directly, and picks/s.

Both paths run in the same run against the same simulated workers, interleaved request by
request on one arrival schedule, so load and machine noise hit them alike. The workers run
far faster than real time and generate one token, so a response's latency is almost all
transport and picking; the figure reported is the difference of the two paths'
percentiles. Picks/s is measured separately on the Scheduler alone (the work one EPP
process does per request, without the transport).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import aiohttp
import numpy as np

from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulingRequest
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig
from scheduler.sim.engine import EngineConfig
from scheduler.sim.pool import PoolConfig, SimPool

VOCAB = 32_000


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - started


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


async def measure_added_latency(
    *, rate: float, prompt_tokens: int, requests: int, concurrency: int, workers: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    engine = EngineConfig(max_model_len=max(8192, prompt_tokens + 16), capacity_blocks=27_000)
    async with SimPool(workers, PoolConfig(speed=1000.0, engine=engine)) as pool:
        config = ServeConfig.model_validate(
            {
                "host": "127.0.0.1",
                "grpc_port": 0,
                "health_port": 0,
                "metrics_port": None,
                "tls": {"mode": "plaintext"},
                "endpoints": [
                    {"address": d.address, "kv_events": d.kv_endpoint, "kv_replay": d.replay_endpoint}
                    for d in pool.descriptors
                ],
            }
        )
        async with ServeApp(config) as app:
            settings = EnvoySettings("127.0.0.1", app.grpc_port, epp_health_port=app.health_port)
            async with EnvoyGateway(settings) as envoy:
                model = pool.descriptors[0].model
                bodies = [
                    json.dumps(
                        {
                            "model": model,
                            "prompt": [rng.randrange(1, VOCAB) for _ in range(prompt_tokens)],
                            "max_tokens": 1,
                        }
                    ).encode()
                    for _ in range(min(requests, 64))
                ]
                direct_urls = [f"{d.http_url}/v1/completions" for d in pool.descriptors]
                gateway_url = f"{envoy.url}/v1/completions"
                direct: list[float] = []
                via: list[float] = []
                gate = asyncio.Semaphore(concurrency)
                connector = aiohttp.TCPConnector(limit=concurrency * 2)
                async with aiohttp.ClientSession(connector=connector) as session:
                    # Warm connections and caches on both paths first.
                    for body in bodies[:4]:
                        await _post(session, gateway_url, body)
                        await _post(session, direct_urls[0], body)

                    async def one(i: int, at: float) -> None:
                        delay = at - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)  # the load generator's schedule
                        body = bodies[i % len(bodies)]
                        async with gate:
                            if i % 2:
                                via.append(await _post(session, gateway_url, body))
                            else:
                                direct.append(await _post(session, direct_urls[i % len(direct_urls)], body))

                    start = time.perf_counter() + 0.1
                    arrivals = np.cumsum([rng.expovariate(rate) for _ in range(requests)])
                    wall = time.perf_counter()
                    await asyncio.gather(*(one(i, start + float(t)) for i, t in enumerate(arrivals)))
                    wall = time.perf_counter() - wall
    d, v = _percentiles(direct), _percentiles(via)
    return {
        "rate": rate,
        "prompt_tokens": prompt_tokens,
        "requests": requests,
        "concurrency": concurrency,
        "achieved_rps": requests / wall,
        "direct_ms": d,
        "gateway_ms": v,
        "added_p50_ms": v["p50"] - d["p50"],
        "added_p99_ms": v["p99"] - d["p99"],
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


def run(
    *, rate: float, prompt_tokens: int, requests: int, concurrency: int, workers: int, seed: int
) -> dict[str, Any]:
    report = asyncio.run(
        measure_added_latency(
            rate=rate,
            prompt_tokens=prompt_tokens,
            requests=requests,
            concurrency=concurrency,
            workers=workers,
            seed=seed,
        )
    )
    report["picks"] = measure_picks_per_s(
        endpoints=workers, prompt_tokens=prompt_tokens, picks=500, seed=seed
    )
    report["goals"] = {
        "added_p50_le_1ms": report["added_p50_ms"] <= 1.0,
        "added_p99_le_3ms": report["added_p99_ms"] <= 3.0,
    }
    return report
