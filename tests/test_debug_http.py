"""What kvsched believes, asked from outside: /debug/lookup, /debug/kv-ingest and the view gauges.

A real ServeApp in front of simulated vLLM workers (real HTTP, real ZMQ KV events, the
simulated model's tokenizer files, which kvsched finds through the workers' /model_info),
plus a stand-in endpoint that publishes no KV events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_serve_app import StandIn, fetch_metrics, serve_config, until

from scheduler.adapters.kv_receive_thread import native_receiver_available
from scheduler.core.kvingest import NO_KV_EVENTS
from scheduler.server.app import ServeApp
from scheduler.sim.pool import PoolConfig, SimPool

TEXT = "Every engine keeps the blocks of the prompts it served, until it needs the room. " * 6


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimPool, ServeApp]]:
    stand_in = StandIn()
    await stand_in.start()
    try:
        async with SimPool(2, PoolConfig(speed=50.0)) as pool, ServeApp(serve_config(pool, stand_in)) as app:
            await until(
                lambda: app.tokenizers.settled and "pool's tokenizer" in app.tokenizers.tokenizer.description
            )
            yield pool, app
    finally:
        await stand_in.stop()


async def _post(app: ServeApp, path: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{app.metrics_port}{path}", json=body) as response,
    ):
        return response.status, await response.json()


async def _get(app: ServeApp, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.metrics_port}{path}") as response,
    ):
        assert response.status == 200
        return await response.json()


async def _complete(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


def _matched(document: dict[str, Any]) -> dict[str, int]:
    return {endpoint["name"]: endpoint["matched_blocks"] for endpoint in document["endpoints"]}


async def test_lookup_over_http_sees_what_a_worker_cached_and_changes_nothing(
    served: tuple[SimPool, ServeApp],
) -> None:
    pool, app = served
    first, second = pool.descriptors
    answer = await _complete(f"{first.http_url}/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    prompt_tokens = answer["usage"]["prompt_tokens"]
    blocks = prompt_tokens // 16
    messages = [{"role": "user", "content": TEXT}]
    await _complete(f"{second.http_url}/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    index = app.scheduler.index
    await until(
        lambda: index.worker_blocks(first.address) >= blocks and index.worker_blocks(second.address) > 0
    )
    inflight = {e.name: app.scheduler.inflight(e.name) for e in app.scheduler.endpoints()}
    flow, predictor = app.scheduler.flow.stats, app.scheduler.predictor.stats

    status, text = await _post(app, "/debug/lookup", {"model": first.model, "prompt": TEXT})
    assert status == 200
    assert (text["model"], text["prompt_tokens"], text["prompt_blocks"]) == (
        first.model,
        prompt_tokens,
        blocks,
    )
    assert _matched(text) == {first.address: blocks, second.address: 0, "stand-in": 0}
    (rank,) = next(e for e in text["endpoints"] if e["name"] == first.address)["ranks"]
    assert (rank["gpu_blocks"], rank["cpu_blocks"], rank["keys_compared"]) == (blocks, 0, blocks)
    assert next(e for e in text["endpoints"] if e["name"] == "stand-in")["source"] == "routing_history"
    # The same prompt as ids, and the chat rendered through the model's chat template.
    ids = app.tokenizers.tokenizer.text_token_ids(TEXT)  # type: ignore[attr-defined]
    status, by_ids = await _post(app, "/debug/lookup", {"prompt_token_ids": ids})
    assert status == 200 and _matched(by_ids) == _matched(text)
    status, chat = await _post(app, "/debug/lookup", {"model": second.model, "messages": messages})
    assert status == 200 and _matched(chat)[second.address] == chat["prompt_blocks"] > 0
    # Bad bodies are 400 with a reason; nothing was reserved, queued or learned.
    for body, reason in (
        ({"model": "m"}, "exactly one of"),
        ({"prompt": "x", "messages": messages}, "exactly one of"),
        ({"prompt_token_ids": "x"}, "list of token ids"),
        ({"messages": "hello"}, "'messages' must be a list"),
        ({"prompt": [1, -2]}, "non-negative integer token id"),
    ):
        status, error = await _post(app, "/debug/lookup", body)
        assert status == 400 and reason in error["error"], (body, error)
    assert {e.name: app.scheduler.inflight(e.name) for e in app.scheduler.endpoints()} == inflight
    assert app.scheduler.flow.stats == flow and app.scheduler.predictor.stats == predictor


async def test_kv_ingest_state_is_served_and_exported(served: tuple[SimPool, ServeApp]) -> None:
    pool, app = served
    for worker in pool.descriptors:
        await _complete(f"{worker.http_url}/v1/completions", {"prompt": list(range(1, 40)), "max_tokens": 1})
    assert app.ingest is not None
    await until(lambda: all(sub.stats.batches_applied > 0 for sub in app.ingest.subscribers.values()))  # type: ignore[union-attr]
    document = await _get(app, "/debug/kv-ingest")
    assert document["endpoints_by_state"] == {"exact": 2, "degraded": 0, "fallback": 1}
    by_name = {endpoint["name"]: endpoint for endpoint in document["endpoints"]}
    for worker in pool.descriptors:
        entry = by_name[worker.address]
        assert (entry["state"], entry["kv_events"], entry["kv_replay"]) == (
            "exact",
            worker.kv_endpoint,
            worker.replay_endpoint,
        )
        (publisher,) = entry["publishers"]
        assert publisher["view_complete"] is True and publisher["replay_in_flight"] is False
        assert publisher["next_seq"] >= 1 and publisher["buffered"] == 0
        assert 0 <= publisher["last_event_age_s"] < 60 and publisher["counters"]["batches_applied"] >= 1
    stand_in = by_name["stand-in"]
    assert stand_in["state"] == "fallback" and stand_in["publishers"][0]["reason"] == NO_KV_EVENTS
    samples = await fetch_metrics(app.metrics_port or 0)
    complete = {labels["endpoint"]: value for labels, value in samples["kvsched_kv_view_complete"]}
    assert complete == {worker.address: 1.0 for worker in pool.descriptors}
    states = {
        (labels["endpoint"], labels["rank"], labels["state"]): value
        for labels, value in samples["kvsched_kv_view_state"]
    }
    assert states[("stand-in", "0", "fallback")] == 1.0 and states[("stand-in", "0", "exact")] == 0.0
    assert all(states[(worker.address, "0", "exact")] == 1.0 for worker in pool.descriptors)
    ages = {labels["endpoint"]: value for labels, value in samples["kvsched_kv_last_event_age_seconds"]}
    assert set(ages) == {worker.address for worker in pool.descriptors} and max(ages.values()) < 60
    # A worker whose subscription is lost: its view goes to degraded at once, live.
    await app.ingest.remove_endpoint(pool.descriptors[0].address, purge=False)
    document = await _get(app, "/debug/kv-ingest")
    assert document["endpoints_by_state"] == {"exact": 1, "degraded": 1, "fallback": 1}
    status = await _get(app, "/debug/status")
    assert status["kv_events"] == document["endpoints_by_state"]
    # kvsched serve receives the live sockets on the native thread wherever it is built.
    assert status["kv_receive"] == ("native" if native_receiver_available()[0] else "python")
