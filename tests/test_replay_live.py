"""Live replay over real HTTP on 127.0.0.1.

Two servers: the simulated vLLM workers (``scheduler.sim.pool``), for the real thing end
to end, and ``StandIn``, a small OpenAI-compatible aiohttp server written here that can
misbehave on purpose (no usage, a plain JSON body, HTTP errors, errors and garbage inside
the stream) and counts the requests it has in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from scheduler.replay.live import prompt_text, replay_live
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.workloads.model import RequestOutcome, Workload, WorkloadRequest

STAND_IN_MODEL = "stand-in-model"


class StandIn:
    """OpenAI-compatible completions whose behaviour the request id picks (its prefix)."""

    def __init__(self, *, hold_until_in_flight: int | None = None) -> None:
        self.bodies: dict[str, dict[str, Any]] = {}
        self.paths: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._hold_until = hold_until_in_flight
        self._release = asyncio.Event()
        self.url = ""

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return runner

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": STAND_IN_MODEL, "object": "model"}]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._hold_until is not None:
                # Nobody is answered until the client has the full cap in flight at once.
                if self.in_flight >= self._hold_until:
                    self._release.set()
                await self._release.wait()
            body = await request.json()
            request_id = request.headers["x-request-id"]
            self.bodies[request_id] = body
            self.paths[request_id] = request.path
            return await self._respond(request, request_id.split("-")[0], body)
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request, kind: str, body: dict[str, Any]) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        prompt = len(body["messages"][0]["content"].split()) if chat else len(body["prompt"])
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": body["max_tokens"],
            "total_tokens": prompt + body["max_tokens"],
            "prompt_tokens_details": {"cached_tokens": prompt // 2},
        }
        if kind == "http500":
            return web.json_response({"error": {"message": "engine overloaded"}}, status=500)
        if kind == "plain":
            choice = {"index": 0, "text": "x " * body["max_tokens"], "finish_reason": "length"}
            return web.json_response({"choices": [choice], "usage": usage})
        headers = {"Content-Type": "text/event-stream"}
        if kind == "nousage":
            headers["x-gateway-destination-endpoint-served"] = "10.0.0.7:8000"
        else:
            headers["x-kvsched-sim-worker"] = "stand-in"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)

        async def send(payload: bytes) -> None:
            # Split every event in two writes: the client must reassemble lines.
            middle = len(payload) // 2
            await response.write(payload[:middle])
            await response.write(payload[middle:])

        if chat:
            await send(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        for i in range(0 if kind == "empty" else body["max_tokens"]):
            if kind == "garbled" and i == 1:
                await send(b"data: {not json\n\n")
            if kind == "midstream" and i == 1:
                await send(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
                break
            entry = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
            await send(
                b": keep-alive comment\n\ndata: " + json.dumps({"choices": [entry]}).encode() + b"\n\n"
            )
        if kind not in ("nousage", "empty") and body.get("stream_options", {}).get("include_usage"):
            await send(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await send(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    server = StandIn()
    runner = await server.start()
    yield server
    await runner.cleanup()


def _workload(*ids: str, tokens: int = 8, max_tokens: int = 4) -> Workload:
    return Workload("t", [WorkloadRequest(r, 0.0, list(range(1, tokens + 1)), max_tokens) for r in ids])


def _by_id(outcomes: list[RequestOutcome]) -> dict[str, RequestOutcome]:
    return {o.request_id: o for o in outcomes}


async def test_streaming_parse_and_usage(stand_in: StandIn) -> None:
    (outcome,) = await replay_live(_workload("stream-0", max_tokens=5), stand_in.url)
    assert outcome.ok, outcome.error
    assert (outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens) == (8, 4, 5)
    assert outcome.endpoint == "stand-in"
    assert outcome.start_s <= (outcome.first_token_s or -1) <= (outcome.end_s or -1)
    body = stand_in.bodies["stream-0"]
    assert body["prompt"] == list(range(1, 9)) and body["max_tokens"] == 5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == STAND_IN_MODEL  # discovered from /v1/models
    assert stand_in.paths["stream-0"] == "/v1/completions"


async def test_server_variants_and_failures(stand_in: StandIn) -> None:
    kinds = ("plain-0", "nousage-0", "garbled-0", "http500-0", "midstream-0", "empty-0")
    outcomes = _by_id(await replay_live(_workload(*kinds, max_tokens=3), stand_in.url + "/v1/", model="m"))
    plain = outcomes["plain-0"]  # one JSON body: TTFT is the whole response
    assert plain.ok and plain.first_token_s == plain.end_s and plain.cached_tokens == 4
    quiet = outcomes["nousage-0"]  # no usage: tokens counted from chunks, cache unknown
    assert quiet.ok and quiet.cached_tokens is None and quiet.completion_tokens == 3
    assert quiet.endpoint == "10.0.0.7:8000"
    garbled = outcomes["garbled-0"]  # a line that is not JSON is skipped, the rest counts
    assert garbled.ok and garbled.completion_tokens == 3
    assert not outcomes["http500-0"].ok and outcomes["http500-0"].error.startswith("http 500")
    assert "engine overloaded" in outcomes["http500-0"].error
    assert outcomes["midstream-0"].error == "stream error: engine died"
    assert outcomes["empty-0"].error.startswith("no tokens")
    assert all(stand_in.bodies[k]["model"] == "m" for k in kinds)


async def test_chat_api_sends_text(stand_in: StandIn) -> None:
    (outcome,) = await replay_live(_workload("stream-0", max_tokens=2), stand_in.url, api="chat")
    assert outcome.ok and outcome.completion_tokens == 2 and outcome.cached_tokens == 4
    assert stand_in.paths["stream-0"] == "/v1/chat/completions"
    messages = stand_in.bodies["stream-0"]["messages"]
    assert messages == [{"role": "user", "content": prompt_text(list(range(1, 9)))}]
    assert messages[0]["content"].startswith("t1 t2 t3")


async def test_unreachable_target_counts_every_request_as_failed() -> None:
    server = StandIn()
    runner = await server.start()
    url = server.url
    await runner.cleanup()  # nothing listens there any more
    outcomes = await replay_live(_workload("stream-0", "stream-1"), url, model="m")
    assert [o.ok for o in outcomes] == [False, False]
    assert all(o.error.startswith("ClientConnectorError") for o in outcomes)


async def test_concurrency_cap_is_honoured() -> None:
    server = StandIn(hold_until_in_flight=3)
    runner = await server.start()
    try:
        ids = [f"stream-{i}" for i in range(12)]
        done: list[str] = []
        outcomes = await replay_live(
            _workload(*ids), server.url, concurrency=3, progress=lambda o: done.append(o.request_id)
        )
    finally:
        await runner.cleanup()
    assert all(o.ok for o in outcomes)
    assert server.max_in_flight == 3  # reached, never exceeded: the rest waited
    assert sorted(done) == sorted(ids) and [o.request_id for o in outcomes] == ids


async def test_against_the_simulated_worker() -> None:
    shared = list(range(1000, 1064))
    workload = Workload(
        "tiny", [WorkloadRequest(f"r{i}", 0.01 * i, shared + [2000 + i] * 8, 4) for i in range(5)]
    )
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        url = pool.descriptors[0].http_url
        # One at a time, so that each request finds the previous one's blocks cached.
        outcomes = await replay_live(workload, url, concurrency=1)
        (chat,) = await replay_live(workload.limited(1), url, api="chat")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert all(o.completion_tokens == 4 and o.endpoint == "sim-0" for o in outcomes)
    assert all(o.prompt_tokens == 72 for o in outcomes)
    assert all((o.ttft_s or 0) > 0 and (o.e2e_s or 0) >= (o.ttft_s or 0) for o in outcomes)
    assert outcomes[0].cached_tokens == 0
    assert all((o.cached_tokens or 0) >= 64 for o in outcomes[1:])  # the shared 64-token prefix
    assert chat.ok and chat.completion_tokens == 4 and chat.prompt_tokens > 72  # templated text
    # The workers report their own TTFT, which the client's contains.
    for outcome in (*outcomes, chat):
        assert outcome.worker_ttft_s is not None and outcome.engine_ttft_s is not None
        assert 0 < outcome.worker_ttft_s < (outcome.ttft_s or 0)


async def test_route_sends_each_request_where_it_says() -> None:
    workload = Workload("rr", [WorkloadRequest(f"r{i}", 0.0, [7] * 20, 2) for i in range(6)])
    async with SimPool(3, PoolConfig(speed=20.0)) as pool:
        urls = [d.http_url for d in pool.descriptors]
        outcomes = await replay_live(
            workload, "http://127.0.0.1:9", route=lambda r: urls[int(r.request_id[1:]) % 3]
        )
    assert [o.endpoint for o in outcomes] == ["sim-0", "sim-1", "sim-2"] * 2


async def test_simulated_worker_rejections_are_failures() -> None:
    workload = Workload("bad", [WorkloadRequest("r0", 0.0, [], 4)])  # empty prompt: 400
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        (outcome,) = await replay_live(workload, pool.descriptors[0].http_url)
    assert not outcome.ok and outcome.error.startswith("http 400")
    assert outcome.endpoint == "sim-0"
