"""The asyncio side of flow control: requests that must wait await a future here.

``FlowGate.acquire`` asks the ``FlowController`` about a request and returns at once when it
may go (or is refused); otherwise it waits until ``poke`` (the server calls it when a request
completes or metrics refresh) finds the pool able to take it, or its wait bound ends. The
bound is kept by one ``loop.call_at`` timer on the controller's next deadline, never by
polling. Cancelling the awaiting task (the client went away) takes the request out of the
queue.

A poke releases one request and checks again only after that request's task has run: the
caller is expected to pick an endpoint right after ``acquire`` returns, without awaiting in
between, so kvsched's in-flight count already includes it at the next saturation check and
one poke does not empty the whole queue onto metrics scraped before any of it was sent.

Everything here runs on the event loop's thread; ``poke`` from another thread must go
through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from scheduler.core.flowcontrol import (
    QUEUE_FULL,
    SHUTTING_DOWN,
    Admission,
    FlowController,
    FlowItem,
    SaturationDetector,
)
from scheduler.core.scoring.types import EndpointState

__all__ = ["FlowGate", "StateProvider"]

# The endpoints' state at a given ``now`` (the Scheduler's view, in-flight counts included).
StateProvider = Callable[[float], Iterable[EndpointState]]


class FlowGate:
    def __init__(
        self,
        controller: FlowController,
        detector: SaturationDetector,
        state_provider: StateProvider,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # One clock for every call into the controller: arrivals, pokes and the expiry timer
        # all speak the same ``now``, the one the Scheduler is given.
        self.controller = controller
        self.detector = detector
        self._state_provider = state_provider
        self._clock = clock
        self._waiters: dict[str, asyncio.Future[Admission]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def saturated(self, now: float | None = None) -> bool:
        """The detector's verdict on the pool as it is now."""
        when = self._clock() if now is None else now
        return self.detector.saturated(self._state_provider(when), when)

    async def acquire(self, item: FlowItem) -> Admission:
        """Wait until ``item`` may be sent; the answer is "dispatch" or "rejected", never "queued"."""
        admission = self.admit_now(item)
        if isinstance(admission, Admission):
            return admission
        return await self.wait(item.request_id, admission)

    def admit_now(self, item: FlowItem) -> Admission | asyncio.Future[Admission]:
        """``acquire`` without awaiting: the admission when it is decided at once (the common
        case, which then needs no task), else the future to ``wait`` on (the item is queued)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._closed:
            return Admission.reject(SHUTTING_DOWN)
        now = self._clock()
        # Expired requests leave first, so their places count for this arrival.
        self._reject_expired(now)
        saturated = self.saturated(now)
        admission = self.controller.admit(item, saturated, now)
        if admission.evicted is not None:
            self._settle(admission.evicted.request_id, Admission.reject(QUEUE_FULL))
        if not admission.queued:
            self._arm_timer()
            return admission
        future: asyncio.Future[Admission] = loop.create_future()
        self._waiters[item.request_id] = future
        if not saturated:
            # The pool has room but others were already waiting: the queue decides who goes.
            self._pump_soon()
        self._arm_timer()
        return future

    async def wait(self, request_id: str, future: asyncio.Future[Admission]) -> Admission:
        """The queued request's admission (``admit_now``'s future); cancelling dequeues it."""
        try:
            return await future
        except asyncio.CancelledError:
            # Still queued: out of the queue. Already released: the turn passes on by itself,
            # since the release step that follows runs after this task and finds the room unused.
            self._waiters.pop(request_id, None)
            if self.controller.cancel(request_id) is not None:
                self._arm_timer()
            raise

    def poke(self) -> None:
        """Capacity may have freed (a request finished, metrics refreshed): release who can go."""
        if self._loop is None or self._closed:
            return
        self._pump()

    def close(self) -> None:
        """Refuse every waiting request (503) and every later one; stop the timer."""
        self._closed = True
        for item in self.controller.drain(SHUTTING_DOWN):
            self._settle(item.request_id, Admission.reject(SHUTTING_DOWN))
        for request_id in list(self._waiters):
            self._settle(request_id, Admission.reject(SHUTTING_DOWN))
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_deadline = None, None
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None

    # --- internals ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Reject the expired; release one request unless a release step is already scheduled."""
        if self._closed:
            return
        now = self._clock()
        self._reject_expired(now)
        if self._pump_handle is None and len(self.controller) and not self.saturated(now):
            item = self.controller.dispatch_next(now)
            if item is not None:
                waited = now - item.enqueued_at if item.enqueued_at is not None else 0.0
                self._settle(item.request_id, Admission.dispatch(waited_s=max(waited, 0.0)))
            if len(self.controller):
                # After the released task has run (its wake-up is already scheduled), so the
                # next check sees it in flight.
                self._pump_soon()
        self._arm_timer()

    def _pump_soon(self) -> None:
        if self._pump_handle is None and self._loop is not None:
            self._pump_handle = self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_handle = None
        self._pump()

    def _reject_expired(self, now: float) -> None:
        for item, reason in self.controller.expire(now):
            waited = now - item.enqueued_at if item.enqueued_at is not None else 0.0
            self._settle(item.request_id, Admission.reject(reason, waited_s=max(waited, 0.0)))

    def _settle(self, request_id: str, admission: Admission) -> None:
        future = self._waiters.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(admission)

    def _arm_timer(self) -> None:
        deadline = self.controller.next_deadline()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_deadline = None, None
        if deadline is None or self._loop is None:
            return
        # The controller's clock need not be the loop's: convert through the remaining delay.
        delay = max(deadline - self._clock(), 0.0)
        self._timer = self._loop.call_at(self._loop.time() + delay, self._on_timer)
        self._timer_deadline = deadline

    def _on_timer(self) -> None:
        self._timer, self._timer_deadline = None, None
        self._pump()
