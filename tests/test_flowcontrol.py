"""Flow control: saturation detection, admission, ordering, bounds and accounting."""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.flowcontrol import (
    QUEUE_FULL,
    SHED_SATURATED,
    SHUTTING_DOWN,
    WAIT_EXCEEDED,
    Admission,
    FlowControlConfig,
    FlowController,
    FlowItem,
    SaturationDetector,
)
from scheduler.core.scoring.types import EndpointState


def endpoint(
    name: str,
    *,
    waiting: int = 0,
    kv: float = 0.0,
    inflight: int = 0,
    age: float | None = 0.1,
    healthy: bool = True,
) -> EndpointState:
    return EndpointState(
        name=name,
        address=f"{name}:8000",
        waiting=waiting,
        kv_usage=kv,
        metrics_age_s=age,
        healthy=healthy,
        inflight_requests=inflight,
    )


def drain_order(controller: FlowController, now: float) -> list[str]:
    order = []
    while (item := controller.dispatch_next(now)) is not None:
        order.append(item.request_id)
    return order


def queue(controller: FlowController, *items: FlowItem, now: float = 0.0) -> None:
    for item in items:
        # Sheddable requests wait only when they arrive behind a queue the pool is draining.
        saturated = not item.sheddable
        assert controller.admit(item, saturated=saturated, now=now).queued, item


# --- configuration ----------------------------------------------------------------------


def test_config_is_frozen_and_rejects_unknown_fields() -> None:
    config = FlowControlConfig()
    with pytest.raises(pydantic.ValidationError):
        FlowControlConfig(max_queue=3)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        config.max_wait_s = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        FlowControlConfig(kv_cache_threshold=1.5)


# --- saturation ---------------------------------------------------------------------------


def test_pool_is_saturated_only_when_every_endpoint_is_over_a_limit() -> None:
    detector = SaturationDetector(FlowControlConfig())
    over = [endpoint("a", waiting=5), endpoint("b", kv=0.8), endpoint("c", inflight=256)]
    assert detector.saturated(over, now=1.0)
    assert "3 healthy endpoints" in detector.reason
    assert "1 with waiting >= 5" in detector.reason
    assert "1 with kv usage >= 0.8" in detector.reason
    assert "1 with in-flight >= 256" in detector.reason
    assert detector.saturated_since == 1.0

    fresh = SaturationDetector(FlowControlConfig())
    with_headroom = [endpoint("a", waiting=5), endpoint("b", waiting=4, kv=0.79, inflight=255)]
    assert not fresh.saturated(with_headroom, now=1.0)
    assert "endpoint b" in fresh.reason


def test_queued_prefill_work_saturates_an_endpoint_whatever_its_request_counts() -> None:
    detector = SaturationDetector(FlowControlConfig(max_queued_prefill_ms=1000.0))
    # One long prompt ahead on each endpoint, nobody waiting in the engines' own queues.
    long_ahead = [
        EndpointState("a", "a:8000", metrics_age_s=0.1, inflight_requests=1, prefill_ms_ahead=2500.0),
        EndpointState("b", "b:8000", metrics_age_s=0.1, inflight_requests=2, prefill_ms_ahead=1000.0),
    ]
    assert detector.saturated(long_ahead, now=1.0)
    assert "2 with prefill queued >= 1000 ms" in detector.reason
    # Released only once some endpoint is under 0.8 x 1000 ms.
    partly = [long_ahead[0], EndpointState("b", "b:8000", metrics_age_s=0.1, prefill_ms_ahead=850.0)]
    assert detector.saturated(partly, now=1.1)
    drained = [long_ahead[0], EndpointState("b", "b:8000", metrics_age_s=0.1, prefill_ms_ahead=700.0)]
    assert not detector.saturated(drained, now=1.2)
    # Not estimated: the signal does not apply.
    assert not detector.saturated([EndpointState("a", "a:8000", metrics_age_s=0.1)], now=1.3)


def test_untrusted_metrics_are_not_proof_of_overload() -> None:
    config = FlowControlConfig(metrics_stale_after_s=2.0)
    stale = endpoint("stale", waiting=500, kv=1.0, age=2.5)
    never_scraped = endpoint("new", waiting=500, kv=1.0, age=None)
    busy = endpoint("busy", waiting=50)
    for unknown in (stale, never_scraped):
        detector = SaturationDetector(config)
        assert not detector.saturated([busy, unknown], now=0.0)
        assert "untrusted" in detector.reason
    # Exactly at the staleness limit the figures are still trusted.
    assert SaturationDetector(config).saturated([busy, endpoint("edge", waiting=500, age=2.0)], now=0.0)


def test_without_trusted_metrics_kvsched_inflight_decides() -> None:
    config = FlowControlConfig(max_inflight_per_endpoint=10)
    blind_busy = [endpoint("a", inflight=10, age=None), endpoint("b", inflight=12, age=None)]
    assert SaturationDetector(config).saturated(blind_busy, now=0.0)
    blind_one_free = [endpoint("a", inflight=10, age=None), endpoint("b", inflight=9, age=None)]
    assert not SaturationDetector(config).saturated(blind_one_free, now=0.0)


def test_unhealthy_endpoints_are_ignored_and_an_empty_pool_is_not_saturated() -> None:
    detector = SaturationDetector(FlowControlConfig())
    states = [endpoint("a", waiting=9), endpoint("down", healthy=False)]
    assert detector.saturated(states, now=0.0)
    detector = SaturationDetector(FlowControlConfig())
    assert not detector.saturated([endpoint("down", waiting=9, healthy=False)], now=0.0)
    assert "no healthy endpoint" in detector.reason
    assert not detector.saturated([], now=0.0)


def test_detector_reads_the_pool_only_as_far_as_its_answer_needs() -> None:
    # The Scheduler hands the detector a lazily built iterator: a pool with room must cost
    # one endpoint's state, not every endpoint's, on each arrival.
    read: list[str] = []

    def pool(states: list[EndpointState]) -> Iterator[EndpointState]:
        for state in states:
            read.append(state.name)
            yield state

    detector = SaturationDetector(FlowControlConfig(queue_depth_threshold=5, release_fraction=0.8))
    roomy = [endpoint("a"), endpoint("b", waiting=9), endpoint("c", waiting=9)]
    assert not detector.saturated(pool(roomy), now=0.0)
    assert read == ["a"]
    read.clear()
    full = [endpoint(name, waiting=9) for name in "abc"]
    assert detector.saturated(pool(full), now=1.0)
    assert read == ["a", "b", "c"] and "all 3 healthy endpoints" in detector.reason
    read.clear()
    # Saturated: release at the first endpoint clearly under, without reading the rest.
    drained = [endpoint("a", waiting=9), endpoint("b", waiting=1), endpoint("c", waiting=9)]
    assert not detector.saturated(pool(drained), now=2.0)
    assert read == ["a", "b"]


def test_hysteresis_and_an_unhealthy_pool_hold_for_an_iterator() -> None:
    detector = SaturationDetector(FlowControlConfig(queue_depth_threshold=5))
    assert detector.saturated(iter([endpoint("a", waiting=9)]), now=0.0)
    assert detector.saturated(iter([endpoint("a", waiting=9, healthy=False), endpoint("b", waiting=5)]), 1.0)
    assert not detector.saturated(iter([endpoint("down", healthy=False)]), now=2.0)
    assert "no healthy endpoint" in detector.reason


def test_hysteresis_keeps_the_pool_saturated_until_an_endpoint_is_clearly_under() -> None:
    detector = SaturationDetector(FlowControlConfig(queue_depth_threshold=5, release_fraction=0.8))
    sequence = [5, 4, 5, 4, 3, 4, 4, 5, 4]
    observed = [detector.saturated([endpoint("a", waiting=w)], now=float(t)) for t, w in enumerate(sequence)]
    # Enters at 5; 4 is inside the band (release needs < 4); 3 releases; 4 does not re-enter.
    assert observed == [True, True, True, True, False, False, False, True, True]
    assert detector.transitions == 2
    assert "release levels" in detector.reason


def test_without_hysteresis_the_same_signal_flaps() -> None:
    detector = SaturationDetector(FlowControlConfig(queue_depth_threshold=5, release_fraction=1.0))
    observed = [detector.saturated([endpoint("a", waiting=w)], now=0.0) for w in [5, 4, 5, 4]]
    assert observed == [True, False, True, False]
    assert detector.transitions == 2


def test_release_also_waits_for_kv_and_inflight_headroom() -> None:
    detector = SaturationDetector(
        FlowControlConfig(kv_cache_threshold=0.8, max_inflight_per_endpoint=100, release_fraction=0.8)
    )
    assert detector.saturated([endpoint("a", kv=0.85)], now=0.0)
    assert detector.saturated([endpoint("a", kv=0.7)], now=1.0)  # under 0.8, not under 0.64
    assert detector.saturated([endpoint("a", kv=0.5, inflight=90)], now=2.0)  # in-flight not under 80
    assert not detector.saturated([endpoint("a", kv=0.5, inflight=79)], now=3.0)


# --- admission ----------------------------------------------------------------------------


def test_unsaturated_empty_queue_dispatches_at_once() -> None:
    controller = FlowController()
    admission = controller.admit(FlowItem("r1"), saturated=False, now=0.0)
    assert admission == Admission.dispatch()
    assert len(controller) == 0
    assert controller.stats.admitted == 1


def test_sheddable_requests_are_rejected_when_saturated_and_admitted_when_not() -> None:
    controller = FlowController()
    shed = controller.admit(FlowItem("low", priority=-1), saturated=True, now=0.0)
    assert shed.rejected
    assert shed.reason == SHED_SATURATED == "sheddable request dropped: pool saturated"
    assert shed.http_status == 429
    assert controller.admit(FlowItem("low2", priority=-1), saturated=False, now=0.0).dispatched
    assert controller.admit(FlowItem("normal", priority=0), saturated=True, now=0.0).queued
    assert controller.stats.rejected == {SHED_SATURATED: 1}


def test_an_arrival_does_not_overtake_the_queue_when_saturation_clears() -> None:
    controller = FlowController()
    queue(controller, FlowItem("waiting", priority=5))
    arrival = controller.admit(FlowItem("late", priority=5), saturated=False, now=1.0)
    assert arrival.queued
    assert drain_order(controller, now=1.0) == ["waiting", "late"]


def test_duplicate_request_id_is_refused_loudly() -> None:
    controller = FlowController()
    queue(controller, FlowItem("r1"))
    with pytest.raises(ValueError, match="already queued"):
        controller.admit(FlowItem("r1"), saturated=True, now=0.0)


def test_disabled_flow_control_never_queues_but_still_sheds() -> None:
    controller = FlowController(FlowControlConfig(enabled=False))
    assert controller.admit(FlowItem("r1"), saturated=True, now=0.0).dispatched
    assert controller.admit(FlowItem("r2", priority=-3), saturated=True, now=0.0).reason == SHED_SATURATED
    assert len(controller) == 0


def test_admit_stamps_enqueued_at_and_keeps_the_payload() -> None:
    controller = FlowController()
    payload = object()
    queue(controller, FlowItem("r1", payload=payload), now=7.5)
    queue(controller, FlowItem("r2", enqueued_at=3.0), now=7.5)
    first = controller.dispatch_next(now=8.0)
    second = controller.dispatch_next(now=8.0)
    assert first is not None and second is not None
    # r2 arrived earlier (explicit enqueued_at) and without SLOs both are due at their wait bound.
    assert (first.request_id, first.enqueued_at) == ("r2", 3.0)
    assert (second.request_id, second.enqueued_at, second.payload) == ("r1", 7.5, payload)


# --- ordering -----------------------------------------------------------------------------


def test_higher_priority_is_dispatched_first() -> None:
    controller = FlowController()
    queue(controller, FlowItem("p0", priority=0), FlowItem("p5", priority=5), FlowItem("p1", priority=1))
    queue(
        controller, FlowItem("shed", priority=-2), FlowItem("p5b", priority=5), FlowItem("neg", priority=-1)
    )
    assert drain_order(controller, now=1.0) == ["p5", "p5b", "p1", "p0", "neg", "shed"]


def test_same_tenant_without_slo_is_first_come_first_served() -> None:
    controller = FlowController()
    for t in range(5):
        queue(controller, FlowItem(f"r{t}", fairness_id="a"), now=float(t))
    assert drain_order(controller, now=10.0) == ["r0", "r1", "r2", "r3", "r4"]


def test_within_a_tenant_least_slack_goes_first() -> None:
    controller = FlowController(FlowControlConfig(max_wait_s=20.0))
    queue(controller, FlowItem("relaxed", slo_ttft_ms=10_000), now=0.0)  # due at 10
    queue(controller, FlowItem("no_slo"), now=0.5)  # due at its wait bound, 20.5
    queue(controller, FlowItem("tight", slo_ttft_ms=500), now=1.0)  # due at 1.5
    queue(controller, FlowItem("tighter_later", slo_ttft_ms=200), now=1.2)  # due at 1.4
    queue(controller, FlowItem("loose", slo_ttft_ms=60_000), now=0.1)  # capped at its wait bound, 20.1
    assert drain_order(controller, now=1.3) == ["tighter_later", "tight", "relaxed", "loose", "no_slo"]


def test_slack_counts_the_service_time_a_request_still_needs() -> None:
    controller = FlowController()
    # Both due at 2.0; the long one needs 0.8 s once sent, so it must start by 1.2.
    queue(controller, FlowItem("short", slo_ttft_ms=2000, service_s=0.1), now=0.0)
    queue(controller, FlowItem("long", slo_ttft_ms=2000, service_s=0.8), now=0.0)
    assert drain_order(controller, now=1.0) == ["long", "short"]


def test_requests_past_hope_yield_to_those_that_can_still_make_it_then_go_in_arrival_order() -> None:
    controller = FlowController(FlowControlConfig(max_wait_s=20.0))
    queue(controller, FlowItem("late_a", slo_ttft_ms=500, fairness_id="a"), now=0.0)  # hopeless after 0.5
    queue(controller, FlowItem("late_b", slo_ttft_ms=300, fairness_id="b"), now=0.1)  # after 0.4
    queue(controller, FlowItem("ok_a", slo_ttft_ms=5000, fairness_id="a"), now=0.2)
    queue(controller, FlowItem("no_slo_c", fairness_id="c"), now=0.3)
    queue(controller, FlowItem("nearly", slo_ttft_ms=2000, service_s=1.0, fairness_id="b"), now=0.4)
    # At 1.0: late_a and late_b are past hope, "nearly" must start by 1.4. Those that can still
    # make it go first, tenants taking turns; then the hopeless ones, oldest first.
    assert drain_order(controller, now=1.0) == ["ok_a", "nearly", "no_slo_c", "late_a", "late_b"]


def test_requests_without_slo_are_not_starved_by_later_slo_requests() -> None:
    controller = FlowController(FlowControlConfig(max_wait_s=5.0))
    queue(controller, FlowItem("old", fairness_id="a"), now=0.0)  # due at 5
    queue(controller, FlowItem("slo_soon", fairness_id="a", slo_ttft_ms=1800), now=3.0)  # due at 4.8
    queue(controller, FlowItem("slo_later", fairness_id="a", slo_ttft_ms=1000), now=4.5)  # due at 5.5
    assert drain_order(controller, now=4.6) == ["slo_soon", "old", "slo_later"]


def test_a_light_tenant_is_not_starved_by_a_flooding_one() -> None:
    controller = FlowController()
    for i in range(20):
        queue(controller, FlowItem(f"flood{i}", fairness_id="flood"), now=i * 0.01)
    for i in range(3):
        queue(controller, FlowItem(f"light{i}", fairness_id="light"), now=1.0 + i * 0.01)
    order = drain_order(controller, now=2.0)
    assert order[:6] == ["flood0", "light0", "flood1", "light1", "flood2", "light2"]
    assert order[6:] == [f"flood{i}" for i in range(3, 20)]


def test_fairness_is_per_priority_and_a_returning_tenant_joins_the_back() -> None:
    controller = FlowController()
    queue(controller, FlowItem("a1", fairness_id="a"), FlowItem("a2", fairness_id="a"))
    queue(controller, FlowItem("b1", fairness_id="b"), FlowItem("c1", fairness_id="c"))
    queue(controller, FlowItem("vip", priority=3, fairness_id="a"))
    assert controller.dispatch_next(now=1.0) == FlowItem("vip", priority=3, fairness_id="a", enqueued_at=0.0)
    assert [controller.dispatch_next(now=1.0) for _ in range(2)] == [
        FlowItem("a1", fairness_id="a", enqueued_at=0.0),
        FlowItem("b1", fairness_id="b", enqueued_at=0.0),
    ]
    # b emptied and left the rotation; back with new work, it queues after a (and c, due next).
    queue(controller, FlowItem("b2", fairness_id="b"), now=1.0)
    assert drain_order(controller, now=2.0) == ["c1", "a2", "b2"]


def test_order_is_deterministic_for_equal_inputs() -> None:
    def run() -> list[str]:
        controller = FlowController()
        for i in range(30):
            item = FlowItem(
                f"r{i}", priority=i % 3, fairness_id=f"t{i % 4}", slo_ttft_ms=[None, 500.0][i % 2]
            )
            queue(controller, item, now=float(i // 5))
        return drain_order(controller, now=10.0)

    first = run()
    assert first == run()
    assert len(first) == 30


# --- bounds -------------------------------------------------------------------------------


def test_full_queue_evicts_the_newest_lowest_priority_item_for_a_higher_priority_arrival() -> None:
    controller = FlowController(FlowControlConfig(max_queued_requests=4))
    queue(controller, FlowItem("p0_old", priority=0), FlowItem("p0_new", priority=0))
    queue(controller, FlowItem("p2", priority=2), FlowItem("neg", priority=-1))
    # neg (sheddable) was queued while it could not be shed; it is the lowest priority now.
    admission = controller.admit(FlowItem("p1", priority=1), saturated=True, now=1.0)
    assert admission.queued
    assert admission.evicted is not None and admission.evicted.request_id == "neg"
    admission = controller.admit(FlowItem("p1b", priority=1), saturated=True, now=1.0)
    assert admission.evicted is not None and admission.evicted.request_id == "p0_new"
    assert len(controller) == 4
    stats = controller.stats
    assert stats.evicted == 2
    assert stats.rejected == {QUEUE_FULL: 2}
    assert drain_order(controller, now=2.0) == ["p2", "p1", "p1b", "p0_old"]


def test_full_queue_rejects_an_arrival_that_outranks_nothing() -> None:
    controller = FlowController(FlowControlConfig(max_queued_requests=2))
    queue(controller, FlowItem("a", priority=1), FlowItem("b", priority=2))
    same = controller.admit(FlowItem("c", priority=1), saturated=True, now=0.0)
    assert same.rejected and same.reason == QUEUE_FULL and same.http_status == 429
    assert same.evicted is None
    assert len(controller) == 2


def test_zero_queue_rejects_everything_that_would_wait() -> None:
    controller = FlowController(FlowControlConfig(max_queued_requests=0))
    assert controller.admit(FlowItem("r", priority=9), saturated=True, now=0.0).reason == QUEUE_FULL
    assert controller.admit(FlowItem("ok"), saturated=False, now=0.0).dispatched


def test_items_expire_at_their_wait_bound() -> None:
    controller = FlowController(FlowControlConfig(max_wait_s=10.0))
    assert controller.next_deadline() is None
    queue(controller, FlowItem("first"), now=0.0)
    queue(controller, FlowItem("second"), now=4.0)
    assert controller.next_deadline() == 10.0
    assert controller.expire(now=9.999) == []
    assert controller.expire(now=10.0) == [(FlowItem("first", enqueued_at=0.0), WAIT_EXCEEDED)]
    assert controller.next_deadline() == 14.0
    assert Admission.reject(WAIT_EXCEEDED).http_status == 503
    assert controller.stats.rejected == {WAIT_EXCEEDED: 1}
    assert "second" in controller


def test_dispatch_never_hands_out_an_overdue_item() -> None:
    controller = FlowController(FlowControlConfig(max_wait_s=10.0))
    queue(controller, FlowItem("stale", priority=9), now=0.0)
    queue(controller, FlowItem("fresh", priority=0), now=5.0)
    dispatched = controller.dispatch_next(now=12.0)
    assert dispatched is not None and dispatched.request_id == "fresh"
    # Moved aside, reported by the next expire, and the timer is due at once.
    assert controller.next_deadline() == 10.0
    assert [item.request_id for item, _ in controller.expire(now=12.0)] == ["stale"]
    assert controller.next_deadline() is None


def test_cancel_removes_a_waiting_item_and_keeps_the_rotation_consistent() -> None:
    controller = FlowController()
    queue(controller, FlowItem("a1", fairness_id="a"), FlowItem("b1", fairness_id="b"))
    queue(controller, FlowItem("a2", fairness_id="a"))
    cancelled = controller.cancel("b1")
    assert cancelled is not None and cancelled.request_id == "b1"
    assert controller.cancel("b1") is None
    assert controller.cancel("never-seen") is None
    assert drain_order(controller, now=1.0) == ["a1", "a2"]
    assert controller.stats.cancelled == 1


def test_cancel_of_every_item_clears_the_deadline() -> None:
    controller = FlowController()
    queue(controller, FlowItem("a"), FlowItem("b"))
    controller.cancel("a")
    controller.cancel("b")
    assert controller.next_deadline() is None
    assert controller.dispatch_next(now=1.0) is None


def test_drain_rejects_everything_in_arrival_order() -> None:
    controller = FlowController()
    queue(controller, FlowItem("x", priority=1), FlowItem("y", priority=5))
    assert [item.request_id for item in controller.drain()] == ["x", "y"]
    assert len(controller) == 0
    assert controller.stats.rejected == {SHUTTING_DOWN: 2}
    assert Admission.reject(SHUTTING_DOWN).http_status == 503


# --- accounting ---------------------------------------------------------------------------


def test_stats_report_depth_by_priority_and_wait_time() -> None:
    controller = FlowController()
    queue(controller, FlowItem("a", priority=1), now=0.0)
    queue(controller, FlowItem("b", priority=1), FlowItem("c", priority=-1), now=1.0)
    stats = controller.stats
    assert stats.queue_depth == {-1: 1, 1: 2}
    assert stats.queued == 3
    controller.dispatch_next(now=3.0)  # a, waited 3
    controller.dispatch_next(now=4.0)  # b, waited 3
    stats = controller.stats
    assert stats.queue_depth == {-1: 1}
    assert stats.dispatched_from_queue == 2
    assert stats.dispatch_wait_s_sum == pytest.approx(6.0)


# A random run: arrivals (saturated or not), dispatches, cancellations and clock advances.
_operation = st.one_of(
    st.tuples(
        st.just("admit"),
        st.integers(-2, 2),  # priority
        st.sampled_from(["", "a", "b", "c"]),  # fairness id
        st.one_of(st.none(), st.floats(1.0, 20_000.0)),  # slo_ttft_ms
        st.booleans(),  # saturated
    ),
    st.tuples(st.just("dispatch")),
    st.tuples(st.just("expire")),
    st.tuples(st.just("cancel"), st.integers(0, 60)),
    st.tuples(st.just("advance"), st.floats(0.0, 4.0)),
)


@settings(max_examples=300, deadline=None)
@given(
    operations=st.lists(_operation, max_size=120),
    max_queued=st.integers(0, 6),
    max_wait_s=st.floats(0.5, 10.0),
)
def test_every_request_ends_in_exactly_one_state(
    operations: list[tuple[object, ...]], max_queued: int, max_wait_s: float
) -> None:
    controller = FlowController(FlowControlConfig(max_queued_requests=max_queued, max_wait_s=max_wait_s))
    now = 0.0
    fates: dict[str, str] = {}  # request id -> queued / dispatched / rejected / cancelled
    # The model of the controller's queue: id -> (item, arrival order, enqueued at).
    waiting: dict[str, tuple[FlowItem, int, float]] = {}
    aside: set[str] = set()  # overdue, taken out by a dispatch, not yet reported by expire

    def overdue() -> set[str]:
        return {rid for rid, (_, _, at) in waiting.items() if now >= at + max_wait_s}

    for sequence, operation in enumerate(operations):
        kind = operation[0]
        if kind == "admit":
            _, priority, fairness_id, slo, saturated = operation
            assert isinstance(priority, int) and isinstance(fairness_id, str) and isinstance(saturated, bool)
            request_id = f"r{sequence}"
            item = FlowItem(request_id, priority, fairness_id, slo if isinstance(slo, float) else None)
            was_waiting = dict(waiting)
            admission = controller.admit(item, saturated, now)
            if admission.evicted is not None:
                evicted = admission.evicted.request_id
                lowest = min(entry[0].priority for entry in was_waiting.values())
                newest = max(entry[1] for entry in was_waiting.values() if entry[0].priority == lowest)
                assert was_waiting[evicted][0].priority == lowest < priority
                assert was_waiting[evicted][1] == newest
                fates[evicted] = "rejected"
                del waiting[evicted]
            if admission.dispatched:
                assert not was_waiting
                assert not (saturated and priority < 0)
                fates[request_id] = "dispatched"
            elif admission.queued:
                fates[request_id] = "queued"
                waiting[request_id] = (item, sequence, now)
            else:
                assert admission.http_status in (429, 503) and admission.reason
                if admission.reason == QUEUE_FULL:
                    assert len(was_waiting) >= max_queued
                fates[request_id] = "rejected"
        elif kind == "dispatch":
            late = overdue()
            for rid in late:
                del waiting[rid]
            aside |= late
            dispatched = controller.dispatch_next(now)
            if dispatched is None:
                assert not waiting
            else:
                assert dispatched.request_id in waiting
                assert dispatched.priority == max(entry[0].priority for entry in waiting.values())
                fates[dispatched.request_id] = "dispatched"
                del waiting[dispatched.request_id]
        elif kind == "expire":
            late = overdue()
            reported = controller.expire(now)
            assert {item.request_id for item, _ in reported} == late | aside
            for item, reason in reported:
                assert reason == WAIT_EXCEEDED
                assert item.enqueued_at is not None and now >= item.enqueued_at + max_wait_s
                fates[item.request_id] = "rejected"
                waiting.pop(item.request_id, None)
            aside.clear()
        elif kind == "cancel":
            request_id = f"r{operation[1]}"
            cancelled = controller.cancel(request_id)
            assert (cancelled is not None) == (request_id in waiting)
            if cancelled is not None:
                fates[request_id] = "cancelled"
                del waiting[request_id]
        else:
            advance = operation[1]
            assert isinstance(advance, float)
            now += advance
        assert len(controller) == len(waiting) <= max_queued
    # Whatever a dispatch took aside as overdue was already counted as rejected.
    for rid in aside:
        fates[rid] = "rejected"
    stats = controller.stats
    by_fate = {fate: sum(1 for f in fates.values() if f == fate) for fate in ("dispatched", "rejected")}
    assert stats.arrivals == len(fates)
    assert set(waiting) == {rid for rid, fate in fates.items() if fate == "queued"}
    assert stats.queue_depth_total == len(waiting)
    assert stats.admitted + stats.dispatched_from_queue == by_fate["dispatched"]
    assert stats.rejected_total == by_fate["rejected"]
    assert stats.cancelled == sum(1 for f in fates.values() if f == "cancelled")
    assert stats.settled + stats.queue_depth_total == stats.arrivals
    assert stats.queued == (
        stats.dispatched_from_queue
        + stats.cancelled
        + stats.evicted
        + stats.rejected.get(WAIT_EXCEEDED, 0)
        + len(waiting)
    )
