"""``vllm_router_kv_aware``: the longest cached prefix wins, else the least loaded; Rust's
tie rules; speculative entries for 2 s."""

from __future__ import annotations

import random

from scheduler.core.index import PrefixMatch
from scheduler.core.latency import PredictorEstimator
from scheduler.core.policies import PolicyInput, PolicySetup, Routing, create_policy
from scheduler.core.policies.vllm_router_kv_aware import VllmRouterKVAware
from scheduler.core.predictor import LatencyPredictor, PredictorConfig
from scheduler.core.scoring import EndpointState, PickRequest, ScoringConfig

BLOCK = 16


def _ep(i: int, load: int = 0, **fields: object) -> EndpointState:
    return EndpointState(
        f"e{i}",
        f"10.0.0.{i}:8000",
        metrics_age_s=0.1,
        inflight_requests=load,
        **fields,  # type: ignore[arg-type]
    )


def _route(
    policy: VllmRouterKVAware,
    endpoints: list[EndpointState],
    keys: list[int],
    matches: dict[str, PrefixMatch] | None = None,
    now: float = 0.0,
) -> Routing:
    estimator = PredictorEstimator(LatencyPredictor(PredictorConfig()), BLOCK, lambda _: 0)
    data = PolicyInput(
        PickRequest("r", len(keys), max(len(keys), 1) * BLOCK),
        endpoints,
        matches or {},
        lambda _: 0,
        random.Random(0),
        estimator,
        len(endpoints),
        keys,
        now,
    )
    return policy.route(data)


def _policy() -> VllmRouterKVAware:
    policy = create_policy(PolicySetup("vllm_router_kv_aware", ScoringConfig(), BLOCK))
    assert isinstance(policy, VllmRouterKVAware)
    return policy


def test_the_longest_prefix_wins_whatever_the_load() -> None:
    endpoints = [_ep(1, load=50), _ep(2, load=0), _ep(3, load=1)]
    matches = {"e1": PrefixMatch(3, 3, 0, 0), "e3": PrefixMatch(1, 1, 0, 0)}
    routed = _route(_policy(), endpoints, [10, 11, 12, 13], matches)
    assert routed.endpoints == ["e1", "e2", "e3"]  # then the rest by load
    assert routed.explanation["prefix_blocks"] == {"e1": 3, "e2": 0, "e3": 1}


def test_equal_best_prefixes_go_to_the_last_in_worker_order_as_rusts_max_by_key_does() -> None:
    matches = {"e1": PrefixMatch(2, 2, 0, 0), "e2": PrefixMatch(2, 2, 0, 0)}
    assert _route(_policy(), [_ep(1), _ep(2), _ep(3)], [1, 2, 3], matches).endpoints[0] == "e2"


def test_no_hit_goes_to_the_first_least_loaded() -> None:
    endpoints = [_ep(1, load=2), _ep(2, load=1), _ep(3, load=1)]
    assert _route(_policy(), endpoints, [1, 2, 3]).endpoints[0] == "e2"
    # A prompt under one full block is not scored at all.
    assert _route(_policy(), endpoints, []).endpoints[0] == "e2"


def test_speculative_entries_steer_the_same_prefix_for_two_seconds() -> None:
    policy = _policy()
    endpoints = [_ep(1), _ep(2, load=3), _ep(3, load=1)]
    keys = [7, 8, 9]
    first = _route(policy, endpoints, keys, now=10.0)
    assert first.endpoints[0] == "e1"  # no hit anywhere: least loaded
    # Before e1's KV events arrive, the same prompt follows the speculative entries, even
    # though e1 is now the busiest.
    busy = [_ep(1, load=9), _ep(2, load=3), _ep(3, load=1)]
    assert _route(policy, busy, keys, now=11.5).endpoints[0] == "e1"
    assert _route(policy, busy, keys, now=11.5).explanation["prefix_blocks"] == {"e1": 3, "e2": 0, "e3": 0}
    # A full hit adds no entries, so those of t=10 expire at 12: at 12.1 the least loaded.
    assert _route(policy, busy, keys, now=12.1).endpoints[0] == "e3"


def test_speculative_entries_extend_a_real_prefix_from_its_end() -> None:
    policy = _policy()
    endpoints = [_ep(1), _ep(2)]
    held = {"e2": PrefixMatch(1, 1, 0, 0)}
    # e2 holds block 0 for real; blocks 1..3 go in speculatively.
    assert _route(policy, endpoints, [5, 6, 7, 8], held, now=0.0).endpoints[0] == "e2"
    assert _route(policy, endpoints, [5, 6, 7, 8], held, now=1.0).explanation["prefix_blocks"] == {
        "e1": 0,
        "e2": 4,
    }


def test_a_single_healthy_worker_is_chosen_without_scoring() -> None:
    routed = _route(_policy(), [_ep(1, healthy=False), _ep(2, load=9)], [1, 2])
    assert routed.endpoints == ["e2"] and "prefix_blocks" not in routed.explanation
