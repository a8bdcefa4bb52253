"""Routing policies: the registry, each built-in policy's rule, and a policy plugged in from outside."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from scheduler.core.index import PrefixMatch
from scheduler.core.latency import PredictorEstimator
from scheduler.core.policies import (
    DEFAULT_POLICY,
    POLICIES,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
    create_policy,
    register_policy,
)
from scheduler.core.policies.base import NO_HEALTHY_ENDPOINT, by_load, eligible
from scheduler.core.predictor import LatencyPredictor, PredictorConfig
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)
from scheduler.core.scoring import NO_ELIGIBLE_IN_SUBSET, EndpointState, PickRequest, ScoringConfig

BLOCK = 16


def _ep(i: int, **fields: object) -> EndpointState:
    values: dict[str, object] = {"name": f"e{i}", "address": f"10.0.0.{i}:8000", "metrics_age_s": 0.1}
    values.update(fields)
    return EndpointState(**values)  # type: ignore[arg-type]


def _input(
    endpoints: list[EndpointState],
    *,
    matches: dict[str, PrefixMatch] | None = None,
    cached: dict[str, int] | None = None,
    blocks: int = 10,
    subset: frozenset[str] | None = None,
    slo_ttft_ms: float | None = None,
    wanted: int = 3,
    seed: int = 0,
) -> PolicyInput:
    request = PickRequest("r1", blocks, blocks * BLOCK, subset=subset, slo_ttft_ms=slo_ttft_ms)
    estimator = PredictorEstimator(LatencyPredictor(PredictorConfig()), BLOCK, lambda _: 0)
    held = cached or {}
    return PolicyInput(
        request,
        endpoints,
        matches or {},
        lambda name: held.get(name, 0),
        random.Random(seed),
        estimator,
        wanted,
    )


def _policy(name: str, scoring: ScoringConfig | None = None) -> RoutingPolicy:
    return create_policy(PolicySetup(name, scoring or ScoringConfig(), BLOCK))


# --- the registry ----------------------------------------------------------------------------


def test_every_policy_module_is_registered_with_the_default_first() -> None:
    # Every module of the package but base and registry registers itself on import: adding a
    # policy edits no list.
    assert set(POLICIES.names()) >= {
        "kvsched",
        "round_robin",
        "random",
        "least_loaded",
        "prefix_balance",
        "queue_only",
        "cache_only",
        "dynamo",
        "llmd",
        "vllm_router_kv_aware",
    }
    assert POLICIES.names()[0] == DEFAULT_POLICY
    assert DEFAULT_POLICY == SchedulerConfig().policy == "kvsched"
    assert all(spec.description and "\n" not in spec.description for spec in POLICIES.specs())


def test_a_policy_name_is_registered_once_and_configurations_name_only_registered_ones() -> None:
    with pytest.raises(ValueError, match="a policy named 'round_robin' is already registered"):
        register_policy("round_robin", lambda setup: _policy("random"), description="again")
    with pytest.raises(
        ValidationError, match=r"no policy named 'sticky_session' is registered \(registered: kvsched, "
    ):
        SchedulerConfig(policy="sticky_session")


# --- the built-in policies -------------------------------------------------------------------


def test_round_robin_cycles_through_the_healthy_endpoints_by_name() -> None:
    policy = _policy("round_robin")
    endpoints = [_ep(3), _ep(1), _ep(2, healthy=False), _ep(4)]
    primaries = [policy.route(_input(endpoints, wanted=2)).endpoints for _ in range(4)]
    assert primaries == [["e1", "e3"], ["e3", "e4"], ["e4", "e1"], ["e1", "e3"]]


def test_random_is_a_shuffle_drawn_from_the_rng_given() -> None:
    policy = _policy("random")
    endpoints = [_ep(i) for i in range(1, 9)]
    first = policy.route(_input(endpoints, wanted=8, seed=5)).endpoints
    assert sorted(first) == [f"e{i}" for i in range(1, 9)]
    assert policy.route(_input(endpoints, wanted=8, seed=5)).endpoints == first
    primaries = {policy.route(_input(endpoints, seed=seed)).endpoints[0] for seed in range(64)}
    assert len(primaries) == 8


def test_least_loaded_orders_by_requests_ahead_then_prefill_work() -> None:
    endpoints = [
        _ep(1, waiting=2, inflight_requests=1),  # 3 ahead
        _ep(2, waiting=0, inflight_requests=1, inflight_prefill_tokens=900),  # 1 ahead, more work
        _ep(3, waiting=1, inflight_requests=0, inflight_prefill_tokens=100),  # 1 ahead
        _ep(4, waiting=5),
    ]
    assert _policy("least_loaded").route(_input(endpoints, wanted=4)).endpoints == ["e3", "e2", "e1", "e4"]
    assert by_load(endpoints) == ["e3", "e2", "e1", "e4"]


def test_prefix_balance_follows_a_match_over_30_percent_of_the_prompt() -> None:
    endpoints = [_ep(1, waiting=3), _ep(2, waiting=1), _ep(3)]
    policy = _policy("prefix_balance")
    # 4 of 10 blocks cached on the busiest: 40% > SGLang's cache_threshold 0.3.
    routed = policy.route(_input(endpoints, matches={"e1": PrefixMatch(4, 4, 0, 0)}, cached={"e2": 5}))
    assert routed.endpoints == ["e1", "e3", "e2"]  # then the others, least loaded first


def test_prefix_balance_takes_the_emptiest_cache_at_or_below_the_threshold() -> None:
    endpoints = [_ep(1), _ep(2), _ep(3)]
    policy = _policy("prefix_balance")
    # 3 of 10 blocks (30%) is not above the threshold: the worker holding the fewest blocks.
    routed = policy.route(
        _input(endpoints, matches={"e1": PrefixMatch(3, 3, 0, 0)}, cached={"e1": 50, "e2": 9, "e3": 40})
    )
    assert routed.endpoints[0] == "e2"


def test_prefix_balance_goes_to_the_least_loaded_when_load_is_imbalanced() -> None:
    full_match = {"e1": PrefixMatch(10, 10, 0, 0)}
    # max - min = 65 > 64 and 70 > 1.5 x 5: imbalanced, the cache is ignored.
    imbalanced = [_ep(1, waiting=70), _ep(2, waiting=5), _ep(3, waiting=6)]
    assert _policy("prefix_balance").route(_input(imbalanced, matches=full_match)).endpoints[0] == "e2"
    # max - min = 64 is not above the absolute threshold: the full match wins.
    balanced = [_ep(1, waiting=69), _ep(2, waiting=5), _ep(3, waiting=6)]
    assert _policy("prefix_balance").route(_input(balanced, matches=full_match)).endpoints[0] == "e1"


@pytest.mark.parametrize("name", ["round_robin", "random", "least_loaded", "prefix_balance"])
def test_ordering_policies_explain_their_order_and_say_why_there_is_none(name: str) -> None:
    policy = _policy(name)
    endpoints = [_ep(1), _ep(2), _ep(3, healthy=False)]
    routed = policy.route(_input(endpoints, subset=frozenset({"10.0.0.2:8000", "10.0.0.3:8000"})))
    assert routed.endpoints == ["e2"]
    assert routed.explanation == {"policy": name, "order": ["e2"]}
    assert routed.decision is None
    none_healthy = policy.route(_input([_ep(1, healthy=False)]))
    assert (none_healthy.endpoints, none_healthy.reason) == ([], NO_HEALTHY_ENDPOINT)
    outside = policy.route(_input(endpoints, subset=frozenset({"10.9.9.9:8000"})))
    assert (outside.endpoints, outside.reason) == ([], NO_ELIGIBLE_IN_SUBSET)
    assert eligible(endpoints, None) == endpoints[:2]


@pytest.mark.parametrize(
    ("name", "scorer"), [("queue_only", "queue_depth"), ("cache_only", "prefix_overlap")]
)
def test_single_signal_policies_score_one_signal_and_skip_the_slo_stage(name: str, scorer: str) -> None:
    endpoints = [_ep(1), _ep(2)]
    routed = _policy(name).route(_input(endpoints, slo_ttft_ms=500.0))
    assert routed.decision is not None
    assert routed.decision.weights == {scorer: 1.0}
    assert routed.decision.candidates is not None
    assert routed.decision.candidates.predicted_ttft_ms is None  # no SLO stage: nothing predicted


def test_kvsched_predicts_every_candidate_for_a_request_with_an_slo() -> None:
    endpoints = [_ep(1), _ep(2)]
    plain = _policy("kvsched").route(_input(endpoints))
    with_slo = _policy("kvsched").route(_input(endpoints, slo_ttft_ms=500.0))
    assert plain.decision is not None and with_slo.decision is not None
    assert plain.decision.candidates is not None and plain.decision.candidates.predicted_ttft_ms is None
    assert with_slo.decision.candidates is not None
    assert with_slo.decision.candidates.prediction_source == "prior"
    assert with_slo.decision.slo_feasible is not None


def test_the_scoring_policies_take_new_weights_on_reconfigure() -> None:
    endpoints = [_ep(1), _ep(2)]
    policy = _policy("kvsched")
    assert set(policy.route(_input(endpoints)).decision.weights) == {  # type: ignore[union-attr]
        "prefix_overlap",
        "queue_depth",
        "kv_utilization",
        "inflight_load",
        "prefill_wait",
    }
    policy.reconfigure(PolicySetup("kvsched", ScoringConfig(weights={"prefix_overlap": 0.0}), BLOCK))
    assert "prefix_overlap" not in policy.route(_input(endpoints)).decision.weights  # type: ignore[union-attr]


# --- a policy from outside, with its own state ----------------------------------------------


class FewestActiveBlocks(RoutingPolicy):
    """Like Dynamo's decode cost: the endpoint with the fewest blocks of the requests this
    policy routed still active there; a request's blocks are released when it completes."""

    def __init__(self, setup: PolicySetup) -> None:
        self.block_size = setup.block_size
        self.active: dict[str, int] = {}  # endpoint -> active blocks
        self.requests: dict[str, tuple[str, int]] = {}  # request -> (endpoint, blocks)
        self.events: list[tuple[str, ...]] = []

    def route(self, data: PolicyInput) -> Routing:
        names = sorted(s.name for s in data.endpoints if s.healthy)
        order = sorted(names, key=lambda name: (self.active.get(name, 0), name))[: data.wanted]
        return Routing(order, "" if order else "no healthy endpoint", {"active": dict(self.active)})

    def on_routed(
        self, request_id: str, endpoint: str, prompt_tokens: int, prefill_tokens: int, now: float
    ) -> None:
        self._release(request_id)
        blocks = -(-prompt_tokens // self.block_size)
        self.requests[request_id] = (endpoint, blocks)
        self.active[endpoint] = self.active.get(endpoint, 0) + blocks
        self.events.append(("routed", request_id, endpoint, str(prefill_tokens)))

    def on_first_token(self, request_id: str, now: float) -> None:
        self.events.append(("first_token", request_id))

    def on_completed(self, request_id: str, now: float) -> None:
        self._release(request_id)
        self.events.append(("completed", request_id))

    def _release(self, request_id: str) -> None:
        previous = self.requests.pop(request_id, None)
        if previous is not None:
            self.active[previous[0]] -= previous[1]


@pytest.fixture
def fewest_active_blocks() -> Iterator[None]:
    register_policy("fewest_active_blocks", FewestActiveBlocks, description="Fewest active blocks.")
    yield
    POLICIES.remove("fewest_active_blocks")


def _scheduler(policy: str) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(policy=policy))
    endpoints = [Endpoint(f"e{i}", f"10.0.0.{i}:8000", kv_events="tcp://x:5557") for i in (1, 2, 3)]
    scheduler.set_endpoints(endpoints, now=0.0)
    for endpoint in endpoints:
        scheduler.update_metrics(endpoint.name, EndpointMetrics(0, 0, 0.1), now=0.0)
    return scheduler


def test_a_policy_from_outside_keeps_its_own_state_through_the_request_lifecycle(
    fewest_active_blocks: None,
) -> None:
    scheduler = _scheduler("fewest_active_blocks")
    policy = scheduler._policy
    assert isinstance(policy, FewestActiveBlocks)
    long = scheduler.pick(SchedulingRequest("long", list(range(20 * BLOCK))), now=1.0)
    short = scheduler.pick(SchedulingRequest("short", list(range(BLOCK))), now=1.1)
    third = scheduler.pick(SchedulingRequest("third", list(range(BLOCK))), now=1.2)
    assert long.endpoints[0] == "10.0.0.1:8000"
    assert short.endpoints[0] == "10.0.0.2:8000"
    assert third.endpoints[0] == "10.0.0.3:8000"
    assert long.explanation == {"active": {}}
    assert policy.active == {"e1": 20, "e2": 1, "e3": 1}
    # The gateway reports the short one served by e3: the policy hears the move.
    scheduler.on_first_token("short", now=1.3)
    scheduler.on_completed("short", now=1.5, served="10.0.0.3:8000")
    assert policy.active == {"e1": 20, "e2": 0, "e3": 1}
    scheduler.on_failed("long", now=1.6)
    scheduler.on_completed("third", now=1.7)
    assert policy.active == {"e1": 0, "e2": 0, "e3": 0} and policy.requests == {}
    assert policy.events == [
        ("routed", "long", "e1", str(20 * BLOCK)),
        ("routed", "short", "e2", str(BLOCK)),
        ("routed", "third", "e3", str(BLOCK)),
        ("first_token", "short"),
        ("routed", "short", "e3", str(BLOCK)),
        ("completed", "short"),
        ("completed", "long"),
        ("completed", "third"),
    ]


def test_reload_keeps_the_same_policy_and_its_state_and_builds_another_afresh() -> None:
    scheduler = _scheduler("round_robin")
    first = scheduler._policy
    picks = [scheduler.pick(SchedulingRequest(f"r{i}", [1, 2, 3]), now=1.0).endpoints[0] for i in range(2)]
    scheduler.reload(scheduler.config.model_copy(update={"scoring": ScoringConfig(num_fallbacks=0)}))
    assert scheduler._policy is first
    after = scheduler.pick(SchedulingRequest("r2", [1, 2, 3]), now=1.0)
    assert [*picks, after.endpoints[0]] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert len(after.endpoints) == 1
    scheduler.reload(scheduler.config.model_copy(update={"policy": "least_loaded"}))
    assert type(scheduler._policy).__name__ == "LeastLoaded"
