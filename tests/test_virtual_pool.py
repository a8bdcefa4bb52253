"""Flow control in the virtual-time pool: the same admit/queue/shed decisions the live
server makes, driven by simulated engines."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from scheduler.core.flowcontrol import SHED_SATURATED, FlowControlConfig
from scheduler.core.objectives import Objective, ObjectiveTable
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest
from scheduler.sim.engine import Engine, EngineConfig
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig, load_regime


@dataclass(frozen=True)
class Item:
    request_id: str
    arrival_s: float
    prompt_token_ids: list[int] = field(repr=False)
    max_tokens: int = 32
    objective: str | None = None
    fairness_id: str | None = None


def _burst(count: int, objective_of: dict[int, str] | None = None) -> list[Item]:
    """``count`` distinct 512-token prompts arriving 1 ms apart: far more than two engines
    serve at once."""
    objective_of = objective_of or {}
    return [
        Item(
            f"r{i}",
            i * 0.001,
            [1 + (i * 7919 + t) % 30_000 for t in range(512)],
            objective=objective_of.get(i),
        )
        for i in range(count)
    ]


def _pool(**flow: object) -> VirtualPool:
    config = SchedulerConfig(flow_control=FlowControlConfig(**flow))  # type: ignore[arg-type]
    return VirtualPool(VirtualPoolConfig(workers=2, capacity_blocks=4096, max_num_seqs=4), config)


def test_saturated_pool_queues_requests_and_every_one_is_accounted_for() -> None:
    pool = _pool(queue_depth_threshold=1, max_wait_s=60.0)
    outcomes = pool.run(_burst(40))
    stats = pool.scheduler.flow.stats
    assert stats.arrivals == 40 and stats.settled == 40 and stats.queue_depth_total == 0
    assert stats.queued > 0 and stats.dispatched_from_queue == stats.queued
    assert all(o.ok for o in outcomes)
    # The waiting happened in kvsched, not in the engines: later arrivals waited longer.
    assert outcomes[-1].ttft_s is not None and outcomes[0].ttft_s is not None
    assert outcomes[-1].ttft_s > outcomes[0].ttft_s
    # Each outcome says when it was routed (after its wait) and what answered its TTFT.
    assert all(o.routed_s is not None and o.routed_s >= o.start_s for o in outcomes)
    waited = [o for o in outcomes if o.routed_s is not None and o.routed_s > o.start_s]
    assert waited and all(
        (o.routed_ttft_s or 0.0) < (o.ttft_s or 0.0) and o.predicted_ttft_source in ("model", "prior")
        for o in waited
    )


def test_sheddable_requests_are_refused_with_429_while_saturated() -> None:
    pool = _pool(queue_depth_threshold=1, max_wait_s=60.0)
    pool.scheduler.set_objectives(ObjectiveTable.of([Objective("batch", priority=-1)]))
    outcomes = pool.run(_burst(40, {i: "batch" for i in range(20, 40)}))
    shed = [o for o in outcomes if not o.ok]
    assert shed and all(o.error == f"http 429: {SHED_SATURATED}" for o in shed)
    assert {o.request_id for o in shed} <= {f"r{i}" for i in range(20, 40)}
    assert pool.scheduler.flow.stats.rejected[SHED_SATURATED] == len(shed)


def test_higher_priority_waits_less_under_saturation() -> None:
    pool = _pool(queue_depth_threshold=1, max_wait_s=60.0)
    pool.scheduler.set_objectives(ObjectiveTable.of([Objective("gold", priority=10)]))
    outcomes = pool.run(_burst(60, {i: "gold" for i in range(1, 60, 2)}))
    assert all(o.ok for o in outcomes)
    gold = [o.ttft_s or 0.0 for o in outcomes if int(o.request_id[1:]) % 2]
    rest = [o.ttft_s or 0.0 for o in outcomes if not int(o.request_id[1:]) % 2]
    assert sum(gold) / len(gold) < 0.7 * sum(rest) / len(rest)


def test_wait_bound_refuses_with_an_explained_503() -> None:
    pool = _pool(queue_depth_threshold=1, max_wait_s=0.05)
    outcomes = pool.run(_burst(40))
    expired = [o for o in outcomes if not o.ok]
    assert expired and all(o.error == "http 503: queue wait exceeded" for o in expired)
    assert pool.scheduler.flow.stats.settled == 40


def test_without_saturation_nothing_waits() -> None:
    pool = _pool()  # default limits: this light load never saturates two engines
    outcomes = pool.run(_burst(4))
    assert all(o.ok for o in outcomes)
    assert pool.scheduler.flow.stats.queued == 0 and pool.scheduler.flow.stats.admitted == 4


def test_queued_prefill_saturates_the_pool_before_any_engine_queues_a_request() -> None:
    # Long prompts to 2 engines that admit everything (no seq limit, plenty of blocks): the
    # engines never report waiting requests, yet kvsched holds arrivals back once every
    # engine has more than 1 s of prefill routed to it.
    config = SchedulerConfig(flow_control=FlowControlConfig(max_queued_prefill_ms=1000.0, max_wait_s=600.0))
    pool = VirtualPool(VirtualPoolConfig(workers=2, capacity_blocks=65_536, max_num_seqs=256), config)
    burst = [
        Item(f"r{i}", i * 0.001, [1 + (i * 7919 + t) % 30_000 for t in range(8192)], max_tokens=4)
        for i in range(24)
    ]
    outcomes = pool.run(burst)
    stats = pool.scheduler.flow.stats
    assert all(o.ok for o in outcomes)
    assert stats.queued > 0 and stats.dispatched_from_queue == stats.queued
    assert pool.scheduler.saturation.transitions >= 1


def test_a_waiting_request_carries_its_service_time_from_the_latency_model() -> None:
    scheduler = Scheduler(SchedulerConfig(flow_control=FlowControlConfig(queue_depth_threshold=1)))
    scheduler.set_endpoints([Endpoint("e1", "10.0.0.1:8000", kv_events="tcp://x:5557")], now=0.0)
    scheduler.update_metrics("e1", EndpointMetrics(waiting=3, running=8, kv_usage=0.5), now=0.0)
    short = SchedulingRequest("short", [1] * 64, slo_ttft_ms=1000.0)
    long = SchedulingRequest("long", [2] * 4096, slo_ttft_ms=1000.0)
    assert scheduler.service_estimate_s(long) > 10 * scheduler.service_estimate_s(short) > 0.0
    assert scheduler.admit(long, now=0.1).queued  # every endpoint has 3 waiting: saturated
    item = scheduler.flow.dispatch_next(now=0.2)
    assert item is not None and item.service_s == pytest.approx(scheduler.service_estimate_s(long))


def test_load_regime_counts_only_what_waits_for_a_slot_blocks_or_a_full_iteration() -> None:
    engine = Engine(EngineConfig(capacity_blocks=256, max_num_seqs=2, max_num_batched_tokens=64))
    assert load_regime(engine) == "idle"
    cached = list(range(1000, 1096))  # six full blocks of 16
    engine.add_request("warm", cached, 1, 0.0)
    engine.step(0.0)
    engine.step(engine.busy_until)  # 96 tokens in chunks of 64: its prompt is cached now
    engine.add_request("decoding", [7] * 20, 50, 1.0)
    engine.step(1.0)
    # A request that came during an iteration waits for the next one, which will admit it:
    # loaded, not saturated, though the engine counts it waiting. Its cached blocks are no
    # prefill work ahead of the next arrival (97 prompt tokens, 96 of them cached).
    engine.add_request("next", [*cached, 5], 4, 2.0)
    assert engine.num_waiting == 1 and engine.can_admit()
    assert engine.queued_prefill_tokens() == 1
    assert load_regime(engine) == "loaded"
    # A request the next iteration cannot admit (both sequence slots taken) is saturation.
    engine.step(engine.busy_until)
    engine.add_request("blocked", [9] * 20, 4, 3.0)
    assert engine.num_running == 2 and not engine.can_admit()
    assert load_regime(engine) == "saturated"
