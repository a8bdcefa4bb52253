"""Flow control: what happens to requests while the pool is saturated.

Three parts, all plain code over in-memory state with time passed in, so the live server
and the virtual-time simulator make the same decisions:

- ``SaturationDetector`` decides whether the pool can take more work, from trusted scraped
  metrics and kvsched's own in-flight counts, with hysteresis.
- ``FlowController`` admits, queues, orders, expires and rejects requests. While the pool is
  saturated, sheddable requests (priority < 0) are rejected at once and the others wait,
  boundedly, in priority order; within one priority, tenants (fairness ids) take turns;
  within one tenant the request with the least slack goes first, and requests that can no
  longer meet their objective yield.
- ``FlowStats`` accounts for every request: each one is admitted at once, dispatched from the
  queue, rejected (by reason), cancelled, or still queued.

Every rejection carries a reason (the gateway returns it in
``x-llm-d-request-dropped-reason``) and an HTTP status: 429 when the client should back off
(shed, queue full), 503 when kvsched gave up on the request (wait exceeded, shutdown).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core.scoring.types import EndpointState

__all__ = [
    "QUEUE_FULL",
    "REJECTION_STATUS",
    "SHED_SATURATED",
    "SHUTTING_DOWN",
    "WAIT_EXCEEDED",
    "Admission",
    "FlowControlConfig",
    "FlowController",
    "FlowItem",
    "FlowStats",
    "SaturationDetector",
]

SHED_SATURATED = "sheddable request dropped: pool saturated"
QUEUE_FULL = "queue full"
WAIT_EXCEEDED = "queue wait exceeded"
SHUTTING_DOWN = "flow control shutting down"

REJECTION_STATUS: Mapping[str, int] = {
    SHED_SATURATED: 429,
    QUEUE_FULL: 429,
    WAIT_EXCEEDED: 503,
    SHUTTING_DOWN: 503,
}


class FlowControlConfig(BaseModel):
    """When the pool counts as saturated, and how requests wait while it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Queue requests while the pool is saturated. When off, every request is dispatched "
        "at once, except that sheddable ones (priority < 0) are still rejected under saturation, as "
        "the Inference Extension does without flow control.",
    )
    queue_depth_threshold: int = Field(
        5,
        ge=1,
        description="An endpoint is over its limits at this many waiting requests "
        "(vllm:num_requests_waiting): its running batch is full, so more work there only queues in "
        "the engine, first come first served, where priorities and fairness no longer apply. The "
        "Inference Extension's saturation detector uses the same figure.",
    )
    kv_cache_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="An endpoint is over its limits at this KV-cache usage (0..1): every running "
        "sequence needs a new block each block_size tokens, so above this the engine soon preempts "
        "rather than admits. The Inference Extension's default.",
    )
    max_inflight_per_endpoint: int = Field(
        256,
        ge=1,
        description="An endpoint is over its limits with this many of kvsched's routed, unfinished "
        "requests (vLLM's default max_num_seqs: beyond it requests wait in the engine). Unlike the "
        "scraped figures this count is never stale, so it applies to every endpoint and is what "
        "bounds a burst of dispatches between two scrapes.",
    )
    max_queued_prefill_ms: float = Field(
        1000.0,
        gt=0,
        description="An endpoint is over its limits with this much prefill queued ahead of a new "
        "request: the prompt tokens kvsched routed there that have not reached their first token, "
        "at the latency model's per-token prefill cost (learned online, so it holds for any model "
        "and token scale). Request counts miss what saturates an engine: one 100k-token prompt "
        "holds every request behind it for seconds, while 5 short ones barely register. vLLM "
        "admits requests into its running batch while KV blocks last, so its waiting count stays "
        "near 0 until long after TTFTs are lost.",
    )
    metrics_stale_after_s: float = Field(
        2.0,
        gt=0,
        description="Scraped metrics older than this (or never scraped) are not trusted; such an "
        "endpoint is judged on kvsched's in-flight count alone (unknown is not proof of overload). "
        "Keep equal to scoring.limits.metrics_stale_after_s so both mean the same by 'trusted'.",
    )
    release_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Hysteresis: a saturated pool is released only when some endpoint is below this "
        "fraction of every limit (by default 5 waiting -> under 4, KV 0.8 -> under 0.64), so "
        "metrics hovering at a limit do not open and close the gate on every scrape. 1 = none.",
    )
    # 2,000: a bound on memory, not on waiting (max_wait_s bounds that). At 1,000 the chat
    # workload past saturation (kvsched bench policies) refused 439 of 10,431 requests "queue
    # full" that the pool went on to serve within max_wait_s once admitted (at 2,000: 0 refused,
    # TTFT p99 6.5 s). The peers bound their queues higher: the Inference Extension's flow
    # control by 1 GB of bodies per priority band (pkg/epp/flowcontrol/registry/config.go,
    # defaultPriorityBandMaxBytes), llm-d-router's (the same file) by 5,000 requests as well
    # (defaultPriorityBandMaxRequests). kvsched counts requests, not bytes, so the bound stays
    # where 2,000 bodies of the large-prompt bench (220 KB) hold 440 MB, under a quarter of the
    # chart's 2 GiB memory limit.
    max_queued_requests: int = Field(
        2000,
        ge=0,
        description="Requests waiting at most; each holds its body in memory. When full, an arrival "
        "evicts the newest request of the lowest priority below its own, else it is rejected "
        "('queue full'). A queue longer than the pool drains within max_wait_s only expires the "
        "surplus later instead of rejecting it now.",
    )
    max_wait_s: float = Field(
        20.0,
        gt=0,
        description="Longest a request waits before it is rejected ('queue wait exceeded', 503). "
        "Keep it below the gateway's ext_proc message_timeout (30 s in kvsched's Envoy "
        "configuration) so the client gets kvsched's explained answer, not the gateway's timeout.",
    )


@dataclass(frozen=True, slots=True)
class FlowItem:
    """One request as flow control sees it."""

    request_id: str
    priority: int = 0  # higher first; < 0 is sheddable under saturation
    fairness_id: str = ""  # the tenant whose requests share a turn ("" = the anonymous tenant)
    slo_ttft_ms: float | None = None
    # When the request reached flow control; None: the ``now`` of FlowController.admit, which
    # stamps it, so every item the controller hands back has it set.
    enqueued_at: float | None = None
    # The least time it needs once dispatched (its own prefill on the best endpoint, by the
    # latency model): it must start this long before its TTFT objective to meet it.
    service_s: float = 0.0
    # The adapter's own handle for the request (a stream, a simulated request); never read here.
    payload: Any = field(default=None, compare=False, repr=False)

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one request: go now, wait, or refused (with why and which HTTP status)."""

    outcome: Literal["dispatch", "queued", "rejected"]
    reason: str = ""
    http_status: int | None = None  # set when rejected
    # A waiting request this arrival pushed out of a full queue (rejected with QUEUE_FULL); its
    # waiter must be told.
    evicted: FlowItem | None = None
    waited_s: float = 0.0  # time spent queued, for a request dispatched or rejected after waiting

    @property
    def dispatched(self) -> bool:
        return self.outcome == "dispatch"

    @property
    def queued(self) -> bool:
        return self.outcome == "queued"

    @property
    def rejected(self) -> bool:
        return self.outcome == "rejected"

    @classmethod
    def dispatch(cls, waited_s: float = 0.0) -> Admission:
        if not waited_s:
            # Frozen, so the common answer is one shared object rather than one per request.
            return _DISPATCH_NOW
        return cls("dispatch", waited_s=waited_s)

    @classmethod
    def reject(cls, reason: str, waited_s: float = 0.0) -> Admission:
        return cls("rejected", reason, REJECTION_STATUS.get(reason, 503), waited_s=waited_s)


_DISPATCH_NOW = Admission("dispatch")


# --- saturation -------------------------------------------------------------------------


class SaturationDetector:
    """Whether the pool can take more work.

    The pool is saturated when every healthy endpoint is over one of its limits: at least
    ``queue_depth_threshold`` waiting or ``kv_cache_threshold`` KV usage (scraped, and only
    while trusted), at least ``max_inflight_per_endpoint`` of kvsched's own in-flight
    requests, or at least ``max_queued_prefill_ms`` of prefill queued ahead of a new request
    (``EndpointState.prefill_ms_ahead``, when the caller estimates it). Once saturated it stays
    so until some endpoint is under ``release_fraction`` of every limit. A pool without
    healthy endpoints is not saturated: waiting cannot help it, and the pick answers 503 with
    the real cause.
    """

    def __init__(self, config: FlowControlConfig | None = None) -> None:
        self.config = config or FlowControlConfig()
        self.reason = "not saturated: no observation yet"
        self.saturated_since: float | None = None
        self.transitions = 0  # entries into saturation, for flapping diagnostics

    @property
    def is_saturated(self) -> bool:
        return self.saturated_since is not None

    def saturated(self, states: Iterable[EndpointState], now: float) -> bool:
        """Judge the pool, reading ``states`` only as far as the answer needs: an iterator
        built lazily costs one endpoint, not the pool, whenever the first one has room."""
        healthy = (s for s in states if s.healthy)
        if self.saturated_since is None:
            return self._check_entry(healthy, now)
        return self._check_release(healthy, now)

    def _no_healthy(self, now: float) -> bool:
        self._set(False, now, "not saturated: no healthy endpoint")
        return False

    def _check_entry(self, healthy: Iterator[EndpointState], now: float) -> bool:
        config = self.config
        stale_after = config.metrics_stale_after_s
        queue_limit, kv_limit = config.queue_depth_threshold, config.kv_cache_threshold
        inflight_limit = config.max_inflight_per_endpoint
        prefill_limit = config.max_queued_prefill_ms
        by_waiting = by_kv = by_inflight = by_prefill = 0
        for s in healthy:
            trusted = (age := s.metrics_age_s) is not None and age <= stale_after
            if s.inflight_requests >= inflight_limit:
                by_inflight += 1
            elif s.prefill_ms_ahead is not None and s.prefill_ms_ahead >= prefill_limit:
                by_prefill += 1
            elif trusted and s.waiting >= queue_limit:
                by_waiting += 1
            elif trusted and s.kv_usage >= kv_limit:
                by_kv += 1
            else:
                detail = "" if trusted else " (metrics untrusted, in-flight under its limit)"
                self._set(False, now, f"not saturated: endpoint {s.name} is under its limits{detail}")
                return False
        over = by_waiting + by_kv + by_inflight + by_prefill
        if not over:
            return self._no_healthy(now)
        causes = [
            f"{count} with {label}"
            for count, label in (
                (by_waiting, f"waiting >= {queue_limit}"),
                (by_kv, f"kv usage >= {kv_limit:g}"),
                (by_inflight, f"in-flight >= {inflight_limit}"),
                (by_prefill, f"prefill queued >= {prefill_limit:g} ms"),
            )
            if count
        ]
        self._set(True, now, f"saturated: all {over} healthy endpoints over limits ({', '.join(causes)})")
        return True

    def _check_release(self, healthy: Iterator[EndpointState], now: float) -> bool:
        config = self.config
        stale_after = config.metrics_stale_after_s
        fraction = config.release_fraction
        queue_release = config.queue_depth_threshold * fraction
        kv_release = config.kv_cache_threshold * fraction
        inflight_release = config.max_inflight_per_endpoint * fraction
        prefill_release = config.max_queued_prefill_ms * fraction
        seen = 0
        for s in healthy:
            seen += 1
            trusted = (age := s.metrics_age_s) is not None and age <= stale_after
            prefill_ok = s.prefill_ms_ahead is None or s.prefill_ms_ahead < prefill_release
            if (
                s.inflight_requests < inflight_release
                and prefill_ok
                and (not trusted or (s.waiting < queue_release and s.kv_usage < kv_release))
            ):
                self._set(False, now, f"not saturated: endpoint {s.name} is back under the release levels")
                return False
        if not seen:
            return self._no_healthy(now)
        self.reason = (
            f"saturated: no endpoint back under the release levels (waiting < {queue_release:g}, "
            f"kv usage < {kv_release:g}, in-flight < {inflight_release:g}, prefill queued < "
            f"{prefill_release:g} ms)"
        )
        return True

    def _set(self, saturated: bool, now: float, reason: str) -> None:
        self.reason = reason
        if saturated and self.saturated_since is None:
            self.saturated_since = now
            self.transitions += 1
        elif not saturated:
            self.saturated_since = None


# --- the queue --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowStats:
    """A snapshot of the accounting. Every arrival is in exactly one of: admitted (dispatched
    on arrival), dispatched_from_queue, rejected (any reason, including evicted and expired),
    cancelled, or still queued; so ``arrivals == settled + queue_depth_total``."""

    arrivals: int
    admitted: int
    queued: int  # ever entered the queue
    dispatched_from_queue: int
    cancelled: int
    evicted: int  # queued requests pushed out by a higher priority (counted in rejected too)
    rejected: Mapping[str, int]
    queue_depth: Mapping[int, int]  # now, by priority
    dispatch_wait_s_sum: float  # over dispatched_from_queue: the mean wait is the ratio

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def queue_depth_total(self) -> int:
        return sum(self.queue_depth.values())

    @property
    def settled(self) -> int:
        return self.admitted + self.dispatched_from_queue + self.rejected_total + self.cancelled


@dataclass(slots=True, eq=False)
class _Queued:
    item: FlowItem
    seq: int  # arrival order: the tie-breaker everywhere, so equal inputs give equal orders
    enqueued_at: float
    expires_at: float
    # Urgency within the tenant, least slack first: the latest time it can be sent and still
    # meet its TTFT objective (its wait bound for a request without one).
    start_by: float
    hopeless_after: float  # past this it cannot meet its objective (inf without one)
    live: bool = True


@dataclass(slots=True, eq=False)
class _Tenant:
    # (start_by, seq, entry); entries that left the queue otherwise are skipped when they surface.
    heap: list[tuple[float, int, _Queued]] = field(default_factory=list)
    # Requests found past hope, (seq, entry): they go in arrival order once no request of the
    # band can still meet its objective.
    late: list[tuple[int, _Queued]] = field(default_factory=list)
    size: int = 0

    def settle(self, now: float) -> None:
        """Move hopeless requests off the head of the heap; drop dead heads."""
        heap = self.heap
        while heap:
            entry = heap[0][2]
            if not entry.live:
                heapq.heappop(heap)
            elif entry.hopeless_after < now:
                heapq.heappop(heap)
                heapq.heappush(self.late, (entry.seq, entry))
            else:
                return

    def pop_late(self) -> _Queued:
        late = self.late
        while not late[0][1].live:
            heapq.heappop(late)
        return heapq.heappop(late)[1]


@dataclass(slots=True, eq=False)
class _Band:
    """The requests of one priority."""

    tenants: dict[str, _Tenant] = field(default_factory=dict)
    # Tenants with waiting requests, in turn order: the head goes next, then moves to the back.
    rotation: deque[str] = field(default_factory=deque)
    # By request id, in arrival order: the last one is the newest, the one a full queue evicts.
    entries: dict[str, _Queued] = field(default_factory=dict)


@dataclass(slots=True)
class _Counters:
    arrivals: int = 0
    admitted: int = 0
    queued: int = 0
    dispatched_from_queue: int = 0
    cancelled: int = 0
    evicted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dispatch_wait_s_sum: float = 0.0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class FlowController:
    """The bounded, ordered waiting room in front of the scheduler.

    The caller tells ``admit`` whether the pool is saturated (``SaturationDetector``), calls
    ``dispatch_next`` whenever capacity may have freed (a request finished, metrics refreshed,
    saturation cleared) and the pool is not saturated, and ``expire`` at ``next_deadline()``.
    Dispatch order: highest priority first; within a priority the fairness ids take turns
    (round-robin by request); within one fairness id, least slack first: a request must start
    by its TTFT objective less its own service time (``FlowItem.service_s``), or by the end of
    its wait bound, whichever is sooner (so requests without an SLO go first come, first
    served and are never starved by later ones with an SLO). A request past that point can no
    longer meet its objective: it yields to every request of its priority that still can, and
    such requests then go in arrival order. Serving the most overdue first instead spends
    capacity on lost causes and makes the next ones late too.
    """

    def __init__(self, config: FlowControlConfig | None = None) -> None:
        self.config = config or FlowControlConfig()
        self._entries: dict[str, _Queued] = {}
        self._bands: dict[int, _Band] = {}
        self._priorities: list[int] = []  # of non-empty bands, ascending
        self._expiry: list[tuple[float, int, _Queued]] = []  # may hold entries no longer live
        # Past their wait bound, out of the queue, not yet handed to the caller by ``expire``.
        self._overdue: list[_Queued] = []
        self._seq = 0
        self._counters = _Counters()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    # --- arrivals --------------------------------------------------------------------------

    def admit(self, item: FlowItem, saturated: bool, now: float) -> Admission:
        """Dispatch at once, queue, or reject an arriving request.

        A request is dispatched at once only when the pool is not saturated and nobody is
        waiting: an arrival never overtakes the queue. When it is queued while the pool is not
        saturated, the caller should go on to ``dispatch_next``.
        """
        if item.request_id in self._entries:
            raise ValueError(f"request {item.request_id!r} is already queued")
        counters = self._counters
        counters.arrivals += 1
        if saturated and item.priority < 0:
            counters.reject(SHED_SATURATED)
            return Admission.reject(SHED_SATURATED)
        if not self.config.enabled or (not saturated and not self._entries):
            counters.admitted += 1
            return Admission.dispatch()
        evicted: FlowItem | None = None
        if len(self._entries) >= self.config.max_queued_requests:
            if not self._priorities or item.priority <= self._priorities[0]:
                counters.reject(QUEUE_FULL)
                return Admission.reject(QUEUE_FULL)
            victim = next(reversed(self._bands[self._priorities[0]].entries.values()))
            self._remove(victim)
            counters.reject(QUEUE_FULL)
            counters.evicted += 1
            evicted = victim.item
        if item.enqueued_at is None:
            # Only a queued item keeps the time: a dispatched one is not kept (a replace()
            # is a quarter of an admission that dispatches at once).
            item = replace(item, enqueued_at=now)
        self._enqueue(item, now)
        counters.queued += 1
        return Admission("queued", evicted=evicted)

    def _enqueue(self, item: FlowItem, now: float) -> None:
        enqueued_at = item.enqueued_at if item.enqueued_at is not None else now
        expires_at = enqueued_at + self.config.max_wait_s
        start_by, hopeless_after = expires_at, math.inf
        if item.slo_ttft_ms is not None:
            hopeless_after = enqueued_at + item.slo_ttft_ms / 1000.0 - item.service_s
            start_by = min(start_by, hopeless_after)
        self._seq += 1
        entry = _Queued(item, self._seq, enqueued_at, expires_at, start_by, hopeless_after)
        self._entries[item.request_id] = entry
        band = self._bands.get(item.priority)
        if band is None:
            band = self._bands[item.priority] = _Band()
            bisect.insort(self._priorities, item.priority)
        band.entries[item.request_id] = entry
        tenant = band.tenants.get(item.fairness_id)
        if tenant is None:
            tenant = band.tenants[item.fairness_id] = _Tenant()
            band.rotation.append(item.fairness_id)
        heapq.heappush(tenant.heap, (entry.start_by, entry.seq, entry))
        tenant.size += 1
        heapq.heappush(self._expiry, (entry.expires_at, entry.seq, entry))

    def _remove(self, entry: _Queued) -> None:
        """Take a live entry out of every structure but the lazily cleaned heaps."""
        entry.live = False
        item = entry.item
        del self._entries[item.request_id]
        band = self._bands[item.priority]
        del band.entries[item.request_id]
        tenant = band.tenants[item.fairness_id]
        tenant.size -= 1
        if tenant.size == 0:
            del band.tenants[item.fairness_id]
            band.rotation.remove(item.fairness_id)
        elif len(tenant.heap) + len(tenant.late) > 2 * tenant.size + 32:
            tenant.heap = [key for key in tenant.heap if key[2].live]
            heapq.heapify(tenant.heap)
            tenant.late = [key for key in tenant.late if key[1].live]
            heapq.heapify(tenant.late)
        if not band.entries:
            del self._bands[item.priority]
            self._priorities.remove(item.priority)
        if len(self._expiry) > 2 * len(self._entries) + 32:
            self._expiry = [key for key in self._expiry if key[2].live]
            heapq.heapify(self._expiry)

    # --- departures -------------------------------------------------------------------------

    def dispatch_next(self, now: float) -> FlowItem | None:
        """The next request to send, or None when nothing is waiting.

        Requests past their wait bound are never dispatched: they are moved aside and handed
        back by the next ``expire``.
        """
        self._collect_overdue(now)
        if not self._priorities:
            return None
        band = self._bands[self._priorities[-1]]
        # The first tenant in turn whose next request can still meet its objective; when no
        # request of the band can, the first tenant in turn, oldest hopeless request first.
        entry: _Queued | None = None
        turn, fairness_id = 0, band.rotation[0]
        for position, candidate in enumerate(band.rotation):
            tenant = band.tenants[candidate]
            tenant.settle(now)
            if tenant.heap:
                turn, fairness_id = position, candidate
                entry = heapq.heappop(tenant.heap)[2]
                break
        if entry is None:
            entry = band.tenants[fairness_id].pop_late()
        self._remove(entry)
        if fairness_id in band.tenants:
            # The served tenant goes to the back of the turn order.
            del band.rotation[turn]
            band.rotation.append(fairness_id)
        counters = self._counters
        counters.dispatched_from_queue += 1
        counters.dispatch_wait_s_sum += max(now - entry.enqueued_at, 0.0)
        return entry.item

    def expire(self, now: float) -> list[tuple[FlowItem, str]]:
        """Requests whose wait bound has passed (at ``now`` or earlier), now rejected, oldest first."""
        self._collect_overdue(now)
        overdue, self._overdue = self._overdue, []
        return [(entry.item, WAIT_EXCEEDED) for entry in overdue]

    def _collect_overdue(self, now: float) -> None:
        counters = self._counters
        # Not a local alias: removing an entry may compact the heap into a new list.
        while self._expiry and self._expiry[0][0] <= now:
            entry = heapq.heappop(self._expiry)[2]
            if entry.live:
                self._remove(entry)
                self._overdue.append(entry)
                counters.reject(WAIT_EXCEEDED)

    def cancel(self, request_id: str) -> FlowItem | None:
        """The client went away: drop its request if it is waiting; None if it is not."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        self._remove(entry)
        self._counters.cancelled += 1
        return entry.item

    def drain(self, reason: str = SHUTTING_DOWN) -> list[FlowItem]:
        """Reject every waiting request (shutdown), in arrival order."""
        drained = sorted(self._entries.values(), key=lambda entry: entry.seq)
        for entry in drained:
            self._remove(entry)
            self._counters.reject(reason)
        return [entry.item for entry in drained]

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to return; None while nothing waits."""
        if self._overdue:
            return self._overdue[0].expires_at
        expiry = self._expiry
        while expiry and not expiry[0][2].live:
            heapq.heappop(expiry)
        return expiry[0][0] if expiry else None

    # --- accounting -------------------------------------------------------------------------

    @property
    def stats(self) -> FlowStats:
        counters = self._counters
        return FlowStats(
            arrivals=counters.arrivals,
            admitted=counters.admitted,
            queued=counters.queued,
            dispatched_from_queue=counters.dispatched_from_queue,
            cancelled=counters.cancelled,
            evicted=counters.evicted,
            rejected=dict(counters.rejected),
            queue_depth={priority: len(self._bands[priority].entries) for priority in self._priorities},
            dispatch_wait_s_sum=counters.dispatch_wait_s_sum,
        )
