"""The prefill queued on an endpoint, as a fluid estimate drained at the measured rate."""

from __future__ import annotations

import pytest

from scheduler.core.prefillqueue import DrainRate, PrefillQueue
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest


def test_routed_tokens_drain_at_the_rate_and_never_exceed_what_is_still_routed() -> None:
    queue = PrefillQueue()
    assert queue.add(20_000, now=0.0, routed_tokens=0, rate=10_000) == 0.0
    assert queue.ahead(0.5, routed_tokens=20_000, rate=10_000) == pytest.approx(15_000)
    # Another request routed at 1.0 has 10k ahead of it.
    assert queue.add(4_000, now=1.0, routed_tokens=20_000, rate=10_000) == pytest.approx(10_000)
    assert queue.ahead(3.0, routed_tokens=24_000, rate=10_000) == 0.0
    # The bound: what is still routed and before its first token; an unknown rate drains nothing.
    assert queue.ahead(1.0, routed_tokens=3_000, rate=10_000) == 3_000
    assert queue.ahead(9.0, routed_tokens=30_000, rate=0.0) == pytest.approx(14_000)


def test_the_rate_is_a_ratio_of_decayed_sums_led_by_long_prefills() -> None:
    rate = DrainRate()
    assert rate.tokens_per_s == 0.0
    rate.add(20_000, 1.0)  # a long prefill: 20k tokens a second
    rate.add(100, 0.05)  # a short one, mostly fixed overhead: 2k tokens a second
    # The mean of the two ratios would say 11k; the long one dominates the sums.
    assert 18_000 < rate.tokens_per_s < 20_000
    rate.add(0, 1.0)  # nothing drained: no sample
    assert rate.samples == 2


def test_the_scheduler_measures_the_drain_rate_from_first_tokens() -> None:
    scheduler = Scheduler(SchedulerConfig(policy="round_robin"))
    scheduler.set_endpoints([Endpoint("e1", "10.0.0.1:8000", kv_events="tcp://x:5557")], now=0.0)
    scheduler.update_metrics("e1", EndpointMetrics(0, 0, 0.0), now=0.0)
    scheduler.pick(SchedulingRequest("a", list(range(1, 3201))), now=0.0)  # 3,200 tokens
    scheduler.pick(SchedulingRequest("b", list(range(5000, 5800))), now=0.1)  # 800 behind a
    state = scheduler.endpoint_state("e1", now=0.1)
    # No rate measured yet: nothing drains, and the prior's assumed rate stands in.
    assert state.queued_prefill_tokens == 4_000
    assert state.prefill_tokens_per_s == pytest.approx(1000 / 0.036)
    scheduler.on_first_token("a", now=0.4)  # 3,200 tokens in 0.4 s: 8,000 a second
    state = scheduler.endpoint_state("e1", now=0.45)
    assert state.prefill_tokens_per_s == pytest.approx(8_000)
    assert state.queued_prefill_tokens == pytest.approx(800 - 0.05 * 8_000)
    assert state.last_event_age_s == pytest.approx(0.05)
