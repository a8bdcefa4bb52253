"""``dynamo``: Dynamo's KV-router cost, its tie and softmax draws, and its active-block accounting."""

from __future__ import annotations

import random
from collections import Counter

from scheduler.core.index import PrefixMatch
from scheduler.core.latency import PredictorEstimator
from scheduler.core.policies import PolicyInput, PolicySetup, create_policy
from scheduler.core.policies.dynamo import DynamoKVRouter, DynamoParams
from scheduler.core.predictor import LatencyPredictor, PredictorConfig
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest
from scheduler.core.scoring import EndpointState, PickRequest, ScoringConfig

BLOCK = 16


def _ep(i: int, **fields: object) -> EndpointState:
    return EndpointState(f"e{i}", f"10.0.0.{i}:8000", metrics_age_s=0.1, **fields)  # type: ignore[arg-type]


def _input(
    endpoints: list[EndpointState],
    keys: list[int],
    tokens: int | None = None,
    matches: dict[str, PrefixMatch] | None = None,
    request_id: str = "r",
    seed: int = 0,
) -> PolicyInput:
    tokens = len(keys) * BLOCK if tokens is None else tokens
    estimator = PredictorEstimator(LatencyPredictor(PredictorConfig()), BLOCK, lambda _: 0)
    return PolicyInput(
        PickRequest(request_id, len(keys), tokens),
        endpoints,
        matches or {},
        lambda _: 0,
        random.Random(seed),
        estimator,
        3,
        keys,
        0.0,
    )


def _dynamo(params: DynamoParams | None = None) -> DynamoKVRouter:
    return DynamoKVRouter(PolicySetup("dynamo", ScoringConfig(), BLOCK), params)


def test_cost_is_prefill_blocks_not_cached_plus_active_blocks() -> None:
    policy = _dynamo()
    endpoints = [_ep(1), _ep(2)]
    # e1 holds 6 of the 10 blocks: 4 blocks to prefill + 10 potential active blocks = 14;
    # e2 holds nothing: 10 + 10 = 20.
    data = _input(endpoints, list(range(10)), matches={"e1": PrefixMatch(6, 6, 0, 0)})
    assert policy.logits(data, ["e1", "e2"], list(range(10))) == [14.0, 20.0]
    assert policy.route(data).endpoints == ["e1", "e2"]


def test_a_prompt_sharing_blocks_with_running_requests_adds_only_its_new_blocks() -> None:
    policy = _dynamo()
    endpoints = [_ep(1), _ep(2)]
    first = _input(endpoints, list(range(8)), request_id="a")
    policy.route(first)
    policy.on_routed("a", "e1", 8 * BLOCK, 8 * BLOCK, 0.0)
    assert policy.active("e1") == (8, 8 * BLOCK)
    # Same first 8 blocks + 2 more: on e1 (nothing cached yet) prefill (128 + 160) / 16 = 18
    # blocks and 8 + 2 active blocks: 28; on e2 10 + 10 = 20.
    second = _input(endpoints, list(range(10)), request_id="b")
    assert policy.logits(second, ["e1", "e2"], list(range(10))) == [28.0, 20.0]
    # Its first token drops a's prefill tokens (not its blocks): e1 costs 10 + 10 = 20, a tie.
    policy.on_first_token("a", 1.0)
    assert policy.active("e1") == (8, 0)
    assert policy.logits(second, ["e1", "e2"], list(range(10))) == [20.0, 20.0]
    policy.on_completed("a", 2.0)
    assert policy.active("e1") == (0, 0)


def test_the_overlap_weight_scales_the_prefill_side_only() -> None:
    policy = _dynamo(DynamoParams(overlap_score_weight=2.0))
    data = _input([_ep(1)], list(range(4)), tokens=70)  # 4 full blocks and 6 tokens
    # (70 / 16) x 2 + 4 = 12.75
    assert policy.logits(data, ["e1"], list(range(4))) == [12.75]


def test_temperature_zero_draws_uniformly_among_exact_ties_from_the_seeded_rng() -> None:
    policy = _dynamo()
    endpoints = [_ep(i) for i in range(1, 5)]
    primaries = Counter(policy.route(_input(endpoints, [1, 2], seed=s)).endpoints[0] for s in range(400))
    assert set(primaries) == {"e1", "e2", "e3", "e4"} and min(primaries.values()) > 60
    # Same seed, same draw.
    assert {policy.route(_input(endpoints, [1, 2], seed=7)).endpoints[0] for _ in range(5)} == {
        policy.route(_input(endpoints, [1, 2], seed=7)).endpoints[0]
    }


def test_softmax_favours_low_cost_by_the_normalised_gap() -> None:
    policy = _dynamo(DynamoParams(temperature=0.5))
    endpoints = [_ep(1), _ep(2)]
    matches = {"e1": PrefixMatch(10, 10, 0, 0)}
    # Logits 10 (e1) and 20 (e2): normalised -10/10 and -20/10, so P(e1) = 1 / (1 + e^-2) = 0.881.
    picks = Counter(
        policy.route(_input(endpoints, list(range(10)), matches=matches, seed=s)).endpoints[0]
        for s in range(2000)
    )
    assert 0.85 < picks["e1"] / 2000 < 0.91


def test_requests_routed_through_the_scheduler_stay_active_until_they_finish() -> None:
    scheduler = Scheduler(SchedulerConfig(policy="dynamo"))
    endpoints = [Endpoint(f"e{i}", f"10.0.0.{i}:8000", kv_events="tcp://x:5557") for i in (1, 2)]
    scheduler.set_endpoints(endpoints, now=0.0)
    for endpoint in endpoints:
        scheduler.update_metrics(endpoint.name, EndpointMetrics(0, 0, 0.0), now=0.0)
    policy = scheduler._policy
    assert isinstance(policy, DynamoKVRouter)
    prompt = list(range(1, 4 * BLOCK + 1))
    first = scheduler.pick(SchedulingRequest("a", prompt), now=1.0).endpoints[0]
    # The second identical prompt would add no new blocks where a runs, but a's prefill is
    # still pending there (4 blocks): 8 + 4 = 12 against 4 + 4 = 8 on the idle one.
    second = scheduler.pick(SchedulingRequest("b", prompt), now=1.1).endpoints[0]
    assert first != second
    scheduler.on_first_token("a", now=1.2)
    scheduler.on_completed("a", now=2.0)
    scheduler.on_failed("b", now=2.0)
    assert {name: policy.active(name) for name in ("e1", "e2")} == {"e1": (0, 0), "e2": (0, 0)}


def test_the_registered_policy_uses_dynamos_defaults() -> None:
    policy = create_policy(PolicySetup("dynamo", ScoringConfig(), BLOCK))
    assert isinstance(policy, DynamoKVRouter)
    assert policy.params == DynamoParams(1.0, 0.0)
