"""kvsched's Prometheus collector, read back through the real text exposition format."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.metrics import KvschedCollector, new_registry
from scheduler.core.flowcontrol import SHED_SATURATED, FlowControlConfig
from scheduler.core.objectives import Objective, ObjectiveTable
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest


def _samples(scheduler: Scheduler) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = new_registry(process_metrics=False)
    registry.register(KvschedCollector(scheduler))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_flow_control_figures_are_exposed() -> None:
    scheduler = Scheduler(SchedulerConfig(flow_control=FlowControlConfig(queue_depth_threshold=2)))
    scheduler.set_endpoints([Endpoint("a", "10.0.0.1:8000")], now=0.0)
    scheduler.set_objectives(ObjectiveTable.of([Objective("batch", priority=-1), Objective("gold", 5)]))
    scheduler.update_metrics("a", EndpointMetrics(waiting=3, running=8, kv_usage=0.5), now=0.0)
    assert scheduler.admit(SchedulingRequest("shed", [1], objective="batch"), now=0.1).rejected
    assert scheduler.admit(SchedulingRequest("w1", [1], objective="gold"), now=0.1).queued
    assert scheduler.admit(SchedulingRequest("w2", [1]), now=0.1).queued
    samples = _samples(scheduler)
    assert samples[("kvsched_pool_saturated", ())] == 1.0
    assert samples[("kvsched_flow_queue_depth", (("priority", "5"),))] == 1.0
    assert samples[("kvsched_flow_queue_depth", (("priority", "0"),))] == 1.0
    assert samples[("kvsched_flow_rejected_total", (("reason", SHED_SATURATED),))] == 1.0
    assert samples[("kvsched_flow_requests_total", (("outcome", "queued"),))] == 2.0

    # The engine drains: the pool is released and the gold request goes first.
    scheduler.update_metrics("a", EndpointMetrics(waiting=0, running=2, kv_usage=0.2), now=1.0)
    dispatched = scheduler.next_dispatch(now=1.0)
    assert dispatched is not None and dispatched.request_id == "w1"
    samples = _samples(scheduler)
    assert samples[("kvsched_pool_saturated", ())] == 0.0
    assert samples[("kvsched_flow_requests_total", (("outcome", "dispatched_from_queue"),))] == 1.0
    assert samples[("kvsched_flow_wait_seconds_total", ())] == pytest.approx(0.9)


def test_predictor_error_and_source_are_exposed() -> None:
    scheduler = Scheduler()
    scheduler.set_endpoints([Endpoint("a", "10.0.0.1:8000")], now=0.0)
    scheduler.update_metrics("a", EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=0.0)
    samples = _samples(scheduler)
    assert samples[("kvsched_predictor_source", (("source", "prior"), ("target", "ttft")))] == 1.0
    assert ("kvsched_predictor_running_mape", (("target", "ttft"),)) not in samples  # nothing observed
    result = scheduler.pick(SchedulingRequest("r", list(range(1, 65))), now=1.0)
    assert result.predicted is not None
    predicted_ms = result.predicted[0]
    scheduler.on_first_token("r", now=1.0 + 2 * predicted_ms / 1000.0)  # twice as slow as predicted
    scheduler.on_completed("r", now=2.0 + predicted_ms / 1000.0, completion_tokens=4)
    samples = _samples(scheduler)
    assert samples[("kvsched_predictor_observations_total", ())] == 1.0
    assert samples[("kvsched_predictor_running_mape", (("target", "ttft"),))] == pytest.approx(0.5, rel=1e-3)


def test_publisher_views_are_exposed_per_endpoint_and_rank() -> None:
    from scheduler.core.kvingest import IngestStats, PublisherView

    views = [
        PublisherView("a", 0, "a", "exact", "", True, 7, last_event_age_s=1.5, stats=IngestStats()),
        PublisherView("a", 1, "a#dp1", "degraded", "replaying", True, 3, True, "gap", 3, 4, 0.25),
        PublisherView.without_events("b", 0, "b"),
    ]
    registry = new_registry(process_metrics=False)
    registry.register(KvschedCollector(Scheduler(), publisher_views=lambda: views))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }

    def at(name: str, endpoint: str, rank: str, **extra: str) -> float | None:
        return samples.get((name, tuple(sorted({"endpoint": endpoint, "rank": rank, **extra}.items()))))

    assert at("kvsched_kv_view_complete", "a", "0") == 1.0 and at("kvsched_kv_view_complete", "a", "1") == 1.0
    assert at("kvsched_kv_view_state", "a", "1", state="degraded") == 1.0
    assert at("kvsched_kv_view_state", "a", "1", state="exact") == 0.0
    assert at("kvsched_kv_view_state", "b", "0", state="fallback") == 1.0
    assert at("kvsched_kv_view_complete", "b", "0") is None  # no publisher, no view to be complete
    assert at("kvsched_kv_last_event_age_seconds", "a", "0") == 1.5
    assert (
        at("kvsched_kv_replay_in_flight", "a", "1") == 1.0
        and at("kvsched_kv_buffered_batches", "a", "1") == 4
    )
