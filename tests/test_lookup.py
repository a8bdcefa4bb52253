"""Scheduler.lookup: what the index says every endpoint holds of a prompt, changing nothing."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from scheduler.core.events import AllBlocksCleared, BlockStored, EventBatch, Tier
from scheduler.core.flowcontrol import FlowControlConfig
from scheduler.core.index import IndexConfig
from scheduler.core.lookup import RankPrefix
from scheduler.core.scheduler import (
    ApproximateConfig,
    Endpoint,
    EndpointMetrics,
    HealthConfig,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)

BLOCK = 4
PROMPT = list(range(1, 6 * BLOCK + 1))  # six full blocks
EVENTS = Endpoint("10.0.0.1:8000", "10.0.0.1:8000", kv_events="tcp://10.0.0.1:5557", data_parallel_size=2)
PLAIN = Endpoint("10.0.0.2:8000", "10.0.0.2:8000", kv_events="tcp://10.0.0.2:5557")
SICK = Endpoint("10.0.0.3:8000", "10.0.0.3:8000", kv_events="tcp://10.0.0.3:5557")
NO_EVENTS = Endpoint("10.0.0.4:8000", "10.0.0.4:8000")


def _scheduler(backend: str = "native", **config: Any) -> Scheduler:
    index = IndexConfig(block_size=BLOCK, backend=backend, **config.pop("index", {}))  # type: ignore[arg-type]
    scheduler = Scheduler(
        SchedulerConfig(
            index=index,
            health=HealthConfig(unhealthy_after_failures=1),
            approximate=ApproximateConfig(ttl_s=10.0),
            **config,
        )
    )
    scheduler.set_endpoints([EVENTS, PLAIN, SICK, NO_EVENTS], now=0.0)
    for endpoint in scheduler.endpoints():
        scheduler.update_metrics(endpoint.name, EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=0.0)
    scheduler.record_scrape_failure(SICK.name, "connection refused", now=0.0)
    return scheduler


def _store(scheduler: Scheduler, worker: str, blocks: range, tier: Tier, parent: int | None = None) -> None:
    tokens = PROMPT[blocks.start * BLOCK : blocks.stop * BLOCK]
    event = BlockStored([1000 + b for b in blocks], parent, tokens, BLOCK, medium=tier)
    assert scheduler.index.apply_batch(worker, EventBatch(0.0, [event])).stored == len(blocks)


def _fill(scheduler: Scheduler) -> None:
    # Rank 0 of EVENTS: 2 blocks on GPU, then 1 on CPU; rank 1: 4 blocks, the last on storage.
    _store(scheduler, "10.0.0.1:8000", range(0, 2), Tier.GPU)
    _store(scheduler, "10.0.0.1:8000", range(2, 3), Tier.CPU, parent=1001)
    _store(scheduler, "10.0.0.1:8000#dp1", range(0, 3), Tier.GPU)
    _store(scheduler, "10.0.0.1:8000#dp1", range(3, 4), Tier.STORAGE, parent=1002)
    _store(scheduler, SICK.name, range(0, 6), Tier.GPU)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_lookup_reports_every_endpoint_rank_and_tier(backend: str) -> None:
    scheduler = _scheduler(backend)
    _fill(scheduler)
    found = scheduler.lookup([*PROMPT, 7, 7], now=1.0, model="m")
    assert (found.model, found.prompt_tokens, found.prompt_blocks, found.block_size) == ("m", 26, 6, BLOCK)
    # SICK holds the whole prompt: the walk compared every key.
    assert found.keys_compared == 6 and found.hash_mode == "own"
    by_name = {endpoint.name: endpoint for endpoint in found.endpoints}
    assert list(by_name) == sorted(by_name)
    events = by_name[EVENTS.name]
    assert events.source == "kv_events" and events.healthy and events.matched_blocks == 4
    assert events.ranks == (
        RankPrefix(0, "10.0.0.1:8000", 3, 2, 1, 0, 4),
        RankPrefix(1, "10.0.0.1:8000#dp1", 4, 3, 0, 1, 5),
    )
    # Nothing held: one key compared (the first), no blocks.
    assert by_name[PLAIN.name].ranks == (RankPrefix(0, PLAIN.name, 0, 0, 0, 0, 1),)
    # An endpoint a pick would filter out is reported, with its health.
    sick = by_name[SICK.name]
    assert not sick.healthy and sick.ranks[0] == RankPrefix(0, SICK.name, 6, 6, 0, 0, 6)
    assert by_name[NO_EVENTS.name].source == "routing_history"
    assert asdict(found) == found.as_dict()
    # A prompt shorter than a block compares nothing.
    short = scheduler.lookup([1, 2], now=1.0)
    assert (short.prompt_blocks, short.keys_compared) == (0, 0)
    assert all(rank.matched_blocks == 0 for e in short.endpoints for rank in e.ranks)


def test_lookup_in_vllm_hash_mode_matches_the_engines_hashes() -> None:
    scheduler = _scheduler(index={"hash_mode": "vllm"})
    hashes = [int(key) for key in scheduler.index.request_keys(PROMPT)]
    stored = BlockStored(hashes[:3], None, [], BLOCK)
    assert scheduler.index.apply_batch(PLAIN.name, EventBatch(0.0, [stored])).stored == 3
    found = scheduler.lookup(PROMPT, now=1.0)
    assert found.hash_mode == "vllm" and found.keys_compared == 4
    assert {e.name: e.matched_blocks for e in found.endpoints}[PLAIN.name] == 3


def test_lookup_leaves_approximate_entries_past_their_ttl_out_without_expiring_them() -> None:
    scheduler = _scheduler()
    scheduler.set_endpoints([NO_EVENTS], now=0.0)
    scheduler.pick(SchedulingRequest("a", PROMPT), now=0.0)
    scheduler.pick(SchedulingRequest("b", PROMPT[: 2 * BLOCK]), now=5.0)
    assert scheduler.lookup(PROMPT, now=9.0).endpoints[0].matched_blocks == 6
    # At 12 s the first routing is past its TTL (10 s); the second still holds two blocks.
    found = scheduler.lookup(PROMPT, now=12.0)
    assert found.endpoints[0].ranks[0] == RankPrefix(0, NO_EVENTS.name, 2, 2, 0, 0, 3)
    # The index itself still holds what a pick will expire: the lookup only read it.
    assert scheduler.index.match_tokens(PROMPT)[NO_EVENTS.name].total_blocks == 6
    assert scheduler.lookup(PROMPT, now=16.0).endpoints[0].matched_blocks == 0


def _observable(scheduler: Scheduler) -> dict[str, Any]:
    """Everything a lookup must leave as it was."""
    index = scheduler.index
    return {
        "inflight": {e.name: scheduler.inflight(e.name) for e in scheduler.endpoints()},
        "inflight_requests": sorted(scheduler._inflight),
        "states": [scheduler.endpoint_state(e.name, 3.0) for e in scheduler.endpoints()],
        "flow": scheduler.flow.stats,
        "waiting_room": len(scheduler.flow),
        "saturated": scheduler.saturation.is_saturated,
        "predictor": scheduler.predictor.stats,
        "prefix_stats": asdict(scheduler.prefix_stats),
        "approximate": list(scheduler._approx),
        "rng": scheduler._rng.getstate(),
        "index": (index.footprint(), index.stats, index.evictions, index.unknown_removals, index.workers),
        "root_keys": dict(index._root_keys),
        "class_ids": dict(scheduler._class_ids),
        "completions": scheduler.completions,
    }


def _chain(scheduler: Scheduler, worker: str, first: int) -> None:
    """Six blocks of a prompt that shares nothing with PROMPT."""
    tokens = list(range(first, first + 6 * BLOCK))
    event = BlockStored(list(range(first, first + 6)), None, tokens, BLOCK)
    assert scheduler.index.apply_batch(worker, EventBatch(0.0, [event])).stored == 6


def test_a_lookup_reserves_nothing_and_leaves_no_state_behind() -> None:
    # Flow control holds a request in its waiting room (the pool is saturated), the
    # predictor has predicted, one request is in flight: a lookup changes none of it.
    config = {"flow_control": FlowControlConfig(queue_depth_threshold=1), "index": {"max_blocks": 24}}
    scheduler, twin = _scheduler(**config), _scheduler(**config)
    for each in (scheduler, twin):
        _fill(each)
        each.pick(SchedulingRequest("in-flight", PROMPT), now=1.0)
        for endpoint in each.endpoints():
            each.update_metrics(endpoint.name, EndpointMetrics(waiting=3, running=8, kv_usage=0.9), now=2.0)
        assert each.admit(SchedulingRequest("waits", PROMPT), now=2.0).queued
        _chain(each, PLAIN.name, 10_000)  # more recent than PROMPT's blocks (12 of 24 now)
    before = _observable(scheduler)
    assert before["waiting_room"] == 1 and sum(before["predictor"].predictions.values()) > 0
    for now in (2.5, 3.0):
        scheduler.lookup(PROMPT, now=now)
        scheduler.lookup(list(range(500, 600)), now=now)
    assert _observable(scheduler) == before
    # The twin had no lookups. Both now take the same traffic and must decide alike. The
    # bound evicts the least recently touched first: PROMPT's blocks, unless a lookup had
    # touched them, when the other chain would go instead.
    for each in (scheduler, twin):
        for first in (20_000, 30_000, 40_000):
            _chain(each, PLAIN.name, first)
        each.update_metrics(PLAIN.name, EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=4.0)
    assert scheduler.index.evictions == twin.index.evictions == 6
    assert scheduler.index.match_tokens(PROMPT) == twin.index.match_tokens(PROMPT) == {}
    picks = [
        [
            each.pick(SchedulingRequest(f"r{i}", PROMPT[: (i + 1) * BLOCK]), now=5.0).endpoints
            for i in range(4)
        ]
        for each in (scheduler, twin)
    ]
    assert picks[0] == picks[1]


def test_a_pick_touches_the_recency_a_lookup_leaves_alone() -> None:
    """The test above can fail: matching (as a pick does) changes which blocks are evicted."""
    outcomes = []
    for read in ("lookup", "match"):
        scheduler = _scheduler(index={"max_blocks": 6})
        _store(scheduler, PLAIN.name, range(0, 3), Tier.GPU)
        other = [9000 + t for t in PROMPT]
        event = BlockStored([70, 71, 72], None, other[: 3 * BLOCK], BLOCK)
        scheduler.index.apply_batch(PLAIN.name, EventBatch(0.0, [event]))
        if read == "lookup":
            scheduler.lookup(PROMPT, now=1.0)
        else:
            scheduler.index.match_tokens(PROMPT)
        extra = BlockStored([80], None, [8000 + t for t in range(BLOCK)], BLOCK)
        scheduler.index.apply_batch(PLAIN.name, EventBatch(0.0, [extra]))
        outcomes.append(scheduler.index.match_tokens(PROMPT).get(PLAIN.name))
        scheduler.index.apply_batch(PLAIN.name, EventBatch(0.0, [AllBlocksCleared()]))
    # Without the touch the prompt's deepest block was the least recent one and went first.
    assert [match.total_blocks if match else 0 for match in outcomes] == [2, 3]
