"""Per-publisher KV-event ingest: sequence tracking, gap handling and resync decisions.

vLLM numbers the batches of one publisher (one engine process, one data-parallel rank)
with an 8-byte big-endian ``seq`` from 0; a restarted process starts again at 0. The live
PUB socket drops silently at its high-water mark, so a jump in ``seq`` is the only sign of
lost events; the optional replay ROUTER re-sends the last ``buffer_steps`` batches from a
requested ``seq`` (vLLM 0.33.0 ``vllm/distributed/kv_events.py``; shared PROTOCOLS.md §1).
``WorkerIngest`` keeps one publisher's slice of the ``PrefixIndex`` equal to the engine's
cache, or knowingly approximate when that cannot be done. The ZMQ adapter
(``scheduler.adapters.kv_subscriber``) only moves bytes and follows its orders.

Situations and what is done:

* First connection (with a replay endpoint and ``join_replay``): a replay from 0 is asked
  at once, so an idle engine's history is known before its next batch; one that does not
  reach back to 0 leaves the view incomplete.
* First batch ever: the worker's index entries are cleared (anything there is stale),
  which is not counted as a reset. ``seq == 0``: the whole history is seen. ``seq > 0``:
  the subscriber joined late; with a replay endpoint (and ``join_replay``) a replay from 0
  is requested and whatever the publisher still holds is applied, otherwise ingest starts
  from here. Either way the view stays incomplete unless history from 0 was obtained.
* In order: applied.
* Gap (``seq`` jumps ahead): with a replay endpoint, a replay from the first missing
  ``seq`` is requested and live batches are buffered until it ends; replayed batches are
  applied in order (duplicates skipped), then the buffered live ones. Without one, or when
  the replay does not reach the missing batches (the publisher's buffer rotated, the replay
  failed or timed out, the live buffer overflowed), the worker is reset: its entries are
  cleared and ingest goes on with whatever follows the hole (the replayed batches past it,
  then the buffered live ones). A later hole inside the live buffer gets its own replay.
* Restart (``seq`` goes backwards on the live stream): a new engine process starts with an
  empty cache, so the worker is reset and followed from its ``seq`` 0; batches of the new
  process that were missed are replayed when possible. A restart seen while a replay runs
  abandons that replay and drops the buffered batches of the old process.
* Undecodable payload: its ``seq`` counts as seen and its events as lost. A replay would
  carry the same bytes, so the worker is reset without asking for one. Single events that
  fail to decode inside a good batch are counted and skipped without a reset: an event type
  from a newer vLLM would otherwise reset the worker on every batch.
* Orphans (a BlockStored whose parent the worker never reported): with a complete view
  this means an event was lost without a ``seq`` gap, so the worker is rebuilt: cleared and
  replayed from the last point its cache was known empty (``seq`` 0, or the last batch with
  AllBlocksCleared); without a replay endpoint it is reset. With an incomplete view (late
  join, after a reset) orphans are expected (blocks cached before the view began) and only
  counted. A rebuild that still yields orphans, or orphans again within
  ``min_rebuild_interval_s`` of the last rebuild (e.g. an index bounded by ``max_blocks``
  evicting parents), makes the view incomplete instead of rebuilding in a loop.
* AllBlocksCleared makes the view complete again from that batch on.

What ingest believes of each publisher is summed up as a ``PublisherView`` (``view(now)``):
``exact`` (complete and current), ``degraded`` (behind, or history lost) or, for an
endpoint that publishes no events, ``fallback`` (approximate mode), with the reason.

Resets are counted only when entries were actually cleared (nothing applied since the
last clear means nothing to clear). Everything here is plain code over in-memory state;
time comes in as ``now`` (seconds, monotonic), used for replay timeouts and rebuild pacing.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core.events import AllBlocksCleared, DecodedBatch, KVEventDecodeError
from scheduler.core.index import PrefixIndex

log = logging.getLogger(__name__)


class VerdictKind(enum.Enum):
    FIRST = "first"
    IN_ORDER = "in_order"
    GAP = "gap"
    RESTART = "restart"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    # Sequence numbers that never arrived (GAP only; empty otherwise).
    missing: range = range(0)


_FIRST = Verdict(VerdictKind.FIRST)
_IN_ORDER = Verdict(VerdictKind.IN_ORDER)
_RESTART = Verdict(VerdictKind.RESTART)
_DUPLICATE = Verdict(VerdictKind.DUPLICATE)


class SequenceTracker:
    """The next sequence number expected from one publisher.

    ``may_repeat`` says whether the message may repeat one already seen: replayed batches
    and live batches buffered during a replay overlap each other, so there a step backwards
    is a DUPLICATE. On the live stream alone (ZMQ keeps one connection's messages in order)
    a step backwards can only be a RESTART of the publisher.
    """

    __slots__ = ("expected",)

    def __init__(self, expected: int | None = None) -> None:
        self.expected = expected

    def classify(self, seq: int, *, may_repeat: bool = False) -> Verdict:
        expected = self.expected
        if expected is None:
            return _FIRST
        if seq == expected:
            return _IN_ORDER
        if seq > expected:
            return Verdict(VerdictKind.GAP, range(expected, seq))
        return _DUPLICATE if may_repeat else _RESTART

    def observe(self, seq: int, *, may_repeat: bool = False) -> Verdict:
        """Classify ``seq`` and move past it (a duplicate moves nothing)."""
        verdict = self.classify(seq, may_repeat=may_repeat)
        if verdict.kind is not VerdictKind.DUPLICATE:
            self.expected = seq + 1
        return verdict


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replay_timeout_s: float = Field(
        5.0, gt=0, description="A replay with no reply for this long has failed (idle timeout)."
    )
    max_buffered_batches: int = Field(
        10_000,
        ge=1,
        description="Live batches held while a replay runs; one more abandons the replay (reset).",
    )
    max_buffered_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Bytes of live batches held while a replay runs; more abandons the replay (reset). "
        "A replay of vLLM's whole buffer (10,000 batches) takes about a second, in which a busy "
        "engine publishes ~100 batches of a few KB: 16 MiB is room for ~25 full engine steps "
        "(0.6 MB each, see max_batch_bytes) and bounds what a flood can make it hold.",
    )
    join_replay: bool = Field(
        True, description="On the first batch with seq > 0, replay from 0 when a replay endpoint exists."
    )
    max_batch_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="A batch payload larger than this is skipped undecoded (counted as "
        "oversized_batches; the worker's entries reset as for any lost batch). One vLLM engine "
        "step's batch stores at most max_num_batched_tokens / block_size blocks: 8,192 blocks "
        "with their token ids are about 0.6 MB. A 1M-block batch (57 MB) took seconds of the "
        "event loop and 660 MB of memory to decode.",
    )
    max_replay_resumes: int = Field(
        64,
        ge=0,
        description="Times one replay is asked again from where its answer broke off. vLLM answers a "
        "replay on a ROUTER socket, which drops replies that do not fit the connection's high-water "
        "marks (1,000 messages each side by default) rather than wait: a 10,000-batch replay read "
        "slower than the engine sends it arrives with holes (2,000 of 10,000 lost here). Each "
        "resumption gets at least a pipe's worth, so 10,000 batches need a handful.",
    )
    min_rebuild_interval_s: float = Field(
        60.0, ge=0, description="Orphans sooner than this after a rebuild make the view incomplete instead."
    )
    max_queued_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Bytes of received batches one publisher may have waiting for ingest; a batch "
        "beyond it is dropped whole (kvsched_kv_dropped_batches, reason publisher_bytes) and is a "
        "sequence gap like any lost message (replayed, or the worker reset). An empty queue takes "
        "any one batch. 16 MiB holds ~25 of the largest engine steps (0.6 MB, see max_batch_bytes) "
        "or ~7,000 batches of 2.3 KB, seconds of a busy engine's events.",
    )
    max_queued_bytes_total: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Bytes of received batches waiting for ingest over every publisher of the "
        "process; a batch beyond it is dropped (reason total_bytes). 16 publishers flooding at once "
        "fill it at max_queued_bytes each; a pool of 1,000 pods shares it.",
    )


@dataclass(slots=True)
class IngestStats:
    batches_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    gaps: int = 0
    # Batches that will never be applied (lost, undecodable, or before a late join).
    lost_batches: int = 0
    replays_requested: int = 0
    replays_completed: int = 0
    replays_failed: int = 0
    # Replays asked again from where their answer broke off (replies lost in transit).
    replays_resumed: int = 0
    resets: int = 0
    restarts: int = 0
    rebuilds: int = 0
    duplicates: int = 0
    malformed_frames: int = 0
    malformed_payloads: int = 0
    bad_events: int = 0
    event_errors: int = 0
    orphans: int = 0
    buffer_overflows: int = 0
    stale_replay_messages: int = 0
    # Batches over max_batch_bytes, skipped undecoded.
    oversized_batches: int = 0
    # Times the publisher's connection dropped (its entries left the index each time).
    disconnects: int = 0
    # Faults of kvsched itself while handling a message (logged once with a traceback).
    internal_errors: int = 0
    # Received batches dropped before ingest because the receive queue was at its byte bound:
    # this publisher's (max_queued_bytes) or the process's (max_queued_bytes_total).
    dropped_publisher_bytes: int = 0
    dropped_total_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: IngestStats) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Action(enum.Enum):
    APPLIED = "applied"
    BUFFERED = "buffered"
    DUPLICATE = "duplicate"
    LOST = "lost"
    REPLAY_FINISHED = "replay_finished"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class Step:
    """What became of one input, and what the I/O side must do next."""

    action: Action
    verdict: Verdict | None = None
    # Send a replay request from this seq now (no replay is in flight when this is set).
    replay_from: int | None = None
    # The replay that was in flight is no longer wanted: drop its connection and replies.
    abandon_replay: bool = False


_APPLIED_IN_ORDER = Step(Action.APPLIED, _IN_ORDER)


class ReplayPurpose(enum.Enum):
    GAP = "gap"
    JOIN = "join"
    REBUILD = "rebuild"
    # The connection came back: whatever the publisher sent before it did is replayed from 0.
    RECONNECT = "reconnect"


class _Replay:
    __slots__ = ("deadline", "orphans", "purpose", "received", "resumes", "start")

    def __init__(self, purpose: ReplayPurpose, start: int, deadline: float) -> None:
        self.purpose = purpose
        self.start = start
        self.deadline = deadline
        self.orphans = False
        # Batches of this answer applied so far, and how often the replay was asked again.
        self.received = 0
        self.resumes = 0


# Turns one batch payload into events; raises KVEventDecodeError when the payload as a whole
# is not a batch (``scheduler.codec.kvevents.decode_batch``, handed in by the adapter).
BatchDecoder = Callable[[bytes], DecodedBatch]

# exact: the index holds what the engine reported, all of it, up to the newest batch seen.
# degraded: events flow but the view is behind (a replay is catching up on a gap) or
#   incomplete (history lost: a late join or a gap that could not be replayed, orphans,
#   a restart whose first batches were missed, or no batch received yet).
# fallback: the endpoint publishes no KV events; kvsched's own routing history stands in
#   (approximate mode).
ViewState = Literal["exact", "degraded", "fallback"]
VIEW_STATES: tuple[ViewState, ...] = ("exact", "degraded", "fallback")
# Why a received message was dropped before ingest: the publisher's byte bound
# (``max_queued_bytes``) or the process's (``max_queued_bytes_total``).
DropReason = Literal["publisher_bytes", "total_bytes"]
DROP_REASONS: tuple[DropReason, ...] = ("publisher_bytes", "total_bytes")
NO_BATCH_YET = "no KV-event batch received yet: what the engine cached before is unknown"
NO_KV_EVENTS = "the endpoint publishes no KV events: approximate mode (kvsched's own routing history)"


@dataclass(frozen=True, slots=True)
class PublisherView:
    """What ingest believes of one publisher's slice of the index at one moment.

    ``last_event_age_s`` is the time since the last live batch arrived. It does not make
    the view degraded by itself: vLLM publishes only when its cache changes, so an idle
    engine is silent; whether events stopped while requests were routed there needs the
    routing side's count as well.
    """

    endpoint: str
    rank: int
    worker: str
    state: ViewState
    reason: str
    view_complete: bool
    next_seq: int | None = None
    replay_in_flight: bool = False
    replay_purpose: str | None = None
    replay_from: int | None = None
    buffered: int = 0
    last_event_age_s: float | None = None
    stats: IngestStats | None = None

    @classmethod
    def without_events(cls, endpoint: str, rank: int, worker: str) -> PublisherView:
        """An endpoint (rank) that publishes no KV events."""
        return cls(endpoint, rank, worker, "fallback", NO_KV_EVENTS, view_complete=False)

    def as_dict(self) -> dict[str, Any]:
        document = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "stats"}
        document["counters"] = None if self.stats is None else self.stats.as_dict()
        return document


class WorkerIngest:
    """One publisher (one data-parallel rank of one endpoint) feeding one index worker."""

    def __init__(
        self,
        worker: str,
        index: PrefixIndex,
        *,
        decode: BatchDecoder,
        replay_available: bool,
        config: IngestConfig | None = None,
        context: str = "",
    ) -> None:
        self.worker = worker
        self.index = index
        self._decode_payload = decode
        self.replay_available = replay_available
        self.config = config or IngestConfig()
        # Names the stream in log lines (e.g. the ZMQ endpoint).
        self.context = context or worker
        self.stats = IngestStats()
        self._live = SequenceTracker()
        self._applied = SequenceTracker()
        # Raw payloads: a buffered batch that turns out to be a duplicate is never decoded.
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffer_bytes = 0
        self._replay: _Replay | None = None
        # Where a replay must start to rebuild the worker from an empty cache; None while
        # the view is incomplete (history before the view began is unknown).
        self._empty_at: int | None = None
        # Whether anything was applied since the worker's entries were last cleared.
        self._dirty = False
        self._orphans_pending = False
        self._last_rebuild: float | None = None
        self._logged: set[str] = set()
        # Why the view is incomplete (meaningless while it is complete).
        self._incomplete_why = NO_BATCH_YET
        self._last_live_at: float | None = None
        # The connection dropped since the last live batch (see ``on_disconnected``).
        self._rejoin = False
        # A replay from 0 was asked when the connection came back (``on_connected``): the
        # first live batch after it continues that history instead of starting afresh.
        self._reconnect_replayed = False

    # --- state the I/O side reads ------------------------------------------------------

    @property
    def replay_in_flight(self) -> bool:
        return self._replay is not None

    @property
    def replay_deadline(self) -> float | None:
        return None if self._replay is None else self._replay.deadline

    @property
    def view_complete(self) -> bool:
        """True when every event since the engine's cache was last empty has been applied."""
        return self._empty_at is not None

    @property
    def next_seq(self) -> int | None:
        """The next seq to apply (None before the first batch)."""
        return self._applied.expected

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes of the live batches held until the replay in flight ends."""
        return self._buffer_bytes

    def view(self, now: float, *, endpoint: str = "", rank: int = 0) -> PublisherView:
        """The publisher's state as of ``now`` (see ``ViewState``)."""
        replay = self._replay
        if replay is not None:
            state: ViewState = "degraded"
            reason = (
                f"replaying from seq {replay.start} ({replay.purpose.value}); "
                f"{len(self._buffer)} live batches wait"
            )
        elif not self.view_complete:
            state, reason = "degraded", self._incomplete_why
        else:
            state, reason = "exact", "every event since the engine's cache was last empty is applied"
        last = self._last_live_at
        return PublisherView(
            endpoint or self.worker,
            rank,
            self.worker,
            state,
            reason,
            self.view_complete,
            self.next_seq,
            replay is not None,
            None if replay is None else replay.purpose.value,
            None if replay is None else replay.start,
            len(self._buffer),
            None if last is None else max(now - last, 0.0),
            IngestStats(**self.stats.as_dict()),
        )

    def malformed_frame(self, detail: str) -> None:
        """A ZMQ message that is not a vLLM frame set: counted, logged once, skipped."""
        self.stats.malformed_frames += 1
        self._log_once("frame", "malformed ZMQ message skipped: %s", detail)

    def dropped_on_receive(self, reason: DropReason, size: int) -> None:
        """A received message dropped before it reached ingest (the receive queue is at its
        byte bound): counted and logged once. Nothing else to do here: its ``seq`` never
        arrives, so the next batch shows a gap and is handled as any lost message."""
        if reason == "publisher_bytes":
            self.stats.dropped_publisher_bytes += 1
        else:
            self.stats.dropped_total_bytes += 1
        self._log_once(
            f"dropped:{reason}", "received message of %d bytes dropped: receive queue full (%s)", size, reason
        )

    # --- live stream ---------------------------------------------------------------------

    def on_live(self, seq: int, payload: bytes, now: float) -> Step:
        """One live batch as received."""
        self._last_live_at = now
        if (
            seq == self._live.expected
            and seq == self._applied.expected
            and self._replay is None
            and not self._rejoin
        ):
            # Nearly every batch: the next one, with nothing else going on. What the general
            # path below would do for it (IN_ORDER, then ``_take``), without the verdict,
            # the checks and a Step per batch (~10% of a batch's CPU at 1,000 publishers).
            self._live.expected = seq + 1
            action = self._apply(seq, payload)
            if action is Action.APPLIED and not self._orphans_pending:
                return _APPLIED_IN_ORDER
            return Step(action, _IN_ORDER, replay_from=self._settle_orphans(now))
        verdict = self._live.observe(seq)
        if self._rejoin and verdict.kind is not VerdictKind.RESTART:
            # After a disconnect, the history before it is gone from the index: joined afresh.
            verdict = _FIRST
        self._rejoin = False
        kind = verdict.kind
        if kind is VerdictKind.FIRST and self._reconnect_replayed:
            self._reconnect_replayed = False
            if self._replay is not None:
                return self._hold_live(seq, payload, verdict, now)
            return self._take(seq, payload, verdict, now)
        if kind is VerdictKind.FIRST:
            # Entries left under this name by an earlier subscriber can only be stale.
            self.index.clear_worker(self.worker)
            self._follow_new_process()
            return self._take(seq, payload, verdict, now)
        if kind is VerdictKind.RESTART:
            self.stats.restarts += 1
            self._log_once("restart", "seq went back to %d: publisher restarted", seq)
            abandon = self._replay is not None
            self._replay = None
            self._clear_buffer()
            self._reset("publisher restarted", seq)
            self._follow_new_process()
            step = self._take(seq, payload, verdict, now)
            return Step(step.action, verdict, step.replay_from, abandon)
        if self._replay is not None:
            return self._hold_live(seq, payload, verdict, now)
        return self._take(seq, payload, verdict, now)

    def _hold_live(self, seq: int, payload: bytes, verdict: Verdict, now: float) -> Step:
        """A live batch that arrived while a replay runs waits for it to end."""
        self._hold(seq, payload)
        if (
            len(self._buffer) > self.config.max_buffered_batches
            or self._buffer_bytes > self.config.max_buffered_bytes
        ):
            return self._overflow(verdict, now)
        return Step(Action.BUFFERED, verdict)

    def on_connected(self, now: float) -> Step:
        """The live connection is up again after a disconnect (ZMQ's handshake is done).

        A restarted engine publishes from seq 0 as soon as it serves, and what it sends
        before the subscription reaches it is lost to the live stream (ZMQ's slow joiner);
        waiting for its next batch to show the hole leaves the index empty for as long as the
        engine stays idle. With a replay endpoint the history from 0 is asked for now, and the
        new process followed from an empty cache: a replay that reaches back to 0 makes the
        view exact at once. Measured with ``kvsched bench chaos`` (a worker killed and
        restarted): the first batches of the restarted worker were missing from the index
        until the load made it publish again.
        """
        if not self.replay_available or self._replay is not None:
            return Step(Action.IGNORED)
        if self._applied.expected is None and self._last_live_at is None and self.config.join_replay:
            # The first connection: the engine's history so far is asked for now rather
            # than at its next batch, which an idle engine may not send for a long time
            # while a starting replica waits for a warm view (``core/warmup.py``). A
            # replay that does not reach back to 0 shows as a gap: the view stays incomplete.
            self.index.clear_worker(self.worker)
        elif not self._rejoin:
            return Step(Action.IGNORED)
        self._rejoin = False
        # Live batches from here on belong to whatever publishes now; the first one is
        # placed against the replayed history (``on_live``).
        self._live.expected = None
        self._reconnect_replayed = True
        self._follow_new_process()
        return Step(Action.IGNORED, replay_from=self._request_replay(ReplayPurpose.RECONNECT, 0, now))

    def on_disconnected(self, now: float) -> Step:
        """The publisher's connection dropped.

        vLLM's publisher lives in the engine process, so the cache behind it may be gone (a
        crash, an OOM kill, a restart that will come back empty): its entries leave the index
        now instead of drawing requests to blocks nobody may hold, and whatever publishes next
        on this address is followed as a new process (replayed from 0 where the buffer
        allows). Measured with ``kvsched bench chaos``: a SIGKILLed worker's 498 blocks stayed
        in the index for as long as it was down, and after a restart whose first batches
        went out before the subscriber reconnected (ZMQ's slow joiner), until its next batch.
        """
        self.stats.disconnects += 1
        self._reconnect_replayed = False
        self._log_once("disconnected", "publisher disconnected: its entries leave the index")
        abandon = self._replay is not None
        self._replay = None
        self._clear_buffer()
        self._reset("publisher disconnected", self._applied.expected or 0)
        self._mark_incomplete("the publisher disconnected; nothing received since")
        self._rejoin = True
        return Step(Action.IGNORED, None, abandon_replay=abandon)

    def _follow_new_process(self) -> None:
        # A new engine process starts with an empty cache: replaying it from 0 rebuilds it.
        self._applied.expected = 0
        self._empty_at = 0

    def _take(self, seq: int, payload: bytes, verdict: Verdict, now: float) -> Step:
        """A live batch while no replay is in flight."""
        expected = self._applied.expected
        assert expected is not None
        if seq < expected:
            # A replay already delivered it: replies run up to the publisher's newest batch,
            # ahead of live messages still in transit.
            self.stats.duplicates += 1
            return Step(Action.DUPLICATE, _DUPLICATE)
        if seq > expected:
            first = verdict.kind is VerdictKind.FIRST
            if not first:
                self.stats.gaps += 1
                self._log_once("gap", "sequence gap: expected %d, got %d", expected, seq)
            if self.replay_available and (self.config.join_replay or not first):
                fresh = first or verdict.kind is VerdictKind.RESTART
                purpose = ReplayPurpose.JOIN if fresh else ReplayPurpose.GAP
                self._hold(seq, payload)
                return Step(
                    Action.BUFFERED, verdict, replay_from=self._request_replay(purpose, expected, now)
                )
            why = (
                "joined the stream late, no replay endpoint"
                if first
                else "batches missed, no replay endpoint"
            )
            self._lose(expected, seq, why)
        action = self._apply(seq, payload)
        return Step(action, verdict, replay_from=self._settle_orphans(now))

    def _overflow(self, verdict: Verdict, now: float) -> Step:
        self.stats.buffer_overflows += 1
        self._log_once(
            "overflow", "replay still running after %d live batches: giving it up", len(self._buffer)
        )
        step = self._finish_replay(now, completed=False)
        return Step(Action.BUFFERED, verdict, step.replay_from, abandon_replay=True)

    def _hold(self, seq: int, payload: bytes) -> None:
        self._buffer.append((seq, payload))
        self._buffer_bytes += len(payload)

    def _release(self) -> None:
        self._buffer_bytes -= len(self._buffer.popleft()[1])

    def _clear_buffer(self) -> None:
        self._buffer.clear()
        self._buffer_bytes = 0

    # --- replay --------------------------------------------------------------------------

    def _request_replay(self, purpose: ReplayPurpose, start: int, now: float) -> int:
        self._replay = _Replay(purpose, start, now + self.config.replay_timeout_s)
        self.stats.replays_requested += 1
        log.debug("%s: replay from seq %d requested (%s)", self.context, start, purpose.value)
        return start

    def on_replay_batch(self, seq: int, payload: bytes, now: float) -> Step:
        """One batch of the replay in flight; applied at once (replies come in seq order)."""
        replay = self._replay
        if replay is None:
            self.stats.stale_replay_messages += 1
            return Step(Action.IGNORED)
        replay.deadline = now + self.config.replay_timeout_s
        verdict = self._applied.classify(seq, may_repeat=True)
        if verdict.kind is VerdictKind.DUPLICATE:
            self.stats.duplicates += 1
            return Step(Action.DUPLICATE, verdict)
        if verdict.kind is VerdictKind.GAP:
            if replay.received:
                # The publisher's buffer is contiguous, so a hole after the answer has begun
                # is replies lost on the way (the ROUTER's high-water mark), not history the
                # engine no longer has: ask again from the hole.
                resumed = self._resume_replay(replay, verdict.missing.start, now)
                if resumed is not None:
                    return resumed
            self._lose(verdict.missing.start, seq, "the replay does not reach back to the missing batches")
        replay.received += 1
        return Step(self._apply(seq, payload, replay), verdict)

    def _resume_replay(self, replay: _Replay, start: int, now: float) -> Step | None:
        """Ask for the rest of a replay whose answer broke off; None when its resumptions are spent."""
        if replay.resumes >= self.config.max_replay_resumes:
            return None
        resumed = _Replay(replay.purpose, start, now + self.config.replay_timeout_s)
        resumed.orphans = replay.orphans
        resumed.resumes = replay.resumes + 1
        self._replay = resumed
        self.stats.replays_resumed += 1
        log.debug("%s: replay resumed from seq %d (replies lost in transit)", self.context, start)
        return Step(Action.IGNORED, replay_from=start, abandon_replay=True)

    def on_replay_end(self, now: float) -> Step:
        """The replay's end marker arrived."""
        if self._replay is None:
            self.stats.stale_replay_messages += 1
            return Step(Action.IGNORED)
        self.stats.replays_completed += 1
        return self._finish_replay(now, completed=True)

    def on_replay_failed(self, reason: str, now: float) -> Step:
        """The replay cannot go on (connection, protocol); ingest goes on without it."""
        if self._replay is None:
            return Step(Action.IGNORED)
        self._log_once("replay-failed", "replay failed: %s", reason)
        return self._finish_replay(now, completed=False)

    def check_replay_timeout(self, now: float) -> Step | None:
        """Fail the replay in flight once its idle deadline has passed."""
        replay = self._replay
        if replay is None or now < replay.deadline:
            return None
        if replay.received:
            # Replies stopped after some arrived: the rest, end marker included, may have been
            # dropped on the way; what the engine still holds is asked for again.
            expected = self._applied.expected
            assert expected is not None
            resumed = self._resume_replay(replay, expected, now)
            if resumed is not None:
                return resumed
        return self.on_replay_failed(f"no reply for {self.config.replay_timeout_s:g} s", now)

    def _finish_replay(self, now: float, *, completed: bool) -> Step:
        replay = self._replay
        assert replay is not None
        self._replay = None
        if not completed:
            self.stats.replays_failed += 1
            if replay.purpose is ReplayPurpose.RECONNECT:
                # Nothing is known of the publisher's history: the next live batch joins afresh.
                self._reconnect_replayed = False
                self._mark_incomplete("the replay asked when the publisher reconnected failed")
        buffer = self._buffer
        expected = self._applied.expected
        assert expected is not None
        # The replay must reach the first live batch not yet applied: the one that triggered
        # it, or (a rebuild, which starts with nothing buffered) the next one on the stream.
        target = buffer[0][0] if buffer else self._live.expected
        if target is not None and target > expected:
            self._lose(expected, target, "the replay did not cover the missing batches")
        if replay.orphans and replay.purpose is ReplayPurpose.REBUILD:
            self._give_up_completeness("a rebuild from the replay still has orphan blocks")
        while buffer:
            seq, payload = buffer[0]
            verdict = self._applied.classify(seq, may_repeat=True)
            if verdict.kind is VerdictKind.DUPLICATE:
                self._release()
                self.stats.duplicates += 1
                continue
            if verdict.kind is VerdictKind.GAP:
                # Lost while the last replay ran: a new gap, worth a replay of its own.
                self.stats.gaps += 1
                start = self._request_replay(ReplayPurpose.GAP, verdict.missing.start, now)
                return Step(Action.REPLAY_FINISHED, replay_from=start)
            self._release()
            self._apply(seq, payload)
        return Step(Action.REPLAY_FINISHED, replay_from=self._settle_orphans(now))

    # --- applying ------------------------------------------------------------------------

    def _decode(self, seq: int, payload: bytes) -> DecodedBatch | None:
        try:
            decoded = self._decode_payload(payload)
        except KVEventDecodeError as exc:
            self.stats.malformed_payloads += 1
            self._log_once("payload", "batch %d (%d bytes) skipped: %s", seq, len(payload), exc)
            return None
        if decoded.bad_events:
            self.stats.bad_events += len(decoded.bad_events)
            self._log_once("event", "batch %d: events skipped: %s", seq, "; ".join(decoded.bad_events[:3]))
        return decoded

    def _apply(self, seq: int, payload: bytes, replay: _Replay | None = None) -> Action:
        """Apply the batch that follows on in order (``seq == next_seq``)."""
        if len(payload) > self.config.max_batch_bytes:
            self.stats.oversized_batches += 1
            self._log_once(
                "oversized",
                "batch %d (%d bytes) skipped undecoded: over max_batch_bytes (%d)",
                seq,
                len(payload),
                self.config.max_batch_bytes,
            )
            self._lose(seq, seq + 1, "an oversized payload was skipped")
            return Action.LOST
        try:
            # The kernel's decoder first; it declines (None) anything the codec must see.
            fast = self.index.apply_payload(self.worker, payload)
            if fast is not None:
                result, cleared = fast
            else:
                decoded = self._decode(seq, payload)
                if decoded is None:
                    self._lose(seq, seq + 1, "an undecodable payload lost its events")
                    return Action.LOST
                batch = decoded.batch
                result = self.index.apply_batch(self.worker, batch)
                cleared = any(isinstance(event, AllBlocksCleared) for event in batch.events)
        except ValueError as exc:  # the index refuses the worker (e.g. max_workers reached)
            self.stats.event_errors += 1
            self._log_once("index-refused", "batch %d not applied: %s", seq, exc)
            self._lose(seq, seq + 1, "the index refused the batch")
            return Action.LOST
        self._applied.expected = seq + 1
        self._dirty = True
        stats = self.stats
        stats.batches_applied += 1
        stats.blocks_stored += result.stored
        stats.blocks_removed += result.removed
        if result.errors:
            stats.event_errors += len(result.errors)
            self._log_once("index", "batch %d: %s", seq, result.errors[0])
        if cleared:
            # The cache was empty inside this batch: replaying from it rebuilds everything.
            self._empty_at = seq
            self._orphans_pending = False
        if result.orphans:
            stats.orphans += result.orphans
            if self._empty_at is not None:
                if replay is not None:
                    replay.orphans = True
                self._orphans_pending = True
        return Action.APPLIED

    def _settle_orphans(self, now: float) -> int | None:
        """Act on orphan blocks seen while the view was complete; returns a replay start."""
        if not self._orphans_pending:
            return None
        self._orphans_pending = False
        start = self._empty_at
        if start is None:
            return None
        if not self.replay_available:
            why = "orphan blocks and no replay endpoint to rebuild from"
            self._reset(why, start)
            self._mark_incomplete(why)
            return None
        last = self._last_rebuild
        if last is not None and now - last < self.config.min_rebuild_interval_s:
            self._give_up_completeness("orphan blocks again soon after a rebuild")
            return None
        self._last_rebuild = now
        self.stats.rebuilds += 1
        self._reset("orphan blocks: a stored block's parent was never reported", start)
        self._applied.expected = start
        return self._request_replay(ReplayPurpose.REBUILD, start, now)

    def _lose(self, start: int, end: int, why: str) -> None:
        """Batches ``[start, end)`` will never be applied: reset and continue from ``end``."""
        self.stats.lost_batches += end - start
        self._reset(why, start)
        lost = f"seq {start}" if end - start == 1 else f"seq {start}..{end - 1}"
        self._mark_incomplete(f"{lost} never applied: {why}")
        self._applied.expected = end

    def _reset(self, why: str, seq: int) -> None:
        if self._dirty:
            self.index.clear_worker(self.worker)
            self._dirty = False
            self.stats.resets += 1
            self._log_once(f"reset:{why}", "worker %s reset at seq %d: %s", self.worker, seq, why)

    def _give_up_completeness(self, why: str) -> None:
        if self._empty_at is not None:
            self._mark_incomplete(why)
            self._log_once(f"incomplete:{why}", "index view of %s is now approximate: %s", self.worker, why)

    def _mark_incomplete(self, why: str) -> None:
        self._empty_at = None
        self._incomplete_why = why

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        if kind in self._logged:
            log.debug("%s: " + message, self.context, *args)
            return
        self._logged.add(kind)
        log.warning("%s: " + message + " (further ones only counted)", self.context, *args)
