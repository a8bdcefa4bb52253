"""kvsched serve's tokenizer against a real (simulated) pool: auto mode settles on the pool's
files, the start-up probe through /tokenize catches a mismatch, worker-render mode asks the
workers' render endpoint; all of it visible in Prometheus and on /debug/status."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.extproc.headers import request_hints
from scheduler.adapters.render_tokenizer import PREFIX_MARGIN_TOKENS, WorkerRenderTokenizer
from scheduler.adapters.tokenizer import ByteTokenizer, HFTokenizer
from scheduler.adapters.tokenizer_probe import TokenizerService, probe_endpoint
from scheduler.codec.openai import ChatMessage, InferenceRequestBody
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.tokenizer import MODEL_DIR, load


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    async with SimPool(2, PoolConfig(speed=1000.0)) as started:
        yield started


def config(pool: SimPool, **extra: Any) -> ServeConfig:
    return ServeConfig.model_validate(
        {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "health_port": 0,
            "metrics_port": 0,
            "tls": {"mode": "plaintext"},
            "scrape_interval_s": 0.05,
            "endpoints": [{"address": d.address, "kv_events": d.kv_endpoint} for d in pool.descriptors],
            **extra,
        }
    )


async def fetch(app: ServeApp, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.metrics_port}{path}") as response,
    ):
        return response.status, await response.text()


def mismatch_gauge(page: str) -> dict[str, float]:
    family = next(
        f for f in text_string_to_metric_families(page) if f.name == "kvsched_tokenization_mismatch"
    )
    return {sample.labels["check"]: sample.value for sample in family.samples}


async def test_auto_mode_settles_on_the_pools_own_tokenizer_and_the_probe_agrees(pool: SimPool) -> None:
    async with ServeApp(config(pool)) as app:
        await until(lambda: app.tokenizers.probe.status not in ("pending",))
        status = app.status()["tokenizer"]
        assert status["mode"] == "auto" and status["settled"]
        assert str(MODEL_DIR) in status["in_use"]
        assert status["probe"]["status"] == "match"
        code, page = await fetch(app, "/metrics")
        assert code == 200 and mismatch_gauge(page) == {"served_hits": 0.0, "probe": 0.0}
        code, text = await fetch(app, "/debug/status")
        assert code == 200 and '"status": "match"' in text


async def test_probe_names_a_mismatched_tokenizer(pool: SimPool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scheduler.adapters.tokenizer_probe"):
        async with ServeApp(config(pool, tokenizer_mode="bytes")) as app:
            await until(lambda: app.tokenizers.probe.status != "pending")
            probe = app.tokenizers.probe
            assert probe.status == "mismatch"
            assert "byte stand-in" in probe.detail and "tokenizer_dir" in probe.detail
            _, page = await fetch(app, "/metrics")
            assert mismatch_gauge(page)["probe"] == 1.0
    assert len([r for r in caplog.records if "tokenizer probe" in r.getMessage()]) == 1


async def test_probe_without_tokenize_endpoint_is_unknown() -> None:
    app = web.Application()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            result = await probe_endpoint(session, address, ByteTokenizer(), "byte stand-in")
        assert result.status == "unknown" and "404" in result.detail
    finally:
        await runner.cleanup()


async def test_probe_matches_with_the_shipped_files(pool: SimPool) -> None:
    async with aiohttp.ClientSession() as session:
        result = await probe_endpoint(
            session, pool.descriptors[0].address, HFTokenizer.from_dir(MODEL_DIR), "x"
        )
    assert result.status == "match"


async def test_worker_render_mode_routes_text_and_chat_with_the_workers_ids(pool: SimPool) -> None:
    async with ServeApp(config(pool, tokenizer_mode="worker_render")) as app:
        runner = app.server.runner
        render = app.tokenizers.tokenizer.current
        assert isinstance(render, WorkerRenderTokenizer)
        text = "render mode " * 40
        body = f'{{"model": "{pool.descriptors[0].model}", "prompt": "{text}"}}'.encode()
        hints = request_hints({":path": "/v1/completions"})
        decision = await runner.decide_body(hints, body, None)
        assert decision.routed and decision.request is not None
        assert list(decision.request.token_ids) == load().encode(text)
        again = await runner.decide_body(request_hints({":path": "/v1/completions"}), body, None)
        assert again.request is not None and list(again.request.token_ids) == load().encode(text)
        assert render.stats.calls == 1 and render.stats.cache_hits == 1
        messages = [{"role": "user", "content": "hello there"}]
        chat = await runner.decide_body(
            request_hints({":path": "/v1/chat/completions"}),
            json.dumps({"messages": messages}).encode(),
            None,
        )
        assert chat.request is not None and list(chat.request.token_ids) == load().chat_ids(messages)
        assert app.status()["tokenizer"]["render"]["calls"] == 2
        assert app.tokenizers.probe.status in ("skipped", "pending")


@pytest.mark.parametrize("kv_events", [True, False])
async def test_auto_mode_falls_back_to_the_render_endpoint_only_with_kv_events(kv_events: bool) -> None:
    # A worker that names no tokenizer files but renders (as vLLM does).
    async def render(_: web.Request) -> web.Response:
        return web.json_response([{"token_ids": [1, 2, 3]}])

    app = web.Application()
    app.router.add_post("/v1/completions/render", render)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        service = TokenizerService(
            "auto", None, "", lambda: [address], probe=False, render_when_auto=kv_events
        )
        await service.on_endpoints()
        chosen = service.tokenizer.current
        assert isinstance(chosen, WorkerRenderTokenizer) if kv_events else isinstance(chosen, ByteTokenizer)
        await service.close()
    finally:
        await runner.cleanup()


async def test_worker_render_reuses_a_cached_prefix_and_renders_the_rest_in_the_background(
    pool: SimPool,
) -> None:
    address = pool.descriptors[0].address
    render = WorkerRenderTokenizer(lambda: [address])
    try:
        turn = (ChatMessage("user", "Tell me about " + " ".join(f"item{i}" for i in range(30))),)
        first = await render.render_token_ids(InferenceRequestBody("chat", messages=turn))
        assert first == load().chat_ids([{"role": "user", "content": turn[0].content}])
        follow = (*turn, ChatMessage("assistant", "the model answers"), ChatMessage("user", "And then?"))
        routed = await render.render_token_ids(InferenceRequestBody("chat", messages=follow))
        # Routed at once on the first turn's ids (less the margin), no round trip on the path.
        assert routed == first[:-PREFIX_MARGIN_TOKENS] and render.stats.prefix_hits == 1
        full = load().chat_ids([{"role": m.role, "content": m.content} for m in follow])
        assert full[: len(routed)] == routed
        await until(lambda: render.stats.calls == 2)
        again = await render.render_token_ids(InferenceRequestBody("chat", messages=follow))
        assert again == full and render.prefix_reuse
        text = "Shared instructions: " + " ".join(f"rule{i}" for i in range(40))
        await render.render_token_ids(InferenceRequestBody("completions", prompt_text=text))
        longer = await render.render_token_ids(
            InferenceRequestBody("completions", prompt_text=text + " Question?")
        )
        assert longer == load().encode(text)[:-PREFIX_MARGIN_TOKENS] and render.stats.prefix_hits == 2
    finally:
        await render.close()


async def test_prefix_reuse_switches_off_when_ids_are_not_a_prefix(caplog: pytest.LogCaptureFixture) -> None:
    # A template that renders earlier turns differently once more follow.
    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        count = len(body["messages"])
        return web.json_response({"token_ids": [count] * (10 * count)})

    app = web.Application()
    app.router.add_post("/v1/chat/completions/render", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = f"127.0.0.1:{runner.addresses[0][1]}"
    render = WorkerRenderTokenizer(lambda: [address])
    try:
        one = (ChatMessage("user", "a"),)
        await render.render_token_ids(InferenceRequestBody("chat", messages=one))
        with caplog.at_level(logging.WARNING, logger="scheduler.adapters.render_tokenizer"):
            await render.render_token_ids(
                InferenceRequestBody("chat", messages=(*one, ChatMessage("user", "b")))
            )
            await until(lambda: not render.prefix_reuse)
        assert any("not a prefix" in r.getMessage() for r in caplog.records)
        three = (*one, ChatMessage("user", "b"), ChatMessage("user", "c"))
        assert await render.render_token_ids(InferenceRequestBody("chat", messages=three)) == [3] * 30
    finally:
        await render.close()
        await runner.cleanup()
