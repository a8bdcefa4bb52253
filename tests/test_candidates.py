"""A large pool's pick scores a shortlist: the same decision as scoring every endpoint, the
load order kept current through every change, the request's hints on the shortlist, and the
peers' policies still given every endpoint."""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.metrics import KvschedCollector, new_registry
from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig
from scheduler.core.loadorder import OrderedNames
from scheduler.core.peerload import PeerSyncConfig
from scheduler.core.scheduler import (
    POOL_LABEL,
    CandidatesConfig,
    Endpoint,
    EndpointMetrics,
    HealthConfig,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
    _best_rank,
)
from scheduler.core.scoring import LoraSlots, PickRequest, ScorerWeights, ScoringConfig
from scheduler.core.scoring.config import SessionAffinityConfig
from scheduler.core.scoring.disaggregation import ROLE_LABEL, DisaggregationConfig
from scheduler.core.scoring.rendezvous import session_endpoint

BLOCK = 16


def _address(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250}:8000"


def _scheduler(n: int, *, prune_above: int = 32, seed: int = 0, **config: object) -> Scheduler:
    scheduler = Scheduler(
        SchedulerConfig(
            index=IndexConfig(block_size=BLOCK),
            candidates=CandidatesConfig(prune_above=prune_above),
            **config,  # type: ignore[arg-type]
        )
    )
    scheduler.set_endpoints(
        [Endpoint(f"e{i}", _address(i), kv_events="tcp://x:5557") for i in range(n)], now=0.0
    )
    rng = random.Random(seed)
    for i in range(n):
        metrics = EndpointMetrics(rng.randrange(3), rng.randrange(6), rng.random() * 0.8)
        scheduler.update_metrics(f"e{i}", metrics, now=0.0)
    return scheduler


def _prompts(rng: random.Random, count: int = 40) -> list[list[int]]:
    return [[rng.randrange(1, 30000) for _ in range(BLOCK * rng.randrange(1, 30))] for _ in range(count)]


def test_ordered_names_stay_sorted_through_changes() -> None:
    rng = random.Random(3)
    order: OrderedNames[int] = OrderedNames()
    keys: dict[str, int] = {}
    for _ in range(2000):
        name = f"n{rng.randrange(60)}"
        if rng.random() < 0.2:
            order.remove(name)
            keys.pop(name, None)
        else:
            keys[name] = rng.randrange(10)
            order.set(name, keys[name])
    assert list(order) == sorted(keys, key=lambda name: (keys[name], name))
    assert len(order) == len(keys)


def test_a_large_pool_picks_what_scoring_every_endpoint_picks() -> None:
    """Picks over 120 endpoints (prefix matches from speculative placement, requests in
    flight, first tokens, completions), each judged against the pipeline over every endpoint
    in the same state: the shortlist's pick has the best total every time (a different
    endpoint only on an exact tie), and the shortlist is a fraction of the pool."""
    scheduler = _scheduler(120)
    pipeline = scheduler._policy._pipeline  # type: ignore[attr-defined]
    rng = random.Random(1)
    prompts = _prompts(rng)
    live: list[str] = []
    same = 0
    picks = 800
    for i in range(picks):
        now = 1.0 + i * 0.01
        prompt = prompts[rng.randrange(len(prompts))]
        keys = scheduler.index.request_keys(prompt)
        matches = scheduler._with_speculative(keys, _best_rank(scheduler.index.peek(keys)))
        silent = scheduler.kv_events_stale(now)
        matches = {name: match for name, match in matches.items() if name not in silent}
        states = [scheduler.endpoint_state(endpoint.name, now) for endpoint in scheduler.endpoints()]
        every = pipeline.pick(PickRequest(f"r{i}", len(keys), len(prompt)), states, matches)
        # The balance guard's overloaded endpoints rank after every other one.
        total = {
            s.address: t - (1.0 if s.name in every.overloaded else 0.0)
            for s, t in zip(every.candidates.states, every.totals, strict=True)
        }
        result = scheduler.pick(SchedulingRequest(f"r{i}", prompt), now=now)
        assert result.decision is not None and len(result.decision.totals) <= 24
        # The picker takes the least loaded of the totals within tie_epsilon of the best.
        assert total[result.endpoints[0]] >= max(total.values()) - pipeline.config.tie_epsilon - 1e-12
        same += result.endpoints[0] == every.addresses[0]
        live.append(f"r{i}")
        if rng.random() < 0.5:
            done = live.pop(rng.randrange(len(live)))
            scheduler.on_first_token(done, now=now)
            scheduler.on_completed(done, now=now)
    assert same >= 0.9 * picks


def _rebuilt_order(scheduler: Scheduler) -> tuple[list[str], list[str]]:
    assert scheduler._by_load is not None and scheduler._by_kv_usage is not None
    kept = list(scheduler._by_load), list(scheduler._by_kv_usage)
    scheduler._by_load = scheduler._by_kv_usage = None
    scheduler._keep_orders()
    assert scheduler._by_load is not None and scheduler._by_kv_usage is not None
    assert kept == (list(scheduler._by_load), list(scheduler._by_kv_usage))
    return kept


def test_the_load_order_follows_every_change_peers_included() -> None:
    sync = PeerSyncConfig(enabled=True)
    a, b = _scheduler(40, sync=sync), _scheduler(40, sync=sync, seed=0)
    a.start_sync("a", 1)
    b.start_sync("b", 1)
    rng = random.Random(2)
    prompts = _prompts(rng, 10)
    live: list[str] = []
    for i in range(300):
        now = 1.0 + i * 0.01
        scheduler = a if i % 2 else b
        other = b if i % 2 else a
        result = scheduler.pick(SchedulingRequest(f"r{i}", prompts[i % len(prompts)]), now=now)
        if i % 7 == 0:
            # The gateway sent it elsewhere.
            scheduler.on_served_by(f"r{i}", _address(rng.randrange(40)), now)
        live.append(f"r{i}")
        assert result.status == "ok"
        if i % 3 == 0:
            done = live.pop(0)
            for replica in (a, b):
                replica.on_first_token(done, now)
                replica.on_completed(done, now)
        if i % 11 == 0:
            name = f"e{rng.randrange(40)}"
            scheduler.update_metrics(name, EndpointMetrics(rng.randrange(4), 2, rng.random()), now)
        for message in scheduler.take_sync_messages():
            other.receive_sync(message, now)
        _rebuilt_order(scheduler)
    loads = _rebuilt_order(a)[0]
    assert loads[0] != loads[-1]
    # Below the threshold no order is kept; crossing it builds one, leaving drops it.
    a.set_endpoints([Endpoint(f"e{i}", _address(i)) for i in range(20)], now=5.0)
    assert a._by_load is None
    a.set_endpoints([Endpoint(f"e{i}", _address(i)) for i in range(50)], now=5.0)
    assert sorted(_rebuilt_order(a)[0]) == sorted(f"e{i}" for i in range(50))


def test_at_or_below_the_threshold_every_endpoint_is_scored() -> None:
    scheduler = _scheduler(32)
    result = scheduler.pick(SchedulingRequest("r", list(range(1, 65))), now=1.0)
    assert result.decision is not None and len(result.decision.totals) == 32
    assert scheduler._by_load is None


def test_the_longest_matches_and_the_least_loaded_are_on_the_shortlist() -> None:
    scheduler = _scheduler(100)
    prompt = [7] * (BLOCK * 10)
    keys = [int(key) for key in scheduler.index.request_keys(prompt)]
    for i in range(20):
        # e0 holds the whole prompt, e1..e19 one block each: e0 must be scored.
        held = keys if i == 0 else keys[:1]
        event = BlockStored(held, None, prompt[: BLOCK * len(held)], BLOCK, medium=Tier.GPU)
        scheduler.index.apply_batch(f"e{i}", EventBatch(0.0, [event]))
    for i in range(100):
        scheduler.update_metrics(f"e{i}", EndpointMetrics(3, 4, 0.5), now=0.5)
    scheduler.update_metrics("e77", EndpointMetrics(0, 0, 0.5), now=0.5)
    result = scheduler.pick(SchedulingRequest("r", prompt), now=1.0)
    assert result.decision is not None
    scored = {state.name for state in result.decision.candidates.states}  # type: ignore[union-attr]
    assert {"e0", "e77"} <= scored
    assert len(scored) <= 20


def test_the_sessions_endpoint_is_the_same_as_among_every_endpoint() -> None:
    scoring = ScoringConfig(session_affinity=SessionAffinityConfig(hard=True))
    pruned = _scheduler(80, scoring=scoring)
    every = _scheduler(80, scoring=scoring, prune_above=1000)
    names = [f"e{i}" for i in range(80)]
    for k in range(40):
        session = f"user-{k}"
        home = names[session_endpoint(session, names)]
        for scheduler in (pruned, every):
            result = scheduler.pick(SchedulingRequest(f"r{k}", [1] * 64, session_id=session), now=1.0)
            assert result.endpoints == [_address(int(home[1:]))]


def test_an_adapters_holders_and_the_subset_and_pool_shape_the_shortlist() -> None:
    scheduler = _scheduler(60)
    endpoints = [
        Endpoint(
            f"e{i}", _address(i), kv_events="tcp://x:5557", labels={POOL_LABEL: "ns/a" if i < 40 else "ns/b"}
        )
        for i in range(60)
    ]
    scheduler.set_endpoints(endpoints, now=0.0)
    busy = LoraSlots(frozenset({"other"}), frozenset(), 1)
    for i in range(60):
        lora = LoraSlots(frozenset({"sql"}), frozenset(), 1) if i == 33 else busy
        metrics = EndpointMetrics(0 if i != 33 else 2, 1, 0.2 if i != 33 else 0.9, lora=lora)
        scheduler.update_metrics(f"e{i}", metrics, now=0.0)
    # Every slot elsewhere is busy with another adapter, so the adapter's holder is the only
    # candidate once it is scored; it is busier and fuller than the rest: scored all the same.
    result = scheduler.pick(SchedulingRequest("r1", [1] * 64, model="sql"), now=1.0)
    assert result.endpoints[0] == _address(33)
    # A subset hint: only what it allows.
    allowed = frozenset({_address(5), _address(50)})
    result = scheduler.pick(SchedulingRequest("r2", [1] * 64, subset=allowed), now=1.0)
    assert set(result.endpoints) <= allowed
    assert result.decision is not None and len(result.decision.totals) == 2
    # A large subset is walked in load order like the pool.
    wide = frozenset(_address(i) for i in range(10, 60))
    result = scheduler.pick(SchedulingRequest("r3", [1] * 64, subset=wide), now=1.0)
    assert result.decision is not None
    assert {s.address for s in result.decision.candidates.states} <= wide  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["llmd", "dynamo", "vllm_router_kv_aware", "least_loaded", "round_robin"])
def test_the_peers_policies_see_every_endpoint(policy: str) -> None:
    """Their decisions over 64 endpoints are the same whatever the threshold."""
    runs = []
    for prune_above in (1, 1000):
        scheduler = _scheduler(64, prune_above=prune_above, policy=policy)
        rng = random.Random(5)
        prompts = _prompts(rng, 8)
        picked = []
        for i in range(150):
            result = scheduler.pick(SchedulingRequest(f"r{i}", prompts[i % 8]), now=1.0 + i * 0.01)
            picked.append(result.endpoints[0])
            if i % 2:
                scheduler.on_completed(f"r{i - 1}", now=1.0 + i * 0.01)
        runs.append(picked)
    assert runs[0] == runs[1]


def test_weights_that_leave_prefix_out_still_prune() -> None:
    weights = ScorerWeights.only(queue_depth=1.0)
    scheduler = _scheduler(64, scoring=ScoringConfig(weights=weights))
    result = scheduler.pick(SchedulingRequest("r", [1] * 64), now=1.0)
    assert result.decision is not None and len(result.decision.totals) < 64


def test_a_disaggregated_pool_gets_a_pod_of_each_role() -> None:
    """60 pods, the 12 prefill-only ones the busiest: the shortlist still holds prefill pods,
    so the pick stays disaggregated, and it makes the same choice as scoring every pod."""
    results = []
    for prune_above in (32, 1000):
        scheduler = _scheduler(60, prune_above=prune_above, disaggregation=DisaggregationConfig(enabled=True))
        roles = {i: "prefill" if i >= 48 else "decode" for i in range(60)}
        endpoints = [
            Endpoint(f"e{i}", _address(i), kv_events="tcp://x:5557", labels={ROLE_LABEL: roles[i]})
            for i in range(60)
        ]
        scheduler.set_endpoints(endpoints, now=0.0)
        for i in range(60):
            # Distinct KV usage: no exact ties, which a shortlist may break differently.
            metrics = EndpointMetrics(2 if i >= 48 else 0, 1, 0.2 + 0.01 * ((i * 7) % 60))
            scheduler.update_metrics(f"e{i}", metrics, now=0.0)
        picked = []
        for k in range(20):
            result = scheduler.pick(SchedulingRequest(f"r{k}", [k + 1] * 2048), now=1.0)
            assert result.prefill_endpoint is not None
            assert int(result.prefill_endpoint.split(".")[-1].split(":")[0]) >= 48
            picked.append((result.endpoints[0], result.prefill_endpoint))
        results.append(picked)
    assert results[0] == results[1]


def test_with_nothing_eligible_the_reasons_are_those_of_every_endpoint() -> None:
    closed = HealthConfig(fail_open=False)
    pruned, every = _scheduler(40, health=closed), _scheduler(40, prune_above=1000, health=closed)
    for scheduler in (pruned, every):
        for i in range(40):
            for _ in range(scheduler.config.health.unhealthy_after_failures):
                scheduler.record_scrape_failure(f"e{i}", "refused", now=1.0)
    results = [scheduler.pick(SchedulingRequest("r", [1] * 64), now=2.0) for scheduler in (pruned, every)]
    assert results[0].status == results[1].status == "no_endpoints"
    assert results[0].reason == results[1].reason == "no healthy endpoint"
    elsewhere = frozenset({"10.9.9.9:8000"})
    results = [
        scheduler.pick(SchedulingRequest("s", [1] * 64, subset=elsewhere), now=2.0)
        for scheduler in (pruned, every)
    ]
    assert results[0].reason == results[1].reason


def test_judging_a_peers_routing_scores_the_shortlist_a_pick_would() -> None:
    """``would_route`` (how a replica judges a peer's sampled routing) in a large pool picks
    what this replica's own pick picks, ties included."""
    from scheduler.core.scheduler import SpeculativeConfig

    scheduler = _scheduler(60, speculative=SpeculativeConfig(enabled=False))
    rng = random.Random(4)
    prompts = _prompts(rng, 12)
    for i in range(60):
        prompt = prompts[i % len(prompts)]
        keys = [int(key) for key in scheduler.index.request_keys(prompt)]
        judged = scheduler.would_route(keys, len(prompt), 1.0, f"r{i}")
        picked = scheduler.pick(SchedulingRequest(f"r{i}", prompt), now=1.0)
        assert picked.endpoints[0] == _address(int(str(judged)[1:]))
        if i % 3 == 0:
            scheduler.on_completed(f"r{i}", now=1.0)


def test_with_every_endpoint_unhealthy_a_pick_fails_open_among_them() -> None:
    """Scrapes that all fail (engines too busy to answer /metrics in time) must not refuse
    every request: the pick is made among the unhealthy endpoints, and counted."""
    for prune_above in (32, 1000):
        scheduler = _scheduler(40, prune_above=prune_above)
        failures = scheduler.config.health.unhealthy_after_failures
        for i in range(40):
            for _ in range(failures):
                scheduler.record_scrape_failure(f"e{i}", "timed out", now=1.0)
        result = scheduler.pick(SchedulingRequest("r", [1] * 64), now=2.0)
        assert result.status == "ok" and result.endpoints and scheduler.failed_open_picks == 1
        # The gateway's subset hint still holds.
        allowed = frozenset({_address(7)})
        result = scheduler.pick(SchedulingRequest("s", [1] * 64, subset=allowed), now=2.0)
        assert result.endpoints == [_address(7)] and scheduler.failed_open_picks == 2
        # One healthy endpoint left: it is the only candidate, and nothing fails open.
        scheduler.update_metrics("e3", EndpointMetrics(0, 0, 0.1), now=2.0)
        result = scheduler.pick(SchedulingRequest("t", [1] * 64), now=2.0)
        assert result.endpoints == [_address(3)] and scheduler.failed_open_picks == 2
    registry = new_registry(process_metrics=False)
    registry.register(KvschedCollector(scheduler))
    exposed = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert exposed["kvsched_picks_failed_open_total"] == 2
