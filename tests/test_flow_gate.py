"""FlowGate on a real event loop, driven by calls: arrivals, pokes, cancellations, the expiry timer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from scheduler.adapters.flow_gate import FlowGate
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

# Generous: only a safety net against a hang, never what a test waits for.
SAFETY_TIMEOUT_S = 5.0


@dataclass
class Pool:
    """One endpoint without trusted metrics, so kvsched's in-flight count alone decides."""

    inflight: int = 0

    def states(self, now: float) -> list[EndpointState]:
        return [EndpointState(name="e0", address="e0:8000", inflight_requests=self.inflight)]


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def make_gate(
    pool: Pool, *, clock: Callable[[], float] | None = None, bound: int = 1, **config: object
) -> FlowGate:
    settings = FlowControlConfig.model_validate(
        {"max_inflight_per_endpoint": bound, "release_fraction": 1.0, **config}
    )
    return FlowGate(
        FlowController(settings),
        SaturationDetector(settings),
        pool.states,
        clock=clock or Clock(),
    )


async def run_ready_callbacks() -> None:
    """Let every callback already scheduled on the loop run, and those they schedule at once."""
    loop = asyncio.get_running_loop()
    for _ in range(3):
        turn = loop.create_future()
        loop.call_soon(turn.set_result, None)
        await turn


@pytest.fixture
def pool() -> Pool:
    return Pool()


async def picker(gate: FlowGate, pool: Pool, item: FlowItem, order: list[str]) -> Admission:
    """What the server does: wait for a turn, then pick at once (which counts the request in flight)."""
    admission = await gate.acquire(item)
    if admission.dispatched:
        pool.inflight += 1
        order.append(item.request_id)
    return admission


async def test_dispatches_at_once_when_the_pool_has_room(pool: Pool) -> None:
    gate = make_gate(pool, bound=4)
    admission = await gate.acquire(FlowItem("r1"))
    assert admission.dispatched and admission.waited_s == 0.0
    assert gate.waiting == 0
    assert gate.controller.stats.admitted == 1


async def test_sheddable_request_is_refused_when_saturated(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    admission = await gate.acquire(FlowItem("low", priority=-1))
    assert (admission.outcome, admission.reason, admission.http_status) == ("rejected", SHED_SATURATED, 429)
    assert "in-flight >= 1" in gate.detector.reason


async def test_waits_while_saturated_and_a_poke_releases_it(pool: Pool) -> None:
    pool.inflight = 1
    clock = Clock(100.0)
    gate = make_gate(pool, clock=clock, bound=1)
    order: list[str] = []
    task = asyncio.create_task(picker(gate, pool, FlowItem("r1"), order))
    await run_ready_callbacks()
    assert not task.done() and gate.waiting == 1

    gate.poke()  # still saturated: nothing moves
    await run_ready_callbacks()
    assert not task.done()

    pool.inflight = 0  # a request finished
    clock.now = 101.5
    gate.poke()
    admission = await asyncio.wait_for(task, SAFETY_TIMEOUT_S)
    assert admission.dispatched and admission.waited_s == pytest.approx(1.5)
    assert order == ["r1"] and gate.waiting == 0
    assert gate.controller.stats.dispatched_from_queue == 1


async def test_releases_one_at_a_time_in_priority_order(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    order: list[str] = []
    items = [FlowItem("p0", priority=0), FlowItem("p5", priority=5), FlowItem("p1", priority=1)]
    tasks = [asyncio.create_task(picker(gate, pool, item, order)) for item in items]
    await run_ready_callbacks()
    assert gate.waiting == 3

    for expected in (["p5"], ["p5", "p1"], ["p5", "p1", "p0"]):
        pool.inflight -= 1  # one completes, so one slot: exactly one waiter may take it
        gate.poke()
        await run_ready_callbacks()
        assert order == expected
        assert pool.inflight == 1
    await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S)


async def test_a_light_tenant_interleaves_with_a_flooding_one(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    order: list[str] = []
    items = [FlowItem(f"flood{i}", fairness_id="flood") for i in range(6)]
    items += [FlowItem(f"light{i}", fairness_id="light") for i in range(2)]
    tasks = [asyncio.create_task(picker(gate, pool, item, order)) for item in items]
    await run_ready_callbacks()
    for _ in items:
        pool.inflight -= 1
        gate.poke()
        await run_ready_callbacks()
    await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S)
    assert order[:4] == ["flood0", "light0", "flood1", "light1"]


async def test_an_arrival_behind_a_queue_does_not_overtake_it(pool: Pool) -> None:
    pool.inflight = 10
    gate = make_gate(pool, bound=10)
    order: list[str] = []
    early = asyncio.create_task(picker(gate, pool, FlowItem("early"), order))
    await run_ready_callbacks()
    pool.inflight = 0  # room again, but nobody poked yet
    late = asyncio.create_task(picker(gate, pool, FlowItem("late"), order))
    await asyncio.wait_for(asyncio.gather(early, late), SAFETY_TIMEOUT_S)
    assert order == ["early", "late"]


async def test_the_expiry_timer_rejects_a_request_past_its_wait_bound(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, clock=time.monotonic, bound=1, max_wait_s=0.05)
    started = time.monotonic()
    # Nobody pokes: only the timer can end this wait.
    admission = await asyncio.wait_for(gate.acquire(FlowItem("r1")), SAFETY_TIMEOUT_S)
    assert (admission.outcome, admission.reason, admission.http_status) == ("rejected", WAIT_EXCEEDED, 503)
    assert admission.waited_s >= 0.05
    assert time.monotonic() - started >= 0.05
    assert gate.waiting == 0
    assert gate.controller.stats.rejected == {WAIT_EXCEEDED: 1}


async def test_cancelling_the_waiting_task_takes_the_request_out_of_the_queue(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    task = asyncio.create_task(gate.acquire(FlowItem("r1")))
    await run_ready_callbacks()
    assert "r1" in gate.controller
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "r1" not in gate.controller
    assert gate.waiting == 0
    assert gate.controller.stats.cancelled == 1
    assert gate.controller.next_deadline() is None


async def test_a_turn_left_unused_by_a_cancelled_caller_passes_to_the_next(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    order: list[str] = []
    first = asyncio.create_task(picker(gate, pool, FlowItem("first", priority=5), order))
    second = asyncio.create_task(picker(gate, pool, FlowItem("second"), order))
    await run_ready_callbacks()
    pool.inflight = 0
    gate.poke()  # releases "first" ...
    first.cancel()  # ... whose client leaves before its task runs
    with pytest.raises(asyncio.CancelledError):
        await first
    admission = await asyncio.wait_for(second, SAFETY_TIMEOUT_S)
    assert admission.dispatched and order == ["second"]


async def test_eviction_answers_the_evicted_waiter(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1, max_queued_requests=1)
    low = asyncio.create_task(gate.acquire(FlowItem("low", priority=0)))
    await run_ready_callbacks()
    high = asyncio.create_task(gate.acquire(FlowItem("high", priority=3)))
    evicted = await asyncio.wait_for(low, SAFETY_TIMEOUT_S)
    assert (evicted.outcome, evicted.reason, evicted.http_status) == ("rejected", QUEUE_FULL, 429)
    assert not high.done() and "high" in gate.controller
    gate.close()
    assert (await asyncio.wait_for(high, SAFETY_TIMEOUT_S)).reason == SHUTTING_DOWN


async def test_close_refuses_waiting_and_later_requests(pool: Pool) -> None:
    pool.inflight = 1
    gate = make_gate(pool, bound=1)
    tasks = [asyncio.create_task(gate.acquire(FlowItem(f"r{i}"))) for i in range(3)]
    await run_ready_callbacks()
    gate.close()
    answers = await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S)
    assert {(a.reason, a.http_status) for a in answers} == {(SHUTTING_DOWN, 503)}
    assert (await gate.acquire(FlowItem("after"))).reason == SHUTTING_DOWN
    assert len(gate.controller) == 0
