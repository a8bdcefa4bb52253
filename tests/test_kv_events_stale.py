"""An endpoint whose KV events stopped: its blocks stop attracting requests, and its view is
reported degraded on /debug/kv-ingest and in kvsched_kv_view_state.

Through the real parts: simulated vLLM workers publishing over ZMQ, kvsched serve's ingest,
its Scheduler and its metrics port. The events stop by closing one
worker's PUB socket while kvsched stays subscribed: a publisher gone silent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_serve_app import StandIn, fetch_metrics, serve_config, until

from scheduler.core.events import BlockStored, EventBatch
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    HealthConfig,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)
from scheduler.server.app import ServeApp
from scheduler.sim.pool import PoolConfig, SimPool

BLOCK = 16
STALE_AFTER_S = 0.5


def test_a_silent_endpoint_stops_attracting_its_prefix_and_recovers_on_the_next_batch() -> None:
    scheduler = Scheduler(
        SchedulerConfig(
            index=IndexConfig(block_size=BLOCK), health=HealthConfig(kv_events_stale_after_s=STALE_AFTER_S)
        )
    )
    names = ["a:8000", "b:8000"]
    scheduler.set_endpoints([Endpoint(n, n, kv_events=f"tcp://{n}") for n in names], now=0.0)
    for name in names:
        scheduler.update_metrics(name, EndpointMetrics(0, 0, 0.1), now=0.0)
    prompt = list(range(1, 8 * BLOCK + 1))
    stored = BlockStored(list(range(100, 108)), None, prompt, BLOCK)
    scheduler.index.apply_batch("a:8000", EventBatch(0.0, [stored]))
    scheduler.on_kv_batch("a:8000", now=0.0)
    # a holds the prefix: it takes the request, prefills a new block, and then publishes nothing.
    assert scheduler.pick(SchedulingRequest("r1", [*prompt, *[7] * BLOCK]), now=1.0).endpoints[0] == "a:8000"
    scheduler.on_first_token("r1", now=1.2)
    scheduler.on_completed("r1", now=1.3)
    assert scheduler.kv_events_stale(1.2 + STALE_AFTER_S) == {}
    assert scheduler.pick(SchedulingRequest("r2", prompt), now=1.4).endpoints[0] == "a:8000"
    scheduler.on_completed("r2", now=1.5)
    later = 1.2 + STALE_AFTER_S + 0.1
    assert set(scheduler.kv_events_stale(later)) == {"a:8000"}
    # Its blocks no longer count: both endpoints look alike, and load decides.
    picks = {scheduler.pick(SchedulingRequest(f"s{i}", prompt), now=later).endpoints[0] for i in range(2)}
    assert picks == set(names)
    # A batch arrives: the endpoint publishes again and its blocks count again.
    scheduler.on_kv_batch("a:8000", now=later + 0.1)
    for i in range(2):
        scheduler.on_completed(f"s{i}", now=later + 0.1)
    assert scheduler.kv_events_stale(later + 0.2) == {}
    assert scheduler.pick(SchedulingRequest("r3", prompt), now=later + 0.2).endpoints[0] == "a:8000"


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimPool, ServeApp]]:
    stand_in = StandIn()
    await stand_in.start()
    try:
        async with SimPool(2, PoolConfig(speed=50.0)) as pool:
            settings = serve_config(pool, stand_in)
            scheduler = settings.scheduler.model_copy(
                update={
                    "health": HealthConfig(unhealthy_after_failures=2, kv_events_stale_after_s=STALE_AFTER_S)
                }
            )
            async with ServeApp(settings.model_copy(update={"scheduler": scheduler})) as app:
                yield pool, app
    finally:
        await stand_in.stop()


async def _kv_ingest(app: ServeApp) -> dict[str, Any]:
    url = f"http://127.0.0.1:{app.metrics_port}/debug/kv-ingest"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def test_stopped_events_are_reported_degraded_and_exported(served: tuple[SimPool, ServeApp]) -> None:
    pool, app = served
    silent = pool.descriptors[0]
    prompt = list(range(1, 6 * BLOCK + 1))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{silent.http_url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}
        ) as response,
    ):
        assert response.status == 200
    assert app.ingest is not None
    await until(lambda: app.scheduler.index.match_tokens(prompt).get(silent.address) is not None)
    # Its publisher goes silent with its socket open (a hung engine): kvsched stays subscribed
    # and hears nothing. (A closed socket is a disconnect, which drops the entries at once.)
    publisher = pool.workers[0].publisher
    assert publisher is not None and publisher.endpoint == silent.kv_endpoint
    publisher.mute()
    # kvsched routes a request there; its prefill ends and no batch follows.
    now = time.monotonic()
    assert (
        app.scheduler.pick(SchedulingRequest("r1", [*prompt, *[9] * BLOCK]), now).endpoints[0]
        == silent.address
    )
    app.scheduler.on_first_token("r1", now)
    await until(lambda: silent.address in app.scheduler.kv_events_stale(time.monotonic()))
    document = await _kv_ingest(app)
    entry = next(e for e in document["endpoints"] if e["name"] == silent.address)
    assert entry["state"] == "degraded"
    assert entry["publishers"][0]["reason"].startswith("KV events stopped")
    samples = await fetch_metrics(app.metrics_port or 0)
    states = {
        (labels["endpoint"], labels["state"]): value for labels, value in samples["kvsched_kv_view_state"]
    }
    assert states[(silent.address, "degraded")] == 1.0 and states[(silent.address, "exact")] == 0.0
    # Its cached prompt no longer counts: the pick sees no block of it there.
    assert app.scheduler.index.match_tokens(prompt)[silent.address].total_blocks == 6
    picked = app.scheduler.pick(SchedulingRequest("r2", prompt), time.monotonic())
    assert picked.explanation["candidates"][silent.address]["matched_blocks"] == 0.0
