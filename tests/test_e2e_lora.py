"""LoRA adapters end to end through a real Envoy: client -> Envoy -> ext_proc -> kvsched ->
simulated vLLM workers that serve adapters (one slot each), their vllm:lora_requests_info
scraped and their per-adapter KV events ingested over ZMQ. Runs once per ext_proc transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from scheduler.demo.run import local_serve_config
from scheduler.sim.engine import EngineConfig
from scheduler.sim.pool import PoolConfig, SimPool
from tests.test_e2e_envoy import SUBSET_HEADER, Stack, gateway_in_front, prefix, until

ADAPTERS = ("sql-lora", "chat-lora")


@pytest.fixture
async def lora_stack(extproc_transport: str) -> AsyncIterator[Stack]:
    pool_config = PoolConfig(speed=2.0, engine=EngineConfig(max_loras=1), lora_adapters=ADAPTERS)
    async with SimPool(2, pool_config) as pool:
        config = local_serve_config(pool, extproc={"transport": extproc_transport})
        async with gateway_in_front(pool, config, fail_open=False, subset_header=SUBSET_HEADER) as stack:
            yield stack


async def _complete(
    session: aiohttp.ClientSession, stack: Stack, model: str, prompt: list[int], max_tokens: int = 2
) -> tuple[str, int]:
    """(serving worker, cached prompt tokens) of one completion naming ``model``."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    async with session.post(f"{stack.envoy.url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, f"{resp.status}: {text}"
        cached = json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"]
        return resp.headers["x-kvsched-sim-worker"], cached


async def test_adapters_keep_their_own_cache_and_slots_through_envoy(lora_stack: Stack) -> None:
    stack = lora_stack
    scheduler = stack.app.scheduler
    index = scheduler.index
    # Both workers' vllm:lora_requests_info scraped: the adapters are told from the base model.
    await until(
        lambda: all(scheduler.endpoint_state(e.name, 0.0).lora is not None for e in scheduler.endpoints())
    )
    assert scheduler.adapter_of("sql-lora") == "sql-lora" and scheduler.adapter_of(stack.model) is None
    prompt = prefix(61)
    async with aiohttp.ClientSession() as session:
        first, cached = await _complete(session, stack, "sql-lora", prompt)
        assert cached == 0
        address = stack.worker_address(first)
        await until(
            lambda: index.match(index.request_keys(prompt, adapter="sql-lora")).get(address, (0,))[0] >= 15
        )
        # The same tokens under another adapter, or the base model, match nothing anywhere.
        assert index.match(index.request_keys(prompt, adapter="chat-lora")) == {}
        assert index.match(index.request_keys(prompt)) == {}
        again, cached = await _complete(session, stack, "sql-lora", [*prompt, 5])
        assert again == first and cached >= 15 * 16
        _, cached = await _complete(session, stack, "chat-lora", prompt)
        assert cached == 0  # the worker keys the adapter's blocks apart as well

        # A long sql-lora request holds its worker's only slot, and two long base-model
        # requests (pinned by a subset hint) make the other worker the busier one: a
        # chat-lora request still goes there, since on the holder it would wait for the slot.
        # Long enough to outlast any stall of a busy machine before the picks below (400
        # tokens, ~2 s here, once did not, beside a parallel test compiling C++); they are
        # closed once the picks are checked, so their length costs no time.
        def long_body(model: str, seed: int) -> dict[str, object]:
            return {"model": model, "prompt": prefix(seed), "max_tokens": 4000, "stream": True}

        url = f"{stack.envoy.url}/v1/completions"
        async with session.post(url, json=long_body("sql-lora", 62)) as held:
            assert held.status == 200
            holder = held.headers["x-kvsched-sim-worker"]
            other = next(d for d in stack.pool.descriptors if d.name != holder)
            pin = {SUBSET_HEADER: other.address}
            async with (
                session.post(url, json=long_body(stack.model, 65), headers=pin) as base1,
                session.post(url, json=long_body(stack.model, 66), headers=pin) as base2,
            ):
                assert base1.status == base2.status == 200
                assert scheduler.inflight(other.address)[0] == 2
                assert scheduler.inflight(stack.worker_address(holder))[0] == 1
                chat, _ = await _complete(session, stack, "chat-lora", prefix(63))
                assert chat == other.name
                sql, _ = await _complete(session, stack, "sql-lora", prefix(64))
                assert sql == holder
                for response in (held, base1, base2):
                    response.close()
    outcomes = stack.app.server.stats.outcomes
    await until(lambda: sum(scheduler.inflight(e.name)[0] for e in scheduler.endpoints()) == 0)
    assert outcomes["completed"] >= 5
