"""The scoring pipeline: filters, scorers, picker, decision explanations, configuration."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from scheduler.core.scoring import (
    NO_ELIGIBLE_IN_SUBSET,
    SCORERS,
    BalanceGuard,
    Candidates,
    EndpointState,
    FilterLimits,
    HealthFilter,
    InflightLoadScorer,
    KVUtilizationScorer,
    LatencyEstimate,
    PickRequest,
    PrefixMatch,
    PrefixOverlapScorer,
    QueueDepthScorer,
    SaturationFilter,
    SchedulingPipeline,
    ScorerWeights,
    ScoringConfig,
    SubsetHintFilter,
    TierWeights,
    register_scorer,
    relative_to_best,
)
from scheduler.core.scoring.candidates import build_candidates, metrics_trusted

FRESH = 0.1
REPO = Path(__file__).resolve().parents[1]


def _ep(i: int, **fields: object) -> EndpointState:
    values: dict[str, object] = {
        "name": f"10.0.0.{i}:8000",
        "address": f"10.0.0.{i}:8000",
        "metrics_age_s": FRESH,
        "kv_usage": 0.2,
    }
    values.update(fields)
    return EndpointState(**values)  # type: ignore[arg-type]


def _request(request_id: str = "r1", blocks: int = 10, tokens: int = 160, **fields: object) -> PickRequest:
    return PickRequest(request_id, blocks, tokens, **fields)  # type: ignore[arg-type]


def _candidates(
    endpoints: Sequence[EndpointState],
    matches: dict[str, PrefixMatch] | None = None,
    request: PickRequest | None = None,
    config: ScoringConfig | None = None,
) -> Candidates:
    config = config or ScoringConfig()
    states = list(endpoints)
    trusted = metrics_trusted(states, config.limits.metrics_stale_after_s)
    return build_candidates(states, trusted, matches or {}, request or _request(), config.tiers)


def _weights(**weights: float) -> ScoringConfig:
    return ScoringConfig(weights=ScorerWeights.only(**weights))


# --- filters -------------------------------------------------------------------------------


def test_unhealthy_endpoint_is_filtered_with_its_reason() -> None:
    endpoints = [_ep(1, healthy=False), _ep(2)]
    decision = SchedulingPipeline().pick(_request(), endpoints, {})
    assert decision.endpoints == ["10.0.0.2:8000"]
    assert decision.filtered == {"10.0.0.1:8000": "unhealthy"}
    assert HealthFilter().reject(endpoints, [True, True], _request(), ScoringConfig()) == {0: "unhealthy"}


def test_no_healthy_endpoint_and_no_endpoint_at_all() -> None:
    pipeline = SchedulingPipeline()
    decision = pipeline.pick(_request(), [_ep(1, healthy=False)], {})
    assert decision.endpoints == [] and decision.addresses == []
    assert decision.reason == "no healthy endpoint"
    assert not decision.saturated
    empty = pipeline.pick(_request(), [], {})
    assert empty.endpoints == [] and empty.reason == "no endpoints"


def test_subset_hint_keeps_only_listed_addresses() -> None:
    endpoints = [_ep(1), _ep(2), _ep(3)]
    subset = frozenset({"10.0.0.2:8000", "10.0.0.3:8000"})
    decision = SchedulingPipeline().pick(_request(subset=subset), endpoints, {})
    assert set(decision.endpoints) == {"10.0.0.2:8000", "10.0.0.3:8000"}
    assert decision.filtered == {"10.0.0.1:8000": "not in subset hint"}


def test_subset_hint_matches_addresses_not_names() -> None:
    endpoint = EndpointState(name="pod-a", address="10.1.1.1:8000", metrics_age_s=FRESH)
    other = EndpointState(name="pod-b", address="10.1.1.2:8000", metrics_age_s=FRESH)
    decision = SchedulingPipeline().pick(_request(subset=frozenset({"10.1.1.1:8000"})), [other, endpoint], {})
    assert decision.endpoints == ["pod-a"]
    assert decision.addresses == ["10.1.1.1:8000"]


@pytest.mark.parametrize(
    "subset",
    [frozenset(), frozenset({"10.9.9.9:8000"}), frozenset({"10.0.0.1:8000"})],
    ids=["empty", "unknown-address", "only-unhealthy"],
)
def test_subset_hint_with_no_eligible_endpoint(subset: frozenset[str]) -> None:
    endpoints = [_ep(1, healthy=False), _ep(2)]
    decision = SchedulingPipeline().pick(_request(subset=subset), endpoints, {})
    assert decision.endpoints == []
    assert decision.reason == NO_ELIGIBLE_IN_SUBSET == "no eligible endpoint in subset hint"
    assert "10.0.0.2:8000" in decision.filtered


def test_no_subset_hint_filters_nothing() -> None:
    endpoints = [_ep(1), _ep(2)]
    assert SubsetHintFilter().reject(endpoints, [True, True], _request(), ScoringConfig()) == {}


def test_saturated_endpoints_are_filtered_while_others_remain() -> None:
    limits = FilterLimits(max_waiting=10, max_kv_usage=0.9)
    config = ScoringConfig(limits=limits)
    endpoints = [_ep(1, waiting=11), _ep(2, kv_usage=0.95), _ep(3, waiting=10, kv_usage=0.9)]
    decision = SchedulingPipeline(config).pick(_request(), endpoints, {})
    assert decision.endpoints == ["10.0.0.3:8000"]
    assert not decision.saturated
    assert "max_waiting" in decision.filtered["10.0.0.1:8000"]
    assert "max_kv_usage" in decision.filtered["10.0.0.2:8000"]


def test_every_endpoint_saturated_flags_the_decision_and_lists_the_least_loaded() -> None:
    config = ScoringConfig(limits=FilterLimits(max_waiting=5), num_fallbacks=1)
    endpoints = [
        _ep(1, waiting=50, inflight_requests=3),
        _ep(2, waiting=9),
        _ep(3, waiting=20, inflight_requests=1),
    ]
    # The most loaded holds the whole prompt: once everything is saturated that does not matter.
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10)}
    decision = SchedulingPipeline(config).pick(_request(), endpoints, matches)
    assert decision.saturated
    assert decision.reason == "every endpoint is saturated"
    assert decision.endpoints == ["10.0.0.2:8000", "10.0.0.3:8000"]
    assert set(decision.over_limit) == {e.name for e in endpoints}
    assert decision.filtered == {}
    assert decision.explain()["saturated"] is True


def test_saturation_is_judged_within_the_subset_hint() -> None:
    config = ScoringConfig(limits=FilterLimits(max_waiting=5))
    endpoints = [_ep(1), _ep(2, waiting=50)]
    decision = SchedulingPipeline(config).pick(_request(subset=frozenset({"10.0.0.2:8000"})), endpoints, {})
    assert decision.saturated
    assert decision.endpoints == ["10.0.0.2:8000"]


def test_stale_metrics_are_not_trusted_but_the_endpoint_stays_eligible() -> None:
    config = ScoringConfig(limits=FilterLimits(max_waiting=5, max_kv_usage=0.9, metrics_stale_after_s=1.0))
    stale = _ep(1, waiting=500, running=40, kv_usage=0.99, metrics_age_s=1.5, inflight_requests=2)
    never = _ep(2, waiting=500, kv_usage=0.99, metrics_age_s=None, inflight_requests=2)
    fresh = _ep(3, waiting=1, kv_usage=0.4, inflight_requests=1)
    # Stale metrics never make an endpoint saturated.
    assert SaturationFilter().reject([stale, never, fresh], [False, False, True], _request(), config) == {}
    decision = SchedulingPipeline(config).pick(_request(), [stale, never, fresh], {})
    assert decision.filtered == {}
    assert not decision.saturated
    candidates = decision.candidates
    assert candidates is not None
    assert candidates.trusted == [False, False, True]
    # Only kvsched's own in-flight count is used where the scrape is stale.
    assert candidates.queue == [2, 2, 2]
    explained = decision.explain()["candidates"]
    assert explained["10.0.0.1:8000"]["metrics_trusted"] is False
    # Unknown KV usage scores as the trusted average (here the one fresh endpoint).
    assert decision.scores["kv_utilization"] == pytest.approx([0.6, 0.6, 0.6])


def test_a_stale_endpoint_is_judged_on_its_inflight_load() -> None:
    config = ScoringConfig(limits=FilterLimits(metrics_stale_after_s=1.0))
    busy_stale = _ep(1, metrics_age_s=5.0, inflight_requests=30, inflight_prefill_tokens=30_000)
    idle_fresh = _ep(2, waiting=0)
    decision = SchedulingPipeline(config).pick(_request(), [busy_stale, idle_fresh], {})
    assert decision.primary == "10.0.0.2:8000"


# --- scorers -------------------------------------------------------------------------------


def test_prefix_overlap_is_tier_weighted_and_bounded() -> None:
    tiers = TierWeights(gpu=1.0, cpu=0.8, storage=0.5)
    config = ScoringConfig(tiers=tiers)
    endpoints = [_ep(1), _ep(2), _ep(3), _ep(4), _ep(5)]
    matches = {
        "10.0.0.1:8000": PrefixMatch(10, 4, 4, 2),
        "10.0.0.2:8000": PrefixMatch(20, 20),
        "10.0.0.3:8000": PrefixMatch(25, 25),  # more than the prompt's blocks: capped
        "10.0.0.4:8000": PrefixMatch(5),  # total only: unattributed blocks count as GPU
    }
    request = _request(blocks=20)
    values = PrefixOverlapScorer().score(_candidates(endpoints, matches, request, config), request, config)
    assert values == pytest.approx([(4 + 4 * 0.8 + 2 * 0.5) / 20, 1.0, 1.0, 0.25, 0.0])


def test_prefix_overlap_of_a_prompt_shorter_than_a_block_is_zero() -> None:
    request = _request(blocks=0, tokens=7)
    candidates = _candidates([_ep(1)], {"10.0.0.1:8000": PrefixMatch(1, 1)}, request)
    assert PrefixOverlapScorer().score(candidates, request, ScoringConfig()) == [0.0]


def test_relative_to_best() -> None:
    assert relative_to_best([0, 1, 3]) == pytest.approx([1.0, 0.5, 0.25])
    assert relative_to_best([5, 5]) == [1.0, 1.0]
    # A negative (bad) load still lands in (0, 1].
    assert relative_to_best([-2, 0]) == pytest.approx([1.0, 1 / 3])


def test_queue_depth_counts_trusted_waiting_plus_inflight() -> None:
    endpoints = [_ep(1, waiting=3, inflight_requests=0), _ep(2, inflight_requests=1), _ep(3, running=50)]
    candidates = _candidates(endpoints)
    assert candidates.queue == [3, 1, 0]
    assert QueueDepthScorer().score(candidates, _request(), ScoringConfig()) == pytest.approx(
        [0.25, 0.5, 1.0]
    )


def test_kv_utilization_is_free_cache_clamped() -> None:
    endpoints = [_ep(1, kv_usage=0.25), _ep(2, kv_usage=1.3), _ep(3, kv_usage=-0.1)]
    values = KVUtilizationScorer().score(_candidates(endpoints), _request(), ScoringConfig())
    assert values == pytest.approx([0.75, 0.0, 1.0])


def test_inflight_load_counts_prefill_ahead_and_the_requests_uncached_part() -> None:
    request = _request(blocks=10, tokens=1000)
    endpoints = [_ep(1, inflight_prefill_tokens=500), _ep(2, inflight_prefill_tokens=500), _ep(3)]
    matches = {"10.0.0.1:8000": PrefixMatch(5, 5)}
    candidates = _candidates(endpoints, matches, request)
    assert candidates.prefill_work == pytest.approx([1000.0, 1500.0, 1000.0])
    values = InflightLoadScorer().score(candidates, request, ScoringConfig())
    assert values == pytest.approx([1.0, 1001 / 1501, 1.0])


def test_prefill_wait_is_a_ttft_estimate_in_milliseconds() -> None:
    from scheduler.core.scoring.prefill_wait import PrefillWaitScorer, estimated_prefill_ms

    rate = 10_000.0  # tokens per second
    request = _request(blocks=10, tokens=1000)
    endpoints = [
        _ep(1, queued_prefill_tokens=2000.0, prefill_tokens_per_s=rate),  # 200 ms queued ahead
        _ep(2, waiting=5, prefill_tokens_per_s=rate),  # a queue kvsched did not route
        _ep(3, waiting=5, prefill_tokens_per_s=rate, metrics_age_s=None),  # not trusted: stale
        _ep(4, prefill_tokens_per_s=rate),
    ]
    matches = {"10.0.0.4:8000": PrefixMatch(5, 5)}
    candidates = _candidates(endpoints, matches, request)
    # One 10 ms step, 8 ms per trusted waiting request, then prefill ahead and own at the rate.
    assert estimated_prefill_ms(candidates, request) == pytest.approx([310.0, 150.0, 110.0, 60.0])
    once = PrefillWaitScorer().score(candidates, request, ScoringConfig(own_prefill_weight=1.0))
    assert once == pytest.approx([61 / 311, 61 / 151, 61 / 111, 1.0])
    # By default the request's own prefill counts twice: 100, 100, 100 and 50 ms more.
    values = PrefillWaitScorer().score(candidates, request, ScoringConfig())
    assert values == pytest.approx([111 / 411, 111 / 251, 111 / 211, 1.0])


def test_prefill_wait_barely_separates_two_idle_endpoints_over_a_few_tokens() -> None:
    from scheduler.core.scoring.prefill_wait import PrefillWaitScorer

    # Five tokens routed to one of two idle endpoints are 0.2 ms of a ~10 ms first token.
    request = _request(blocks=0, tokens=5)
    endpoints = [_ep(1, queued_prefill_tokens=5.0), _ep(2)]
    values = PrefillWaitScorer().score(_candidates(endpoints, request=request), request, ScoringConfig())
    assert values[1] == 1.0 and 0.98 < values[0] < 1.0


def test_total_is_the_weight_normalised_sum() -> None:
    config = _weights(prefix_overlap=3.0, queue_depth=1.0)
    endpoints = [_ep(1, inflight_requests=1), _ep(2)]
    matches = {"10.0.0.1:8000": PrefixMatch(5, 5)}
    decision = SchedulingPipeline(config).pick(_request(blocks=10), endpoints, matches)
    assert decision.weights == {"prefix_overlap": 0.75, "queue_depth": 0.25}
    assert decision.totals == pytest.approx([0.75 * 0.5 + 0.25 * 0.5, 0.25 * 1.0])
    assert decision.primary == "10.0.0.1:8000"


def test_zero_weight_scorer_is_not_computed() -> None:
    decision = SchedulingPipeline(_weights(prefix_overlap=1.0)).pick(_request(), [_ep(1), _ep(2)], {})
    assert set(decision.scores) == {"prefix_overlap"}
    assert set(decision.explain()["candidates"]["10.0.0.1:8000"]["scores"]) == {"prefix_overlap"}


def test_all_weights_zero_is_least_loaded() -> None:
    endpoints = [
        _ep(1, inflight_requests=2),
        _ep(2, waiting=1),
        _ep(3, inflight_requests=1, waiting=1, inflight_prefill_tokens=10),
    ]
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10)}
    decision = SchedulingPipeline(_weights()).pick(_request(), endpoints, matches)
    assert decision.totals == [0.0, 0.0, 0.0]
    assert decision.endpoints == ["10.0.0.2:8000", "10.0.0.1:8000", "10.0.0.3:8000"]


# --- picking -------------------------------------------------------------------------------


def test_cached_prefix_wins_over_a_little_load() -> None:
    endpoints = [_ep(1), _ep(2, inflight_requests=2, inflight_prefill_tokens=300), _ep(3)]
    matches = {"10.0.0.2:8000": PrefixMatch(9, 9)}
    decision = SchedulingPipeline().pick(_request(blocks=10, tokens=160), endpoints, matches)
    assert decision.primary == "10.0.0.2:8000"


def test_load_still_matters_against_a_partial_hit() -> None:
    loaded = _ep(1, waiting=40, inflight_requests=20, inflight_prefill_tokens=40_000, kv_usage=0.9)
    endpoints = [loaded, _ep(2), _ep(3)]
    matches = {"10.0.0.1:8000": PrefixMatch(5, 5)}
    decision = SchedulingPipeline().pick(_request(blocks=10, tokens=2000), endpoints, matches)
    assert decision.primary != "10.0.0.1:8000"


def test_near_tie_goes_to_the_less_loaded() -> None:
    # One more cached block (1% of the prompt) and one more request in flight: totals within
    # tie_epsilon, so load decides.
    endpoints = [
        _ep(1, waiting=99, inflight_requests=11, inflight_prefill_tokens=5000),
        _ep(2, waiting=99, inflight_requests=10, inflight_prefill_tokens=5000),
    ]
    matches = {"10.0.0.1:8000": PrefixMatch(2, 2), "10.0.0.2:8000": PrefixMatch(1, 1)}
    request = _request(blocks=100, tokens=1600)
    decision = SchedulingPipeline().pick(request, endpoints, matches)
    assert decision.totals[0] > decision.totals[1]
    assert decision.primary == "10.0.0.2:8000"
    exact = SchedulingPipeline(ScoringConfig(tie_epsilon=0.0)).pick(request, endpoints, matches)
    assert exact.primary == "10.0.0.1:8000"


def test_equal_prefix_ties_go_to_the_least_loaded() -> None:
    # Every request shares its first block (the Mooncake trace): all endpoints match it.
    loads = [5, 3, 7, 1, 4, 6, 2, 8]
    endpoints = [_ep(i, inflight_requests=load) for i, load in enumerate(loads, 1)]
    matches = {e.name: PrefixMatch(1, 1) for e in endpoints}
    decision = SchedulingPipeline().pick(_request(blocks=40), endpoints, matches)
    assert decision.endpoints == ["10.0.0.4:8000", "10.0.0.7:8000", "10.0.0.2:8000"]


def test_equal_request_load_ties_break_on_inflight_prefill_tokens() -> None:
    endpoints = [
        _ep(1, inflight_requests=2, inflight_prefill_tokens=900),
        _ep(2, inflight_requests=2, inflight_prefill_tokens=100),
        _ep(3, inflight_requests=2, inflight_prefill_tokens=500),
    ]
    decision = SchedulingPipeline(_weights(prefix_overlap=1.0)).pick(_request(), endpoints, {})
    assert decision.endpoints == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.1:8000"]


def test_equal_load_ties_spread_over_request_ids_not_list_order() -> None:
    endpoints = [_ep(i) for i in range(1, 5)]
    matches = {e.name: PrefixMatch(1, 1) for e in endpoints}
    pipeline = SchedulingPipeline()
    primaries = Counter(
        pipeline.pick(_request(f"req-{n}", blocks=30), endpoints, matches).primary for n in range(400)
    )
    assert set(primaries) == {e.name for e in endpoints}
    # 100 expected each; a list-order tie-break would give one endpoint all 400.
    assert all(60 <= count <= 140 for count in primaries.values()), primaries


def test_tie_break_does_not_depend_on_input_order() -> None:
    endpoints = [_ep(i) for i in range(1, 9)]
    matches = {e.name: PrefixMatch(1, 1) for e in endpoints}
    pipeline = SchedulingPipeline()
    for n in range(50):
        request = _request(f"req-{n}")
        forward = pipeline.pick(request, endpoints, matches)
        backward = pipeline.pick(request, endpoints[::-1], matches)
        assert forward.endpoints == backward.endpoints
        # A fresh pipeline (another process, a replay) decides the same.
        assert SchedulingPipeline().pick(request, endpoints, matches).endpoints == forward.endpoints


def test_shared_first_block_workload_spreads_evenly() -> None:
    # Requests that share only their first block, picked in turn with kvsched's own
    # accounting updated after each pick (nothing finishes): the pool fills level.
    endpoints = {i: _ep(i) for i in range(1, 9)}
    pipeline = SchedulingPipeline()
    for n in range(64):
        matches = {e.name: PrefixMatch(1, 1) for e in endpoints.values()}
        decision = pipeline.pick(
            _request(f"mooncake-{n}", blocks=20, tokens=10_000), endpoints.values(), matches
        )
        index = int(decision.endpoints[0].split(".")[3].split(":")[0])
        state = endpoints[index]
        endpoints[index] = dataclasses.replace(
            state,
            inflight_requests=state.inflight_requests + 1,
            inflight_prefill_tokens=state.inflight_prefill_tokens + 10_000,
        )
    assert [e.inflight_requests for e in endpoints.values()] == [8] * 8


def test_fallbacks_are_distinct_and_capped_by_candidates() -> None:
    endpoints = [_ep(i, inflight_requests=i) for i in range(1, 6)]
    assert len(SchedulingPipeline().pick(_request(), endpoints, {}).endpoints) == 3
    config = ScoringConfig(num_fallbacks=8)
    decision = SchedulingPipeline(config).pick(_request(), endpoints, {})
    assert sorted(decision.endpoints) == sorted(e.name for e in endpoints)
    assert decision.endpoints[0] == "10.0.0.1:8000"
    solo = SchedulingPipeline(ScoringConfig(num_fallbacks=0)).pick(_request(), endpoints, {})
    assert solo.endpoints == ["10.0.0.1:8000"]


def test_softmax_is_deterministic_for_a_seed() -> None:
    config = ScoringConfig(mode="softmax", temperature=0.5)
    endpoints = [_ep(i, inflight_requests=i % 3) for i in range(1, 7)]
    pipeline = SchedulingPipeline(config)

    def run(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [pipeline.pick(_request(f"r{n}"), endpoints, {}, rng).endpoints for n in range(60)]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert len({order[0] for order in first}) > 1  # it does sample
    for order in first:
        assert len(set(order)) == len(order) == 3
    # Without an rng a request is seeded by its id: the same request, the same pick.
    again = [pipeline.pick(_request("same"), endpoints, {}).endpoints for _ in range(5)]
    assert all(order == again[0] for order in again)


def test_softmax_follows_the_scores() -> None:
    config = _weights(prefix_overlap=1.0).model_copy(update={"mode": "softmax", "temperature": 0.1})
    endpoints = [_ep(1), _ep(2)]
    matches = {"10.0.0.1:8000": PrefixMatch(2, 2)}  # totals 0.2 and 0: odds e^2 : 1
    pipeline = SchedulingPipeline(config)
    rng = random.Random(3)
    picks = Counter(pipeline.pick(_request(f"r{n}"), endpoints, matches, rng).primary for n in range(2000))
    share = picks["10.0.0.1:8000"] / 2000
    expected = 1 / (1 + 2.718281828**-2)
    assert abs(share - expected) < 0.05
    cold = SchedulingPipeline(config.model_copy(update={"temperature": 1e-4}))
    assert all(
        cold.pick(_request(f"r{n}"), endpoints, matches, rng).primary == "10.0.0.1:8000" for n in range(50)
    )


# --- decisions and explanations ------------------------------------------------------------


def test_explanation_lists_scores_weights_and_filters() -> None:
    endpoints = [_ep(1, inflight_requests=1), _ep(2), _ep(3, healthy=False), _ep(4)]
    matches = {"10.0.0.1:8000": PrefixMatch(6, 4, 2)}
    request = _request(blocks=8, tokens=128, subset=frozenset(e.address for e in endpoints[:3]))
    decision = SchedulingPipeline().pick(request, endpoints, matches)
    explained = json.loads(json.dumps(decision.explain()))
    assert explained["endpoints"] == decision.endpoints
    assert explained["addresses"] == decision.addresses
    assert explained["saturated"] is False and explained["reason"] == "" and explained["mode"] == "max_score"
    assert explained["filtered"] == {"10.0.0.3:8000": "unhealthy", "10.0.0.4:8000": "not in subset hint"}
    assert set(explained["candidates"]) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert sum(explained["weights"].values()) == pytest.approx(1.0)
    first = explained["candidates"]["10.0.0.1:8000"]
    weighted = {name for name, weight in ScoringConfig().weights.items() if weight > 0}
    # Scorers that read predictions sit out a pick made without a latency estimator, and
    # those that read the request's LoRA adapter a request that names none.
    expected = {
        spec.name for spec in SCORERS.specs() if not spec.needs_predictions and not spec.needs_adapter
    }
    assert set(first["scores"]) == set(explained["weights"]) == expected & weighted
    assert first["matched_blocks"] == pytest.approx(4 + 2 * 0.8)
    assert first["queue"] == 1
    assert first["metrics_trusted"] is True
    for name, raw in first["scores"].items():
        assert first["weighted"][name] == pytest.approx(raw * explained["weights"][name], abs=1e-5)
    assert first["total"] == pytest.approx(sum(first["weighted"].values()), abs=1e-5)
    assert explained["candidates"][decision.endpoints[0]]["total"] == max(
        c["total"] for c in explained["candidates"].values()
    )


def test_empty_decision_explains_its_reason() -> None:
    decision = SchedulingPipeline().pick(_request(), [_ep(1, healthy=False)], {})
    explained = json.loads(json.dumps(decision.explain()))
    assert explained["endpoints"] == [] and explained["candidates"] == {}
    assert explained["reason"] == "no healthy endpoint"
    assert explained["filtered"] == {"10.0.0.1:8000": "unhealthy"}


# --- configuration and plumbing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"weights": {"prefix_overlap": -1}}, "weights.prefix_overlap"),
        ({"weights": {"prefix": 1}}, "weights.prefix"),
        ({"tiers": {"cpu": 1.5}}, "tiers.cpu"),
        ({"limits": {"max_kv_usage": 0}}, "limits.max_kv_usage"),
        ({"limits": {"metrics_stale_after_s": -1}}, "limits.metrics_stale_after_s"),
        ({"mode": "best"}, "mode"),
        ({"temperature": 0}, "temperature"),
        ({"num_fallbacks": -1}, "num_fallbacks"),
        ({"tie_epsilon": 2}, "tie_epsilon"),
        ({"picker": {}}, "picker"),
    ],
)
def test_config_errors_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        ScoringConfig.model_validate(raw)
    locations = {".".join(str(part) for part in e["loc"]) for e in error.value.errors()}
    assert locations == {field}
    assert field in str(error.value)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_weight_that_is_not_a_finite_number_is_refused_as_such(weight: float) -> None:
    """A NaN weight was refused as "greater than or equal to 0", which it does not say."""
    with pytest.raises(ValidationError) as error:
        ScoringConfig.model_validate({"weights": {"prefix_overlap": weight}})
    (problem,) = error.value.errors()
    assert problem["loc"] == ("weights", "prefix_overlap")
    assert problem["msg"] == "Input should be a finite number"


def test_config_fields_are_documented() -> None:
    for model in (ScoringConfig, TierWeights, FilterLimits):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
    for spec in SCORERS.specs():
        assert spec.description and "\n" not in spec.description, f"scorer {spec.name} has no description"


def test_with_config_swaps_configuration_and_keeps_plugins() -> None:
    pipeline = SchedulingPipeline()
    endpoints = [_ep(i, inflight_requests=i) for i in range(1, 5)]
    swapped = pipeline.with_config(ScoringConfig(num_fallbacks=0))
    assert swapped is not pipeline
    assert swapped.filters == pipeline.filters and swapped.scorers == pipeline.scorers
    assert len(swapped.pick(_request(), endpoints, {}).endpoints) == 1
    assert len(pipeline.pick(_request(), endpoints, {}).endpoints) == 3  # the old one is untouched


class _ClassFilter:
    """Only endpoints of one class, e.g. decode workers."""

    name = "endpoint_class"
    soft = False
    empty_reason = "no endpoint of the wanted class"

    def __init__(self, wanted: str) -> None:
        self.wanted = wanted

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        return {
            i: f"class {s.endpoint_class}" for i, s in enumerate(states) if s.endpoint_class != self.wanted
        }


class _ZoneAffinityScorer:
    """Prefers endpoints labelled zone=a: a scorer from outside the package."""

    name = "zone_affinity"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return [1.0 if s.labels.get("zone") == "a" else 0.0 for s in candidates.states]


@pytest.fixture
def zone_affinity() -> Iterator[None]:
    register_scorer(
        "zone_affinity", _ZoneAffinityScorer, weight=0.0, description="Endpoints in zone a first."
    )
    yield
    SCORERS.remove("zone_affinity")


def test_custom_filters_and_scorers_plug_in(zone_affinity: None) -> None:
    endpoints = [
        _ep(1, endpoint_class="prefill"),
        _ep(2, endpoint_class="decode", labels={"zone": "b"}),
        _ep(3, endpoint_class="decode", labels={"zone": "a"}),
    ]
    pipeline = SchedulingPipeline(
        _weights(zone_affinity=1.0), filters=[_ClassFilter("decode")], scorers=[_ZoneAffinityScorer()]
    )
    decision = pipeline.pick(_request(), endpoints, {})
    assert decision.endpoints == ["10.0.0.3:8000", "10.0.0.2:8000"]
    assert decision.filtered == {"10.0.0.1:8000": "class prefill"}
    assert decision.weights == {"zone_affinity": 1.0}
    none_left = pipeline.pick(_request(), endpoints[:1], {})
    assert none_left.endpoints == [] and none_left.reason == "no endpoint of the wanted class"


def test_a_registered_scorer_joins_the_default_pipeline_with_its_weight(zone_affinity: None) -> None:
    # Two identical endpoints apart from their zone; the load tie-break alone would split them.
    endpoints = [_ep(1, labels={"zone": "b"}), _ep(2, labels={"zone": "a"})]
    # Its default weight is 0: registered, built, but not weighed and not explained.
    unweighted = SchedulingPipeline().pick(_request(), endpoints, {})
    assert "zone_affinity" in [s.name for s in SchedulingPipeline().scorers]
    assert "zone_affinity" not in unweighted.weights
    # Weighted from a configuration file's mapping, as any built-in is.
    config = ScoringConfig.model_validate({"weights": {"zone_affinity": 3}})
    assert config.weights["zone_affinity"] == 3.0 and config.weights["prefix_overlap"] == 1.0
    for i in range(8):
        decision = SchedulingPipeline(config).pick(_request(f"r{i}"), endpoints, {})
        assert decision.primary == "10.0.0.2:8000"
        assert decision.scores["zone_affinity"] == [0.0, 1.0]


def test_scorer_names_are_registered_once_and_weights_name_only_registered_scorers() -> None:
    with pytest.raises(ValueError, match="a scorer named 'queue_depth' is already registered"):
        register_scorer("queue_depth", QueueDepthScorer, weight=1.0, description="again")
    with pytest.raises(ValueError, match="snake_case"):
        register_scorer("zoneAffinity", _ZoneAffinityScorer, weight=0.0, description="camelCase")
    with pytest.raises(ValidationError, match=r"no scorer named 'slo_urgency' is registered \(registered: "):
        ScoringConfig.model_validate({"weights": {"slo_urgency": 1.0}})
    with pytest.raises(ValueError, match="no scorer named 'slo_urgency'"):
        ScorerWeights(slo_urgency=1.0)
    assert "zone_affinity" not in SCORERS  # the fixture cleaned up after the tests above


def test_scorers_need_a_configured_weight_and_unique_names() -> None:
    class Unknown:
        name = "slo_headroom"

        def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
            return [1.0] * len(candidates)

    with pytest.raises(ValueError, match="slo_headroom"):
        SchedulingPipeline(scorers=[Unknown()])
    with pytest.raises(ValueError, match="unique"):
        SchedulingPipeline(scorers=[QueueDepthScorer(), QueueDepthScorer()])


def test_input_sequence_is_not_modified() -> None:
    endpoints = [_ep(1, healthy=False), _ep(2), _ep(3, waiting=10_000)]
    snapshot = list(endpoints)
    SchedulingPipeline().pick(_request(), endpoints, {})
    assert endpoints == snapshot


# --- latency predictions and SLOs ----------------------------------------------------------


class _TableEstimator:
    """Predicts fixed latencies per endpoint name: the pipeline's side of the predictor."""

    def __init__(self, ttft_ms: dict[str, float], tpot_ms: dict[str, float] | None = None) -> None:
        self.ttft_ms, self.tpot_ms, self.calls = ttft_ms, tpot_ms or {}, 0

    def estimate(self, candidates: Candidates, request: PickRequest) -> LatencyEstimate:
        self.calls += 1
        names = [s.name for s in candidates.states]
        return LatencyEstimate(
            [self.ttft_ms[n] for n in names], [self.tpot_ms.get(n, 10.0) for n in names], "table"
        )


def test_slo_request_goes_to_a_candidate_predicted_to_meet_it_over_a_better_cache_hit() -> None:
    endpoints = [_ep(1), _ep(2), _ep(3)]
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10, 0)}  # a full hit, but a slow endpoint
    estimator = _TableEstimator({"10.0.0.1:8000": 900.0, "10.0.0.2:8000": 300.0, "10.0.0.3:8000": 80.0})
    without_slo = SchedulingPipeline().pick(_request(), endpoints, matches, estimator=estimator)
    assert without_slo.primary == "10.0.0.1:8000"
    with_slo = SchedulingPipeline().pick(_request(slo_ttft_ms=400.0), endpoints, matches, estimator=estimator)
    assert with_slo.primary in {"10.0.0.2:8000", "10.0.0.3:8000"}
    assert with_slo.endpoints[-1] == "10.0.0.1:8000"
    assert with_slo.slo_feasible == [False, True, True] and with_slo.slo_note == ""
    explained = with_slo.explain()
    assert explained["candidates"]["10.0.0.1:8000"]["meets_slo"] is False
    assert explained["candidates"]["10.0.0.3:8000"]["predicted_ttft_ms"] == 80.0


def test_slo_margin_leaves_room_for_prediction_error() -> None:
    endpoints = [_ep(1), _ep(2)]
    estimator = _TableEstimator({"10.0.0.1:8000": 95.0, "10.0.0.2:8000": 50.0})
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10, 0)}
    request = _request(slo_ttft_ms=100.0)
    strict = SchedulingPipeline(ScoringConfig(slo_margin=0.1)).pick(
        request, endpoints, matches, estimator=estimator
    )
    assert strict.slo_feasible == [False, True] and strict.primary == "10.0.0.2:8000"
    loose = SchedulingPipeline(ScoringConfig(slo_margin=0.0)).pick(
        request, endpoints, matches, estimator=estimator
    )
    assert loose.slo_feasible == [True, True] and loose.primary == "10.0.0.1:8000"


def test_when_no_candidate_can_meet_the_slo_the_usual_score_or_the_fastest_decides() -> None:
    endpoints = [_ep(1), _ep(2), _ep(3)]
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10, 0)}
    estimator = _TableEstimator({"10.0.0.1:8000": 900.0, "10.0.0.2:8000": 300.0, "10.0.0.3:8000": 500.0})
    request = _request(slo_ttft_ms=100.0)
    by_score = SchedulingPipeline().pick(request, endpoints, matches, estimator=estimator)
    assert by_score.primary == "10.0.0.1:8000"  # the cache hit, as without an SLO
    assert by_score.slo_note and by_score.slo_feasible == [False, False, False]
    fastest = SchedulingPipeline(ScoringConfig(slo_unmeetable="fastest"))
    decision = fastest.pick(request, endpoints, matches, estimator=estimator)
    assert decision.endpoints == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.1:8000"]


def test_tpot_slo_counts_too() -> None:
    endpoints = [_ep(1), _ep(2)]
    estimator = _TableEstimator(
        {"10.0.0.1:8000": 50.0, "10.0.0.2:8000": 50.0}, {"10.0.0.1:8000": 40.0, "10.0.0.2:8000": 15.0}
    )
    matches = {"10.0.0.1:8000": PrefixMatch(10, 10, 0)}
    decision = SchedulingPipeline().pick(_request(slo_tpot_ms=20.0), endpoints, matches, estimator=estimator)
    assert decision.primary == "10.0.0.2:8000" and decision.slo_feasible == [False, True]


def test_predicted_latency_scorer_runs_only_with_an_estimator() -> None:
    endpoints = [_ep(1), _ep(2)]
    config = _weights(predicted_latency=1.0, queue_depth=1.0)
    pipeline = SchedulingPipeline(config)
    estimator = _TableEstimator({"10.0.0.1:8000": 400.0, "10.0.0.2:8000": 100.0})
    predicted = pipeline.pick(_request(), endpoints, {}, estimator=estimator)
    assert predicted.primary == "10.0.0.2:8000"
    assert predicted.scores["predicted_latency"] == pytest.approx([(100.0 + 1) / (400.0 + 1), 1.0])
    assert predicted.predicted == (100.0, 10.0, "table")
    plain = pipeline.pick(_request(), endpoints, {})
    assert set(plain.weights) == {"queue_depth"} and plain.predicted is None
    assert estimator.calls == 1


def test_the_built_in_scorers_are_registered_whatever_module_is_imported_first() -> None:
    # The configuration validates weights against the registry, which the scorers' module
    # fills: importing the configuration alone must already see them (via the package).
    code = "from scheduler.core.scoring.config import ScoringConfig\nprint(sorted(ScoringConfig().weights))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[0] == str(sorted(SCORERS.names()))


def test_weighted_totals_of_five_scorers_add_as_the_general_loop_does() -> None:
    import random as _random

    from scheduler.core.scoring.pipeline import weighted_totals

    rng = _random.Random(7)
    for _ in range(200):
        count = rng.randrange(1, 20)
        values = [[rng.random() for _ in range(count)] for _ in range(5)]
        weights = [rng.choice([0.5, 1.0, 1.5, 3.0, rng.random()]) for _ in range(5)]
        weight_sum = 0.0
        for weight in weights:
            weight_sum += weight
        expected = []
        for i in range(count):
            total = weights[0] * values[0][i]
            for weight, column in zip(weights[1:], values[1:], strict=True):
                total += weight * column[i]
            expected.append(total / weight_sum)
        assert weighted_totals(values, weights, weight_sum, count) == expected


# --- balance guard -------------------------------------------------------------------------


def _agent_step() -> tuple[list[EndpointState], dict[str, PrefixMatch], PickRequest]:
    """An agent loop's step: its 4k-token history (250 blocks of 16) cached on a holder
    running a few more requests than the guard allows over idle endpoints (nearly all of
    them decoding, little prefill queued), the other endpoints idle."""
    running = ScoringConfig().balance.abs_requests + 4
    holder = _ep(
        1, inflight_requests=running, inflight_decode_requests=running - 2, inflight_prefill_tokens=600
    )
    endpoints = [holder, _ep(2), _ep(3)]
    matches = {holder.name: PrefixMatch(250, 250)}
    return endpoints, matches, _request("agent-7-3", blocks=260, tokens=4200)


def test_an_overloaded_holder_loses_the_primary_to_the_least_loaded() -> None:
    endpoints, matches, request = _agent_step()
    # Without the guard the hit wins: recomputing 4k tokens elsewhere costs more than the
    # holder's short prefill queue.
    off = ScoringConfig(balance=BalanceGuard(abs_requests=0))
    assert SchedulingPipeline(off).pick(request, endpoints, matches).primary == "10.0.0.1:8000"
    decision = SchedulingPipeline().pick(request, endpoints, matches)
    assert decision.primary in ("10.0.0.2:8000", "10.0.0.3:8000")
    # Ranked last, still a fallback.
    assert decision.endpoints[-1] == "10.0.0.1:8000"


def test_a_holder_within_the_imbalance_limits_keeps_its_requests() -> None:
    endpoints, matches, request = _agent_step()
    guard = ScoringConfig().balance
    # Just within the absolute limit over idle endpoints.
    within = [dataclasses.replace(endpoints[0], inflight_requests=guard.abs_requests), *endpoints[1:]]
    assert SchedulingPipeline().pick(request, within, matches).primary == "10.0.0.1:8000"
    # Far more requests than the others, but less than rel times theirs.
    running = endpoints[0].inflight_requests
    busy = [
        endpoints[0],
        *(dataclasses.replace(e, inflight_requests=int(running / guard.rel) + 1) for e in endpoints[1:]),
    ]
    assert SchedulingPipeline().pick(request, busy, matches).primary == "10.0.0.1:8000"


def test_the_balance_guard_counts_scraped_waiting_requests() -> None:
    endpoints, matches, request = _agent_step()
    running = endpoints[0].inflight_requests
    holder = dataclasses.replace(
        endpoints[0], inflight_requests=4, inflight_decode_requests=4, waiting=running - 4
    )
    decision = SchedulingPipeline().pick(request, [holder, *endpoints[1:]], matches)
    assert decision.primary != "10.0.0.1:8000"


def test_a_step_stays_on_its_history_until_the_queue_outweighs_twice_its_recompute() -> None:
    # A 4,160-token history (260 blocks of 16): 250 blocks cached on the holder behind
    # 3,000 queued prefill tokens; the first 128 blocks (the shared tool prompt) cached on
    # an idle endpoint. Priced alone, the step waits 3,000 + 160 tokens on the holder and
    # 2,112 elsewhere; counting its recompute again as the wait it adds for what follows it
    # there, 3,000 + 320 against 4,224.
    holder = _ep(1, inflight_requests=2, queued_prefill_tokens=3000.0)
    other = _ep(2, inflight_requests=2)
    matches = {holder.name: PrefixMatch(250, 250), other.name: PrefixMatch(128, 128)}
    request = _request("agent-3-5", blocks=260, tokens=4160)
    once = ScoringConfig(weights=ScorerWeights.only(prefill_wait=1.0), own_prefill_weight=1.0)
    assert SchedulingPipeline(once).pick(request, [holder, other], matches).primary == other.name
    twice = _weights(prefill_wait=1.0)
    assert twice.own_prefill_weight == 2.0
    assert SchedulingPipeline(twice).pick(request, [holder, other], matches).primary == holder.name
    # ... and the defaults keep it too.
    assert SchedulingPipeline().pick(request, [holder, other], matches).primary == holder.name
