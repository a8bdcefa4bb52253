"""Prefill/decode disaggregation end to end through a real Envoy: client -> Envoy -> ext_proc ->
kvsched -> simulated vLLM workers labelled with llm-d's roles. The request must reach a decode
pod carrying its prefill pod in ``x-prefiller-host-port``, the header llm-d's routing sidecar
reads there. No sidecar runs here (it is a Go binary llm-d ships): the simulated worker echoes
the header it received, which is what the sidecar would read. Runs once per ext_proc transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring.disaggregation import ROLE_LABEL, DisaggregationConfig
from scheduler.demo.run import local_serve_config
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.worker import PREFILLER_HEADER, PREFILLER_SEEN_HEADER, WORKER_HEADER
from tests.test_e2e_envoy import Stack, gateway_in_front, prefix, until

ROLES = ("prefill", "decode", "decode")


@pytest.fixture
async def pd_stack(extproc_transport: str) -> AsyncIterator[Stack]:
    async with SimPool(len(ROLES), PoolConfig(speed=2.0)) as pool:
        # The pool's own set-up, its endpoints labelled with their roles.
        config = local_serve_config(
            pool,
            extproc={"transport": extproc_transport},
            scheduler=SchedulerConfig(disaggregation=DisaggregationConfig(enabled=True)).model_dump(),
            endpoints=[
                {
                    "address": d.address,
                    "kv_events": d.kv_endpoint,
                    "kv_replay": d.replay_endpoint,
                    "labels": {ROLE_LABEL: role},
                }
                for d, role in zip(pool.descriptors, ROLES, strict=True)
            ],
        )
        async with gateway_in_front(pool, config, fail_open=False) as stack:
            yield stack


async def _complete(
    session: aiohttp.ClientSession, stack: Stack, prompt: list[int], headers: dict[str, str] | None = None
) -> tuple[str, str | None]:
    """(serving worker, the x-prefiller-host-port it received) of one completion."""
    body = {"model": stack.model, "prompt": prompt, "max_tokens": 2}
    async with session.post(f"{stack.envoy.url}/v1/completions", json=body, headers=headers) as resp:
        text = await resp.text()
        assert resp.status == 200, f"{resp.status}: {text}"
        json.loads(text)
        return resp.headers[WORKER_HEADER], resp.headers.get(PREFILLER_SEEN_HEADER)


async def test_the_decode_pod_gets_the_request_and_the_prefill_pod_in_a_header(pd_stack: Stack) -> None:
    stack = pd_stack
    scheduler = stack.app.scheduler
    prefill = stack.pool.descriptors[0]
    decode_names = {d.name for d in stack.pool.descriptors[1:]}
    await until(
        lambda: all(
            scheduler.endpoint_state(e.name, 0.0).metrics_age_s is not None for e in scheduler.endpoints()
        )
    )
    async with aiohttp.ClientSession() as session:
        for seed in (71, 72, 73):
            worker, prefiller = await _complete(session, stack, prefix(seed))
            assert worker in decode_names
            assert prefiller == prefill.address
        # A client naming a prefill pod of its own does not choose it: kvsched's pick wins,
        # and with the prefill pod skipped (a threshold above the prompt) the header is
        # emptied, as llm-d clears it.
        forged = {PREFILLER_HEADER: "10.9.9.9:8000"}
        _, prefiller = await _complete(session, stack, prefix(74), forged)
        assert prefiller == prefill.address
        skip = DisaggregationConfig(enabled=True, non_cached_tokens_threshold=1_000_000)
        scheduler.reload(scheduler.config.model_copy(update={"disaggregation": skip}))
        worker, prefiller = await _complete(session, stack, prefix(75), forged)
        assert worker in decode_names and prefiller == ""
        worker, prefiller = await _complete(session, stack, prefix(76))
        assert worker in decode_names and prefiller is None
    await until(lambda: sum(scheduler.inflight(e.name)[0] for e in scheduler.endpoints()) == 0)
