"""``llmd``: llm-d's precise-prefix-cache profile, scorer by scorer, and its max-score picker."""

from __future__ import annotations

import random
from collections import Counter

from scheduler.core.index import PrefixMatch
from scheduler.core.latency import PredictorEstimator
from scheduler.core.policies import PolicyInput, PolicySetup, create_policy
from scheduler.core.policies.llmd import normalized_prefix_scores, prefix_raw_score, queue_scores
from scheduler.core.predictor import LatencyPredictor, PredictorConfig
from scheduler.core.scoring import EndpointState, PickRequest, ScoringConfig

BLOCK = 16


def _ep(i: int, **fields: object) -> EndpointState:
    return EndpointState(f"e{i}", f"10.0.0.{i}:8000", metrics_age_s=0.1, **fields)  # type: ignore[arg-type]


def _route(
    endpoints: list[EndpointState], matches: dict[str, PrefixMatch] | None = None, seed: int = 0
) -> list[str]:
    estimator = PredictorEstimator(LatencyPredictor(PredictorConfig()), BLOCK, lambda _: 0)
    data = PolicyInput(
        PickRequest("r", 10, 10 * BLOCK),
        endpoints,
        matches or {},
        lambda _: 0,
        random.Random(seed),
        estimator,
        len(endpoints),
        list(range(10)),
        0.0,
    )
    return create_policy(PolicySetup("llmd", ScoringConfig(), BLOCK)).route(data).endpoints


def test_prefix_scores_are_min_max_normalised_over_the_pods_with_a_hit() -> None:
    names = ["a", "b", "c", "d"]
    # Hits of 8 and 2 blocks: the longer 1, the shorter 0 like the pods holding nothing.
    assert normalized_prefix_scores({"a": 8.0, "b": 2.0}, names) == [1.0, 0.0, 0.0, 0.0]
    assert normalized_prefix_scores({"a": 8.0, "b": 2.0, "c": 5.0}, names) == [1.0, 0.0, 0.5, 0.0]
    # One pod with a hit, or equal hits: 1.0 each.
    assert normalized_prefix_scores({"c": 3.0}, names) == [0.0, 0.0, 1.0, 0.0]
    assert normalized_prefix_scores({"a": 3.0, "d": 3.0}, names) == [1.0, 0.0, 0.0, 1.0]
    assert normalized_prefix_scores({}, names) == [0.0] * 4


def test_a_block_counts_by_its_tier_as_llm_d_kv_cache_weighs_it() -> None:
    # 6 blocks in GPU memory, 3 in CPU memory (0.8 each), 1 in storage (unlisted: 1.0).
    assert prefix_raw_score(PrefixMatch(10, 6, 3, 1)) == 6 + 3 * 0.8 + 1


def test_queue_scores_are_min_max_normalised_with_a_neutral_one_when_equal() -> None:
    assert queue_scores([0, 4, 2]) == [1.0, 0.0, 0.5]
    assert queue_scores([3, 3]) == [1.0, 1.0]


def test_prefix_weight_two_outweighs_both_load_signals_at_their_worst() -> None:
    hit = {"e1": PrefixMatch(10, 10, 0, 0)}
    # e1: 2 x 1 + (1 - 0.95) + 0 = 2.05; e2: 0 + 1 + 1 = 2.0. The hit wins by a hair.
    assert _route([_ep(1, kv_usage=0.95, waiting=6), _ep(2, waiting=0)], hit) == ["e1", "e2"]
    # A full cache and the longest queue leave e1 at exactly 2.0: a tie, drawn at random.
    tied = Counter(_route([_ep(1, kv_usage=1.0, waiting=6), _ep(2)], hit, seed=s)[0] for s in range(200))
    assert set(tied) == {"e1", "e2"}


def test_the_kv_utilisation_scorer_prefers_the_emptier_cache() -> None:
    assert _route([_ep(1, kv_usage=0.7), _ep(2, kv_usage=0.2), _ep(3, kv_usage=0.5)]) == ["e2", "e3", "e1"]


def test_equal_totals_are_broken_at_random_by_the_seeded_shuffle() -> None:
    endpoints = [_ep(i) for i in range(1, 5)]
    primaries = Counter(_route(endpoints, seed=seed)[0] for seed in range(400))
    assert set(primaries) == {"e1", "e2", "e3", "e4"} and min(primaries.values()) > 60
    assert _route(endpoints, seed=3) == _route(endpoints, seed=3)


def test_prefix_normalisation_spans_pods_outside_the_candidates() -> None:
    # e3 is unhealthy but holds the longest prefix: it sets the maximum, so e1's 4-block hit
    # scores (4 - 4) / (8 - 4) = 0 and e2's emptier cache wins.
    matches = {"e1": PrefixMatch(4, 4, 0, 0), "e3": PrefixMatch(8, 8, 0, 0)}
    endpoints = [_ep(1, kv_usage=0.5), _ep(2, kv_usage=0.1), _ep(3, healthy=False)]
    assert _route(endpoints, matches)[0] == "e2"
