"""The Endpoint Picker's outcomes: one list, from which counters and refusal statuses come."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import PICK_OUTCOMES, RESPONSE_OUTCOMES, ExtProcStats


def test_every_outcome_is_routed_refused_with_a_status_or_the_internal_error() -> None:
    routed = {o for o in PickOutcome if o.routed}
    refused = {o: o.http_status for o in PickOutcome if o.http_status is not None}
    assert routed == {PickOutcome.ROUTED, PickOutcome.ROUTED_FALLBACK}
    # GIE protocol (shared PROTOCOLS.md §2): 503 when nothing can take the request, 429 shed.
    assert refused == {
        PickOutcome.NO_ENDPOINTS: 503,
        PickOutcome.SHED: 429,
        PickOutcome.QUEUE_TIMEOUT: 503,
        PickOutcome.BAD_REQUEST: 400,
        PickOutcome.TOO_LARGE: 413,
    }
    assert set(PickOutcome) - routed - set(refused) == {PickOutcome.INTERNAL_ERROR}


def test_counters_start_at_zero_for_every_outcome_and_count_by_value() -> None:
    registry = CollectorRegistry()
    stats = ExtProcStats(registry)
    assert tuple(o.value for o in PickOutcome) == PICK_OUTCOMES
    for outcome in PICK_OUTCOMES + RESPONSE_OUTCOMES:
        assert registry.get_sample_value("kvsched_picker_requests_total", {"outcome": outcome}) == 0
    stats.count(PickOutcome.SHED)
    assert stats.outcomes["shed"] == 1
    assert registry.get_sample_value("kvsched_picker_requests_total", {"outcome": "shed"}) == 1
