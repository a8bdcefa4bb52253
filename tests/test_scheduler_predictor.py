"""The Scheduler's use of the latency predictor: features captured at the pick, latencies
observed at completion, models trained on them, predictions used for SLO-aware picks."""

from __future__ import annotations

import pytest

from scheduler.core.predictor import FEATURE_NAMES, PredictorConfig
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest
from scheduler.core.scoring import ScorerWeights, ScoringConfig

UNCACHED = FEATURE_NAMES.index("uncached_tokens")
DECODE = FEATURE_NAMES.index("inflight_decode_requests")
DECODE_CONTEXT = FEATURE_NAMES.index("decode_context_tokens")


def _scheduler(**config: object) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]
    scheduler.set_endpoints([Endpoint("a", "10.0.0.1:8000"), Endpoint("b", "10.0.0.2:8000")], now=0.0)
    for name in ("a", "b"):
        scheduler.update_metrics(name, EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=0.0)
    return scheduler


def _serve(
    scheduler: Scheduler, request_id: str, tokens: int, now: float, ttft_s: float, tpot_s: float
) -> None:
    """Pick, then report a first token after ``ttft_s`` and 9 more tokens ``tpot_s`` apart."""
    result = scheduler.pick(SchedulingRequest(request_id, list(range(1, tokens + 1))), now)
    assert result.status == "ok"
    scheduler.on_first_token(request_id, now + ttft_s)
    scheduler.on_completed(request_id, now + ttft_s + 9 * tpot_s, completion_tokens=10)


def test_every_pick_predicts_the_chosen_endpoint_and_completions_are_learned_from() -> None:
    scheduler = _scheduler()
    result = scheduler.pick(SchedulingRequest("r0", list(range(1, 257))), now=1.0)
    assert result.predicted is not None and result.predicted[2] == "prior"
    assert result.predicted[0] > 0 and result.predicted[1] > 0
    flight = scheduler._inflight["r0"]
    assert flight.features is not None and flight.features[UNCACHED] == 256
    scheduler.on_first_token("r0", now=1.05)
    scheduler.on_completed("r0", now=1.14, completion_tokens=10)
    stats = scheduler.predictor.stats
    assert stats.observed == 1


def test_decode_requests_are_counted_once_past_their_first_token() -> None:
    scheduler = _scheduler()
    scheduler.pick(SchedulingRequest("r0", [1, 2, 3]), now=1.0)
    endpoint = scheduler._inflight["r0"].endpoint
    assert scheduler.endpoint_state(endpoint, 1.0).inflight_decode_requests == 0
    scheduler.on_first_token("r0", now=1.01)
    assert scheduler.endpoint_state(endpoint, 1.01).inflight_decode_requests == 1
    scheduler.pick(SchedulingRequest("r1", [9, 9, 9, 9]), now=1.02)
    if scheduler._inflight["r1"].endpoint == endpoint:
        features = scheduler._inflight["r1"].features
        assert features is not None and features[DECODE] == 1
    scheduler.on_completed("r0", now=1.1, completion_tokens=3)
    assert scheduler.endpoint_state(endpoint, 1.1).inflight_decode_requests == 0


def test_decode_context_is_the_decoding_requests_prompt_tokens_wherever_they_run() -> None:
    """An endpoint's decode context counts a request's prompt from its first token to its end,
    moves with it when the gateway reports a fallback served it, and is the feature row's
    column at the next pick there."""
    scheduler = _scheduler()
    scheduler.pick(SchedulingRequest("r0", list(range(1, 301))), now=1.0)
    scheduler.pick(SchedulingRequest("r1", list(range(1000, 1120))), now=1.0)
    first, second = scheduler._inflight["r0"].endpoint, scheduler._inflight["r1"].endpoint

    def context(name: str, now: float) -> int:
        return scheduler.endpoint_state(name, now).inflight_decode_tokens

    assert context("a", 1.0) == context("b", 1.0) == 0
    scheduler.on_first_token("r0", now=1.01)
    scheduler.on_first_token("r1", now=1.01)
    expected = {"a": 0, "b": 0}
    expected[first] += 300
    expected[second] += 120
    assert {name: context(name, 1.01) for name in ("a", "b")} == expected
    # A pick's chosen row carries its endpoint's context.
    scheduler.pick(SchedulingRequest("r2", list(range(5000, 5064))), now=1.02)
    chosen = scheduler._inflight["r2"]
    assert chosen.features is not None and chosen.features[DECODE_CONTEXT] == expected[chosen.endpoint]
    # The gateway says another endpoint served r0: its decode context moves there.
    other = "b" if first == "a" else "a"
    scheduler.on_served_by("r0", scheduler.endpoint_state(other, 1.03).address, now=1.03)
    expected[first] -= 300
    expected[other] += 300
    assert {name: context(name, 1.03) for name in ("a", "b")} == expected
    for request_id in ("r0", "r1"):
        scheduler.on_completed(request_id, now=1.2, completion_tokens=5)
    assert context("a", 1.2) == context("b", 1.2) == 0


def test_a_trained_model_replaces_the_prior_and_learns_the_latency_law() -> None:
    config = PredictorConfig(min_samples=60, min_holdout_for_comparison=5)
    scheduler = _scheduler(predictor=config)
    now = 1.0
    for i in range(400):
        tokens = 32 + (i * 37) % 480
        # An endpoint whose TTFT is 5 ms + 0.5 ms per prompt token; TPOT 10 ms.
        _serve(scheduler, f"r{i}", tokens, now, (5.0 + 0.5 * tokens) / 1000.0, 0.010)
        now += 1.0
    assert scheduler.train_if_due(now)
    assert scheduler.predictor.stats.ttft_source == "model"
    result = scheduler.pick(SchedulingRequest("probe", list(range(1, 301))), now)
    # TPOT is constant here, which the refitted linear prior already gets exactly right, so
    # the prior may keep answering it ("mixed"); TTFT is the model's.
    assert result.predicted is not None and result.predicted[2] in ("model", "mixed")
    assert result.predicted[0] == pytest.approx(155.0, rel=0.15)
    assert result.predicted[1] == pytest.approx(10.0, rel=0.15)
    assert not scheduler.train_if_due(now)  # nothing new to learn from


def test_a_request_served_elsewhere_is_not_learned_from() -> None:
    scheduler = _scheduler()
    result = scheduler.pick(SchedulingRequest("r0", [1, 2, 3]), now=1.0)
    other = "10.0.0.2:8000" if result.endpoints[0] == "10.0.0.1:8000" else "10.0.0.1:8000"
    scheduler.on_served_by("r0", other, now=1.05)
    scheduler.on_first_token("r0", now=1.1)
    scheduler.on_completed("r0", now=1.2, completion_tokens=2)
    assert scheduler.predictor.stats.observed == 0


def test_slo_requests_use_every_candidates_prediction() -> None:
    weights = ScorerWeights(prefix_overlap=1.0, queue_depth=0.0, kv_utilization=0.0, inflight_load=0.0)
    scheduler = _scheduler(scoring=ScoringConfig(weights=weights))
    # Endpoint a is far busier than b by its scraped metrics; with an SLO the prediction
    # (the prior's queueing terms) moves the request to b even though a holds no less cache.
    scheduler.update_metrics("a", EndpointMetrics(waiting=60, running=64, kv_usage=0.5), now=0.0)
    plain = scheduler.pick(SchedulingRequest("p", list(range(1, 65))), now=0.5)
    assert plain.explanation["prediction_source"] == ""
    with_slo = scheduler.pick(SchedulingRequest("s", list(range(1, 65)), slo_ttft_ms=500.0), now=0.5)
    assert with_slo.endpoints[0] == "10.0.0.2:8000"
    candidates = with_slo.explanation["candidates"]
    assert candidates["a"]["predicted_ttft_ms"] > candidates["b"]["predicted_ttft_ms"]
    assert candidates["b"]["meets_slo"] is True


def test_reload_with_new_predictor_settings_starts_a_new_predictor() -> None:
    scheduler = _scheduler()
    before = scheduler.predictor
    scheduler.reload(scheduler.config.model_copy(update={"seed": 3}))
    assert scheduler.predictor is before
    scheduler.reload(scheduler.config.model_copy(update={"predictor": PredictorConfig(min_samples=500)}))
    assert scheduler.predictor is not before and scheduler.predictor.config.min_samples == 500


def test_slo_precedence_header_then_objective_then_pool_default() -> None:
    from scheduler.core.objectives import Objective, ObjectiveTable
    from scheduler.core.scheduler import SLODefaults

    scheduler = _scheduler(slo_defaults=SLODefaults(ttft_ms=900.0, tpot_ms=60.0))
    scheduler.set_objectives(ObjectiveTable.of([Objective("chat", priority=2, slo_ttft_ms=300.0)]))
    plain = scheduler.resolve_objective(SchedulingRequest("a", [1]))
    assert (plain.slo_ttft_ms, plain.slo_tpot_ms, plain.priority) == (900.0, 60.0, 0)
    chat = scheduler.resolve_objective(SchedulingRequest("b", [1], objective="chat"))
    assert (chat.slo_ttft_ms, chat.slo_tpot_ms, chat.priority) == (300.0, 60.0, 2)
    header = scheduler.resolve_objective(SchedulingRequest("c", [1], objective="chat", slo_ttft_ms=120.0))
    assert header.slo_ttft_ms == 120.0


def test_an_objective_of_one_pool_is_picked_among_that_pools_endpoints() -> None:
    from scheduler.core.objectives import Objective, ObjectiveTable
    from scheduler.core.scheduler import POOL_LABEL

    scheduler = Scheduler()
    scheduler.set_endpoints(
        [
            Endpoint("a", "10.0.0.1:8000", labels={POOL_LABEL: "llm/llama"}),
            Endpoint("b", "10.0.0.2:8000", labels={POOL_LABEL: "llm/qwen"}),
        ],
        now=0.0,
    )
    scheduler.set_objectives(
        ObjectiveTable.of(
            [Objective("llama-chat", pool="llm/llama"), Objective("qwen-chat", pool="llm/qwen")]
        )
    )
    for i in range(6):
        llama = scheduler.pick(SchedulingRequest(f"l{i}", [1, 2, 3], objective="llama-chat"), now=1.0)
        qwen = scheduler.pick(SchedulingRequest(f"q{i}", [1, 2, 3], objective="qwen-chat"), now=1.0)
        assert llama.endpoints == ["10.0.0.1:8000"] and qwen.endpoints == ["10.0.0.2:8000"]
    # No objective (or one of a pool kvsched does not serve): every endpoint is a candidate.
    both = scheduler.pick(SchedulingRequest("x", [1, 2, 3]), now=1.0)
    assert sorted(both.endpoints) == ["10.0.0.1:8000", "10.0.0.2:8000"]
