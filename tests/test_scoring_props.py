"""Properties of the scoring pipeline over random endpoint snapshots and configurations."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.scoring import (
    EndpointState,
    FilterLimits,
    PickRequest,
    PrefixMatch,
    SchedulingPipeline,
    ScorerWeights,
    ScoringConfig,
    TierWeights,
)


@dataclass(frozen=True)
class Case:
    endpoints: list[EndpointState]
    matches: dict[str, PrefixMatch]
    request: PickRequest
    config: ScoringConfig


unit = st.floats(0.0, 1.0, allow_nan=False)
weight = st.one_of(st.just(0.0), st.floats(0.0, 10.0, allow_nan=False))


@st.composite
def configs(draw: st.DrawFn) -> ScoringConfig:
    return ScoringConfig(
        weights=ScorerWeights(
            prefix_overlap=draw(weight),
            queue_depth=draw(weight),
            kv_utilization=draw(weight),
            inflight_load=draw(weight),
        ),
        tiers=TierWeights(gpu=draw(unit), cpu=draw(unit), storage=draw(unit)),
        limits=FilterLimits(
            max_waiting=draw(st.integers(0, 50)),
            max_kv_usage=draw(st.floats(0.05, 1.0)),
            metrics_stale_after_s=draw(st.floats(0.1, 5.0)),
        ),
        mode=draw(st.sampled_from(["max_score", "softmax"])),
        temperature=draw(st.floats(0.01, 2.0)),
        num_fallbacks=draw(st.integers(0, 8)),
        tie_epsilon=draw(st.floats(0.0, 0.2)),
    )


@st.composite
def cases(draw: st.DrawFn, mode: str | None = None) -> Case:
    count = draw(st.integers(0, 24))
    blocks = draw(st.integers(0, 64))
    endpoints: list[EndpointState] = []
    matches: dict[str, PrefixMatch] = {}
    for i in range(count):
        name = f"10.0.{i // 200}.{i % 200}:8000"
        endpoints.append(
            EndpointState(
                name=name,
                address=name,
                waiting=draw(st.integers(0, 200)),
                running=draw(st.integers(0, 300)),
                kv_usage=draw(st.floats(-0.2, 1.2, allow_nan=False)),
                metrics_age_s=draw(st.one_of(st.none(), st.floats(0.0, 10.0))),
                healthy=draw(st.sampled_from([True, True, True, False])),
                inflight_requests=draw(st.integers(0, 100)),
                inflight_prefill_tokens=draw(st.integers(0, 500_000)),
            )
        )
        if draw(st.booleans()):
            gpu = draw(st.integers(0, blocks + 4))
            cpu = draw(st.integers(0, 4))
            storage = draw(st.integers(0, 4))
            matches[name] = PrefixMatch(gpu + cpu + storage, gpu, cpu, storage)
    names = [e.address for e in endpoints]
    subset = draw(
        st.one_of(st.none(), st.frozensets(st.sampled_from(names)) if names else st.just(frozenset()))
    )
    request = PickRequest(
        request_id=draw(st.text(min_size=1, max_size=12)),
        prompt_blocks=blocks,
        prompt_tokens=blocks * 16 + draw(st.integers(0, 15)),
        subset=subset,
    )
    config = draw(configs())
    if mode is not None:
        config = config.model_copy(update={"mode": mode})
    return Case(endpoints, matches, request, config)


def _eligible(case: Case) -> set[str]:
    subset = case.request.subset
    return {e.name for e in case.endpoints if e.healthy and (subset is None or e.address in subset)}


@settings(max_examples=300, deadline=None)
@given(cases())
def test_scores_totals_and_endpoints_are_well_formed(case: Case) -> None:
    decision = SchedulingPipeline(case.config).pick(
        case.request, case.endpoints, case.matches, random.Random(0)
    )
    eligible = _eligible(case)
    assert len(set(decision.endpoints)) == len(decision.endpoints)
    assert set(decision.endpoints) <= eligible
    assert not set(decision.endpoints) & set(decision.filtered)
    by_name = {e.name: e for e in case.endpoints}
    assert decision.addresses == [by_name[name].address for name in decision.endpoints]
    if not eligible:
        assert decision.endpoints == [] and decision.reason
        return
    assert len(decision.endpoints) == min(1 + case.config.num_fallbacks, len(decision.totals))
    for name, values in decision.scores.items():
        assert len(values) == len(decision.totals), name
        assert all(0.0 <= v <= 1.0 for v in values), (name, values)
    assert all(0.0 <= total <= 1.0 for total in decision.totals)
    if decision.weights:
        assert abs(sum(decision.weights.values()) - 1.0) < 1e-9
    json.dumps(decision.explain())


@settings(max_examples=300, deadline=None)
@given(cases(mode="max_score"))
def test_primary_is_within_the_tie_band_of_the_best(case: Case) -> None:
    decision = SchedulingPipeline(case.config).pick(case.request, case.endpoints, case.matches)
    if not decision.endpoints or decision.saturated:
        return
    assert decision.candidates is not None
    # The balance guard's overloaded candidates rank after every other one.
    overloaded = set(decision.overloaded)
    totals = {
        s.name: total - (1.0 if s.name in overloaded else 0.0)
        for s, total in zip(decision.candidates.states, decision.totals, strict=True)
    }
    assert totals[decision.endpoints[0]] >= max(totals.values()) - case.config.tie_epsilon
    # Each fallback is within the band of the best not yet listed.
    remaining = dict(totals)
    for name in decision.endpoints:
        assert remaining[name] >= max(remaining.values()) - case.config.tie_epsilon
        del remaining[name]


@settings(max_examples=200, deadline=None)
@given(cases(mode="max_score"), st.randoms(use_true_random=False))
def test_decision_does_not_depend_on_input_order(case: Case, shuffler: random.Random) -> None:
    pipeline = SchedulingPipeline(case.config)
    shuffled = list(case.endpoints)
    shuffler.shuffle(shuffled)
    first = pipeline.pick(case.request, case.endpoints, case.matches)
    second = SchedulingPipeline(case.config).pick(case.request, shuffled, case.matches)
    assert first.endpoints == second.endpoints
    assert first.saturated == second.saturated
    assert first.filtered == second.filtered


@settings(max_examples=200, deadline=None)
@given(cases(), st.integers(0, 2**32))
def test_same_seed_same_decision(case: Case, seed: int) -> None:
    pipeline = SchedulingPipeline(case.config)
    first = pipeline.pick(case.request, case.endpoints, case.matches, random.Random(seed))
    second = SchedulingPipeline(case.config).pick(
        case.request, case.endpoints, case.matches, random.Random(seed)
    )
    assert first.endpoints == second.endpoints


@settings(max_examples=200, deadline=None)
@given(cases())
def test_saturation_flag_means_every_candidate_is_over_a_limit(case: Case) -> None:
    decision = SchedulingPipeline(case.config).pick(case.request, case.endpoints, case.matches)
    if decision.candidates is None:
        return
    limits = case.config.limits
    over = [
        trusted and (s.waiting > limits.max_waiting or s.kv_usage > limits.max_kv_usage)
        for s, trusted in zip(decision.candidates.states, decision.candidates.trusted, strict=True)
    ]
    if decision.saturated:
        assert all(over)
        assert set(decision.over_limit) == {s.name for s in decision.candidates.states}
        # Listed least loaded first.
        queue = dict(
            zip((s.name for s in decision.candidates.states), decision.candidates.queue, strict=True)
        )
        loads = [queue[name] for name in decision.endpoints]
        assert loads == sorted(loads)
    else:
        assert not any(over)
