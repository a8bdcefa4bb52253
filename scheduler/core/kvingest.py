"""Per-publisher KV-event ingest: sequence tracking, gap handling and resync decisions.

vLLM numbers every published batch (8-byte big-endian seq, from 0 per process). The PUB
socket drops silently when its high-water mark overflows, so a gap in the sequence is
the only symptom of lost events, and a sequence that goes backwards means the engine
restarted with an empty cache. This module decides what to do about both; the ZMQ
adapter (``scheduler.adapters.kv_subscriber``) only moves bytes and follows its orders.

Decisions, per publisher (one per data-parallel rank of one pod):

* in order: apply the batch;
* gap with a replay endpoint: ask for a replay from the first missing seq, buffer live
  batches meanwhile, apply the replayed ones in order, then the buffered ones; if the
  replay cannot cover the gap (its first seq is past the missing one, it fails or times
  out, or the buffer overflows) the worker's index entries are reset instead;
* gap without a replay endpoint: reset the worker's entries (what it holds is unknown)
  and carry on from the new batch;
* seq backwards: the publisher restarted: reset, then apply;
* first batch ever: a subscriber that joins late missed earlier history; with a replay
  endpoint it asks for a replay from 0 (vLLM keeps the last ``buffer_steps`` batches),
  otherwise it starts from what it sees.

Everything here is pure: time comes in as ``now`` (for replay timeouts).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from scheduler.codec.kvevents import DecodedBatch, KVEventDecodeError, decode_batch
from scheduler.core.index import PrefixIndex

log = logging.getLogger(__name__)


class Verdict(Enum):
    IN_ORDER = "in_order"
    GAP = "gap"
    RESTART = "restart"
    FIRST = "first"


class SequenceTracker:
    """Next expected sequence number of one publisher."""

    def __init__(self) -> None:
        self.expected: int | None = None

    def observe(self, seq: int) -> Verdict:
        expected = self.expected
        if expected is None:
            return Verdict.FIRST
        if seq == expected:
            return Verdict.IN_ORDER
        if seq > expected:
            return Verdict.GAP
        return Verdict.RESTART

    def advance(self, seq: int) -> None:
        self.expected = seq + 1


@dataclass(slots=True)
class IngestStats:
    batches_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    gaps: int = 0
    replays_requested: int = 0
    replays_completed: int = 0
    replays_failed: int = 0
    resets: int = 0
    restarts: int = 0
    duplicates: int = 0
    malformed_frames: int = 0
    malformed_payloads: int = 0
    bad_events: int = 0
    orphans: int = 0
    event_errors: int = 0


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """Order to the adapter: replay from ``start_seq`` (one request in flight at a time)."""

    start_seq: int


@dataclass(slots=True)
class _Replay:
    start_seq: int
    deadline: float
    buffered: deque[tuple[int, bytes]] = field(default_factory=deque)
    # Catching up after joining late: whatever history the publisher still holds is
    # welcome, so the first replayed batch may start past start_seq.
    best_effort: bool = False


class PublisherIngest:
    """Applies one publisher's batches to the index, in order, resyncing when needed."""

    def __init__(
        self,
        index: PrefixIndex,
        worker: str,
        *,
        has_replay: bool,
        replay_timeout_s: float = 5.0,
        max_buffered: int = 10_000,
        context: str = "",
    ) -> None:
        self.index = index
        self.worker = worker
        self.has_replay = has_replay
        self.replay_timeout_s = replay_timeout_s
        self.max_buffered = max_buffered
        self.context = context or worker
        self.tracker = SequenceTracker()
        self.stats = IngestStats()
        self._replay: _Replay | None = None
        self._logged: set[str] = set()

    # --- logging: once per kind per publisher, with context ---------------------------

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        if kind in self._logged:
            return
        self._logged.add(kind)
        log.warning("%s: " + message + " (further %s problems are only counted)", self.context, *args, kind)

    def malformed_frame(self, detail: str) -> None:
        self.stats.malformed_frames += 1
        self._log_once("frame", "malformed ZMQ message skipped: %s", detail)

    # --- live path ---------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    def on_live(self, seq: int, payload: bytes, now: float) -> ReplayRequest | None:
        """A live batch arrived. Returns a replay order when one must start."""
        replay = self._replay
        if replay is not None:
            if len(replay.buffered) >= self.max_buffered:
                self._fail_replay("live buffer overflowed during replay")
                return self.on_live(seq, payload, now)
            replay.buffered.append((seq, payload))
            return None
        verdict = self.tracker.observe(seq)
        if verdict is Verdict.IN_ORDER:
            self._apply(seq, payload)
            return None
        if verdict is Verdict.FIRST:
            if self.has_replay and seq > 0:
                return self._start_replay(0, seq, payload, now, best_effort=True)
            self._apply(seq, payload)
            return None
        if verdict is Verdict.RESTART:
            self.stats.restarts += 1
            self._log_once(
                "restart", "sequence went back from %d to %d: publisher restarted", self.tracker.expected, seq
            )
            self._reset()
            self._apply(seq, payload)
            return None
        self.stats.gaps += 1
        expected = self.tracker.expected
        assert expected is not None
        self._log_once("gap", "sequence gap: expected %d, got %d", expected, seq)
        if self.has_replay:
            return self._start_replay(expected, seq, payload, now)
        self._reset()
        self._apply(seq, payload)
        return None

    def _start_replay(
        self, start: int, seq: int, payload: bytes, now: float, *, best_effort: bool = False
    ) -> ReplayRequest:
        self.stats.replays_requested += 1
        self._replay = _Replay(start, now + self.replay_timeout_s, deque([(seq, payload)]), best_effort)
        if self.tracker.expected is None:
            self.tracker.expected = start
        return ReplayRequest(start)

    # --- replay path -------------------------------------------------------------------

    def on_replay_batch(self, seq: int, payload: bytes) -> bool:
        """One replayed batch. Returns False when the replay cannot close the gap."""
        replay = self._replay
        if replay is None:
            return False
        expected = self.tracker.expected
        assert expected is not None
        if seq < expected:
            self.stats.duplicates += 1
            return True
        if seq > expected and replay.best_effort:
            expected = seq
        replay.best_effort = False
        if seq > expected:
            # The publisher no longer holds the missing batches.
            return False
        return self._apply(seq, payload)

    def on_replay_end(self) -> None:
        """The replay finished (end marker): continue with what arrived live meanwhile."""
        replay = self._replay
        if replay is None:
            return
        self._replay = None
        self.stats.replays_completed += 1
        self._drain(replay.buffered)

    def on_replay_failed(self, reason: str) -> None:
        if self._replay is not None:
            self._fail_replay(reason)

    def check_timeout(self, now: float) -> bool:
        """Fail a replay that ran past its deadline; True when one did."""
        replay = self._replay
        if replay is not None and now >= replay.deadline:
            self._fail_replay(f"no end of replay within {self.replay_timeout_s:.1f}s")
            return True
        return False

    def _fail_replay(self, reason: str) -> None:
        replay = self._replay
        assert replay is not None
        self._replay = None
        self.stats.replays_failed += 1
        self._log_once("replay", "replay from %d failed (%s): resetting the worker", replay.start_seq, reason)
        self._reset()
        self.tracker.expected = None
        self._drain(replay.buffered)

    def _drain(self, buffered: deque[tuple[int, bytes]]) -> None:
        while buffered:
            seq, payload = buffered.popleft()
            verdict = self.tracker.observe(seq)
            if verdict is Verdict.IN_ORDER or verdict is Verdict.FIRST:
                self._apply(seq, payload)
            elif verdict is Verdict.RESTART:
                self.stats.duplicates += 1
            else:
                self.stats.gaps += 1
                self._reset()
                self._apply(seq, payload)

    # --- applying ----------------------------------------------------------------------

    def _reset(self) -> None:
        self.stats.resets += 1
        self.index.clear_worker(self.worker)

    def _apply(self, seq: int, payload: bytes) -> bool:
        self.tracker.advance(seq)
        try:
            decoded: DecodedBatch = decode_batch(payload)
        except KVEventDecodeError as exc:
            self.stats.malformed_payloads += 1
            self._log_once("payload", "batch %d skipped: %s (%d bytes)", seq, exc, len(payload))
            return True
        if decoded.bad_events:
            self.stats.bad_events += len(decoded.bad_events)
            self._log_once("event", "batch %d: %s", seq, "; ".join(decoded.bad_events[:3]))
        result = self.index.apply_batch(self.worker, decoded.batch)
        stats = self.stats
        stats.batches_applied += 1
        stats.blocks_stored += result.stored
        stats.blocks_removed += result.removed
        if result.orphans:
            # A parent this worker never reported: history from before we subscribed, or
            # a loss no replay covered. The index stays conservative (those blocks are
            # simply unknown); count it so a setup mistake is visible.
            stats.orphans += result.orphans
            self._log_once(
                "orphan", "batch %d: %d stored blocks chain to an unknown parent", seq, result.orphans
            )
        if result.errors:
            stats.event_errors += len(result.errors)
            self._log_once("index", "batch %d: %s", seq, result.errors[0])
        return True
