"""The KV-event ingest core: sequence verdicts and the apply / replay / reset decisions.

Fed with payloads made by the real codec and applied to a real PrefixIndex; time is an
explicit number. Consistency is judged against a reference index that received every
batch in order, compared through match_tokens over every prompt the workload used.
"""

from __future__ import annotations

import random

import pytest

from scheduler.codec.kvevents import decode_batch, encode_batch
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.core.kvingest import (
    NO_BATCH_YET,
    Action,
    IngestConfig,
    PublisherView,
    SequenceTracker,
    Verdict,
    VerdictKind,
    WorkerIngest,
)

BLOCK = 4
W = "10.0.0.5:8000"


class CacheModel:
    """A small stand-in for vLLM's prefix cache producing realistic event batches.

    Prompts share a few system prefixes, so stores chain onto cached parents; old prompts'
    own blocks are evicted tail first, as vLLM's free-block queue does.
    """

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.systems = [[self.rng.randrange(1, 30_000) for _ in range(2 * BLOCK)] for _ in range(3)]
        self._ids: dict[tuple[int, ...], int] = {}
        self.cached: set[tuple[int, ...]] = set()
        self.prompts: list[list[int]] = []
        self._tails: list[list[tuple[int, ...]]] = []

    def block_hash(self, prefix: tuple[int, ...]) -> int:
        return self._ids.setdefault(prefix, 0x9E3779B97F4A7C15 ^ (len(self._ids) * 0x100000001B3))

    def batch(self, ts: float) -> EventBatch:
        rng = self.rng
        tokens = self.rng.choice(self.systems) + [
            rng.randrange(1, 30_000) for _ in range(BLOCK * rng.randint(1, 3))
        ]
        self.prompts.append(tokens)
        prefixes = [tuple(tokens[: (i + 1) * BLOCK]) for i in range(len(tokens) // BLOCK)]
        first = 0
        while first < len(prefixes) and prefixes[first] in self.cached:
            first += 1
        events: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
        if first < len(prefixes):
            parent = self.block_hash(prefixes[first - 1]) if first else None
            events.append(
                BlockStored(
                    [self.block_hash(p) for p in prefixes[first:]],
                    parent,
                    tokens[first * BLOCK :],
                    BLOCK,
                )
            )
            self.cached.update(prefixes[first:])
            self._tails.append([p for p in prefixes[first:] if len(p) > 2 * BLOCK])
        if len(self._tails) > 4 and rng.random() < 0.5:
            tail = self._tails.pop(rng.randrange(len(self._tails) - 2))
            gone = [p for p in reversed(tail) if p in self.cached]
            if gone:
                self.cached.difference_update(gone)
                events.append(BlockRemoved([self.block_hash(p) for p in gone]))
        return EventBatch(ts, events, 0)

    def batches(self, n: int) -> list[EventBatch]:
        return [self.batch(float(i)) for i in range(n)]


def make_index() -> PrefixIndex:
    return PrefixIndex(IndexConfig(block_size=BLOCK))


def reference(batches: list[EventBatch], worker: str = W) -> PrefixIndex:
    index = make_index()
    for batch in batches:
        assert not index.apply_batch(worker, batch).errors
    return index


def assert_same_view(index: PrefixIndex, ref: PrefixIndex, prompts: list[list[int]], worker: str = W) -> None:
    assert index.worker_blocks(worker) == ref.worker_blocks(worker)
    for tokens in prompts:
        assert index.match_tokens(tokens).get(worker) == ref.match_tokens(tokens).get(worker)


def payloads(batches: list[EventBatch], legacy: bool = False) -> list[bytes]:
    return [encode_batch(batch, legacy=legacy) for batch in batches]


def ingest_for(index: PrefixIndex, *, replay: bool, **config: object) -> WorkerIngest:
    return WorkerIngest(
        W,
        index,
        decode=decode_batch,
        replay_available=replay,
        config=IngestConfig(**config),  # type: ignore[arg-type]
    )


# --- SequenceTracker -------------------------------------------------------------------------


def test_tracker_verdicts() -> None:
    tracker = SequenceTracker()
    assert tracker.observe(7).kind is VerdictKind.FIRST
    assert tracker.observe(8) == Verdict(VerdictKind.IN_ORDER)
    gap = tracker.observe(11)
    assert gap.kind is VerdictKind.GAP and gap.missing == range(9, 11)
    assert tracker.expected == 12
    # Backwards on the live stream is a restart, also exactly to 0.
    assert tracker.classify(0).kind is VerdictKind.RESTART
    assert tracker.classify(5).kind is VerdictKind.RESTART
    # Where repeats are possible (replay overlap) it is a duplicate, which moves nothing.
    assert tracker.observe(10, may_repeat=True).kind is VerdictKind.DUPLICATE
    assert tracker.expected == 12
    assert tracker.observe(0).kind is VerdictKind.RESTART
    assert tracker.expected == 1


# --- in order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_in_order_from_zero_gives_a_complete_view(legacy: bool) -> None:
    model = CacheModel()
    batches = model.batches(30)
    index = make_index()
    ingest = ingest_for(index, replay=False)
    for seq, payload in enumerate(payloads(batches, legacy)):
        step = ingest.on_live(seq, payload, 0.0)
        assert step.action is Action.APPLIED and step.replay_from is None
    assert ingest.view_complete and ingest.next_seq == 30
    assert ingest.stats.batches_applied == 30 and ingest.stats.resets == 0 and ingest.stats.orphans == 0
    assert_same_view(index, reference(batches), model.prompts)


# --- gaps --------------------------------------------------------------------------------------


def test_gap_is_replayed_and_the_view_equals_no_loss() -> None:
    model = CacheModel(2)
    batches = model.batches(40)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq in range(10):
        ingest.on_live(seq, data[seq], 0.0)
    step = ingest.on_live(14, data[14], 1.0)  # 10..13 lost
    assert step.action is Action.BUFFERED and step.replay_from == 10
    assert step.verdict is not None and step.verdict.missing == range(10, 14)
    for seq in range(15, 20):
        assert ingest.on_live(seq, data[seq], 1.0).action is Action.BUFFERED
    # The ROUTER answers from 10 up to what it holds now, overlapping the buffered live ones.
    for seq in range(10, 17):
        ingest.on_replay_batch(seq, data[seq], 1.1)
    assert ingest.on_replay_end(1.2).replay_from is None
    for seq in range(20, 40):
        assert ingest.on_live(seq, data[seq], 2.0).action is Action.APPLIED
    stats = ingest.stats
    assert (stats.gaps, stats.replays_requested, stats.replays_completed, stats.resets) == (1, 1, 1, 0)
    assert stats.duplicates == 3  # 14, 15, 16 came both ways
    assert ingest.view_complete
    assert_same_view(index, reference(batches), model.prompts)


def test_gap_without_replay_resets_only_that_worker() -> None:
    model = CacheModel(3)
    batches = model.batches(12)
    data = payloads(batches)
    index = make_index()
    for batch in batches[:6]:
        index.apply_batch("other", batch)
    before = {tuple(p): index.match_tokens(p).get("other") for p in model.prompts[:6]}
    ingest = ingest_for(index, replay=False)
    for seq in range(5):
        ingest.on_live(seq, data[seq], 0.0)
    assert index.worker_blocks(W) > 0
    step = ingest.on_live(7, data[7], 0.0)
    assert step.action is Action.APPLIED and step.replay_from is None
    stats = ingest.stats
    assert (stats.gaps, stats.resets, stats.lost_batches) == (1, 1, 2)
    assert not ingest.view_complete
    # Only what came after the hole is known; the other worker is untouched.
    assert index.worker_blocks(W) == reference([batches[7]]).worker_blocks(W)
    assert {tuple(p): index.match_tokens(p).get("other") for p in model.prompts[:6]} == before


def test_replay_that_cannot_reach_back_resets_and_keeps_what_follows() -> None:
    model = CacheModel(4)
    batches = model.batches(20)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq in range(8):
        ingest.on_live(seq, data[seq], 0.0)
    assert ingest.on_live(12, data[12], 0.0).replay_from == 8
    ingest.on_live(13, data[13], 0.0)
    # The publisher's buffer starts at 10 now: 8 and 9 are gone for good.
    for seq in range(10, 14):
        ingest.on_replay_batch(seq, data[seq], 0.1)
    ingest.on_replay_end(0.2)
    stats = ingest.stats
    assert (stats.resets, stats.lost_batches, stats.replays_completed) == (1, 2, 1)
    assert not ingest.view_complete and ingest.next_seq == 14
    assert index.worker_blocks(W) == reference(batches[10:14]).worker_blocks(W)


def test_replay_timeout_resets_and_applies_the_buffered_batches() -> None:
    model = CacheModel(5)
    batches = model.batches(10)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True, replay_timeout_s=2.0)
    for seq in range(4):
        ingest.on_live(seq, data[seq], 0.0)
    ingest.on_live(6, data[6], 10.0)
    ingest.on_live(7, data[7], 10.5)
    assert ingest.replay_deadline == 12.0
    ingest.on_replay_batch(4, data[4], 11.0)  # a reply moves the idle deadline
    assert ingest.check_replay_timeout(12.5) is None
    # Silence after a reply may be replies lost on the way: the rest is asked for once more,
    # and a resumption that hears nothing at all fails the replay.
    resumed = ingest.check_replay_timeout(13.0)
    assert resumed is not None and resumed.replay_from == 5 and resumed.abandon_replay
    assert ingest.replay_in_flight and ingest.stats.replays_resumed == 1
    step = ingest.check_replay_timeout(15.0)
    assert step is not None and step.action is Action.REPLAY_FINISHED
    stats = ingest.stats
    assert (stats.replays_failed, stats.resets, stats.lost_batches, stats.batches_applied) == (1, 1, 1, 7)
    assert not ingest.replay_in_flight and ingest.next_seq == 8
    assert index.worker_blocks(W) == reference(batches[6:8]).worker_blocks(W)


def test_failed_replay_that_had_delivered_everything_needs_no_reset() -> None:
    model = CacheModel(6)
    batches = model.batches(8)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq in (0, 1, 4):
        ingest.on_live(seq, data[seq], 0.0)
    for seq in (2, 3):
        ingest.on_replay_batch(seq, data[seq], 0.0)
    ingest.on_replay_failed("connection dropped before the end marker", 0.1)
    assert ingest.stats.replays_failed == 1 and ingest.stats.resets == 0 and ingest.view_complete
    assert_same_view(index, reference(batches[:5]), model.prompts[:5])


def test_a_hole_inside_a_replays_answer_is_asked_for_again() -> None:
    """vLLM's ROUTER drops replies past its high-water mark: the answer arrives with a hole."""
    model = CacheModel(11)
    batches = model.batches(30)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq in range(3):
        ingest.on_live(seq, data[seq], 0.0)
    assert ingest.on_live(25, data[25], 1.0).replay_from == 3
    for seq in range(3, 10):
        ingest.on_replay_batch(seq, data[seq], 1.1)
    step = ingest.on_replay_batch(17, data[17], 1.1)  # 10..16 dropped on the way
    assert step.action is Action.IGNORED and step.replay_from == 10 and step.abandon_replay
    for seq in range(10, 26):
        ingest.on_replay_batch(seq, data[seq], 1.2)
    assert ingest.on_replay_end(1.3).action is Action.REPLAY_FINISHED
    for seq in range(26, 30):
        assert ingest.on_live(seq, data[seq], 2.0).action is Action.APPLIED
    stats = ingest.stats
    assert (stats.replays_requested, stats.replays_resumed, stats.replays_completed) == (1, 1, 1)
    assert (stats.lost_batches, stats.resets) == (0, 0) and ingest.view_complete
    assert_same_view(index, reference(batches), model.prompts)


def test_replay_resumptions_are_bounded() -> None:
    model = CacheModel(12)
    batches = model.batches(12)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True, max_replay_resumes=1)
    ingest.on_live(0, data[0], 0.0)
    assert ingest.on_live(11, data[11], 0.0).replay_from == 1
    ingest.on_replay_batch(1, data[1], 0.1)
    assert ingest.on_replay_batch(4, data[4], 0.1).replay_from == 2
    ingest.on_replay_batch(2, data[2], 0.2)
    # The one resumption is spent: the next hole is lost as before.
    step = ingest.on_replay_batch(6, data[6], 0.2)
    assert step.replay_from is None and ingest.stats.lost_batches == 3 and not ingest.view_complete


def test_a_new_hole_in_the_live_buffer_gets_its_own_replay() -> None:
    model = CacheModel(7)
    batches = model.batches(12)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    ingest.on_live(0, data[0], 0.0)
    assert ingest.on_live(2, data[2], 0.0).replay_from == 1
    ingest.on_live(3, data[3], 0.0)
    ingest.on_live(6, data[6], 0.0)  # 4 and 5 dropped while the first replay ran
    ingest.on_replay_batch(1, data[1], 0.1)
    step = ingest.on_replay_end(0.1)
    assert step.replay_from == 4 and ingest.replay_in_flight and ingest.buffered == 1
    for seq in (4, 5, 6):
        ingest.on_replay_batch(seq, data[seq], 0.2)
    ingest.on_replay_end(0.2)
    assert ingest.stats.gaps == 2 and ingest.stats.resets == 0 and ingest.stats.duplicates == 1
    assert_same_view(index, reference(batches[:7]), model.prompts[:7])


def test_buffer_overflow_abandons_the_replay_and_resets() -> None:
    model = CacheModel(8)
    batches = model.batches(12)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True, max_buffered_batches=3)
    ingest.on_live(0, data[0], 0.0)
    ingest.on_live(2, data[2], 0.0)
    ingest.on_live(3, data[3], 0.0)
    ingest.on_live(4, data[4], 0.0)
    step = ingest.on_live(5, data[5], 0.0)
    assert step.abandon_replay and step.replay_from is None and not ingest.replay_in_flight
    stats = ingest.stats
    assert (stats.buffer_overflows, stats.replays_failed, stats.resets) == (1, 1, 1)
    assert ingest.next_seq == 6 and ingest.buffered == 0
    # A reply to the abandoned replay is ignored.
    assert ingest.on_replay_batch(1, data[1], 0.1).action is Action.IGNORED
    assert stats.stale_replay_messages == 1
    assert index.worker_blocks(W) == reference(batches[2:6]).worker_blocks(W)


# --- first batch, restarts --------------------------------------------------------------------


def test_late_join_replays_from_zero() -> None:
    model = CacheModel(9)
    batches = model.batches(10)
    data = payloads(batches)
    index = make_index()
    index.apply_batch(W, batches[0])  # stale entries from an earlier subscriber
    ingest = ingest_for(index, replay=True)
    step = ingest.on_live(6, data[6], 0.0)
    assert step.verdict is not None and step.verdict.kind is VerdictKind.FIRST
    assert step.replay_from == 0
    for seq in range(7):
        ingest.on_replay_batch(seq, data[seq], 0.1)
    ingest.on_replay_end(0.1)
    stats = ingest.stats
    assert (stats.gaps, stats.resets, stats.duplicates) == (0, 0, 1)
    assert ingest.view_complete
    assert_same_view(index, reference(batches[:7]), model.prompts)


def test_first_connection_replays_an_idle_engines_history_from_zero() -> None:
    # A starting replica next to an engine that publishes nothing for a while (idle): its
    # history is asked for when the connection is up, not at its next batch.
    model = CacheModel(21)
    batches = model.batches(5)
    data = payloads(batches)
    index = make_index()
    index.apply_batch(W, model.batches(1)[0])  # stale entries from an earlier subscriber
    ingest = ingest_for(index, replay=True)
    assert ingest.next_seq is None
    assert ingest.on_connected(0.0).replay_from == 0
    assert ingest.on_connected(0.1).replay_from is None  # one replay at a time
    for seq in range(5):
        ingest.on_replay_batch(seq, data[seq], 0.2)
    ingest.on_replay_end(0.2)
    assert ingest.view_complete and ingest.next_seq == 5 and not ingest.replay_in_flight
    assert_same_view(index, reference(batches), model.prompts)
    # The live stream goes on from there: neither a late join nor a gap.
    assert ingest.on_live(5, payloads(model.batches(1))[0], 1.0).replay_from is None
    assert ingest.stats.gaps == 0 and ingest.next_seq == 6


def test_first_connection_replay_that_does_not_reach_zero_is_incomplete() -> None:
    model = CacheModel(22)
    batches = model.batches(6)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    assert ingest.on_connected(0.0).replay_from == 0
    for seq in range(2, 6):  # the publisher only holds 2.. any more
        ingest.on_replay_batch(seq, data[seq], 0.1)
    ingest.on_replay_end(0.1)
    assert not ingest.view_complete and ingest.next_seq == 6 and ingest.stats.lost_batches == 2
    assert index.worker_blocks(W) == reference(batches[2:6]).worker_blocks(W)


def test_first_connection_without_replay_or_join_replay_waits_for_a_batch() -> None:
    assert ingest_for(make_index(), replay=False).on_connected(0.0).replay_from is None
    ingest = ingest_for(make_index(), replay=True, join_replay=False)
    assert ingest.on_connected(0.0).replay_from is None


def test_late_join_partial_history_is_incomplete_but_not_a_reset() -> None:
    model = CacheModel(10)
    batches = model.batches(10)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    ingest.on_live(6, data[6], 0.0)
    for seq in range(3, 7):  # the publisher only holds 3.. any more
        ingest.on_replay_batch(seq, data[seq], 0.1)
    ingest.on_replay_end(0.1)
    assert ingest.stats.resets == 0 and ingest.stats.lost_batches == 3 and not ingest.view_complete
    assert index.worker_blocks(W) == reference(batches[3:7]).worker_blocks(W)


def test_late_join_without_replay_starts_from_there() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=False)
    batches = CacheModel(11).batches(3)
    assert ingest.on_live(41, encode_batch(batches[0]), 0.0).action is Action.APPLIED
    assert ingest.next_seq == 42 and ingest.stats.gaps == 0 and ingest.stats.resets == 0
    assert not ingest.view_complete


def test_restart_resets_then_applies() -> None:
    model = CacheModel(12)
    old = model.batches(6)
    index = make_index()
    ingest = ingest_for(index, replay=False)
    for seq, payload in enumerate(payloads(old)):
        ingest.on_live(seq, payload, 0.0)
    fresh = CacheModel(13)
    new = fresh.batches(3)
    step = ingest.on_live(0, encode_batch(new[0]), 1.0)
    assert step.verdict is not None and step.verdict.kind is VerdictKind.RESTART
    assert step.action is Action.APPLIED
    for seq in (1, 2):
        ingest.on_live(seq, encode_batch(new[seq]), 1.0)
    assert (ingest.stats.restarts, ingest.stats.resets) == (1, 1)
    assert ingest.view_complete  # a new process starts empty and was seen from 0
    assert_same_view(index, reference(new), model.prompts + fresh.prompts)


def test_restart_seen_late_replays_the_new_process_from_zero() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq, payload in enumerate(payloads(CacheModel(14).batches(9))):
        ingest.on_live(seq, payload, 0.0)
    fresh = CacheModel(15)
    new_batches = fresh.batches(4)
    new = payloads(new_batches)
    step = ingest.on_live(3, new[3], 1.0)
    assert step.replay_from == 0 and ingest.stats.resets == 1 and ingest.stats.restarts == 1
    for seq in range(4):
        ingest.on_replay_batch(seq, new[seq], 1.1)
    ingest.on_replay_end(1.1)
    assert ingest.view_complete
    assert_same_view(index, reference(new_batches), fresh.prompts)


def test_a_reconnect_replays_the_publisher_from_zero_before_its_next_batch() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=True)
    old = CacheModel(16)
    for seq, payload in enumerate(payloads(old.batches(5))):
        ingest.on_live(seq, payload, 0.0)
    ingest.on_disconnected(1.0)
    assert ingest.on_connected(1.5).replay_from == 0
    assert ingest.on_connected(1.6).replay_from is None  # one replay at a time
    fresh = CacheModel(17)
    new_batches = fresh.batches(4)
    new = payloads(new_batches)
    for seq in range(3):  # what the new process published before the subscription reached it
        ingest.on_replay_batch(seq, new[seq], 1.7)
    # A live batch overtaken by the replay waits for it, then counts as a duplicate.
    assert ingest.on_live(2, new[2], 1.75).action is Action.BUFFERED
    ingest.on_replay_end(1.8)
    assert ingest.view_complete and ingest.next_seq == 3 and ingest.stats.duplicates == 1
    assert ingest.on_live(3, new[3], 2.0).action is Action.APPLIED
    assert ingest.stats.gaps == 0 and ingest.stats.restarts == 0
    assert_same_view(index, reference(new_batches), old.prompts + fresh.prompts)


def test_a_failed_reconnect_replay_joins_afresh_on_the_next_batch() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=True)
    for seq, payload in enumerate(payloads(CacheModel(18).batches(3))):
        ingest.on_live(seq, payload, 0.0)
    ingest.on_disconnected(1.0)
    assert ingest.on_connected(1.0).replay_from == 0
    ingest.on_replay_failed("no reply", 6.0)
    assert not ingest.view_complete and ingest.stats.replays_failed == 1
    fresh = CacheModel(19)
    new = payloads(fresh.batches(3))
    # The next batch shows history before it: a late join, replayed from 0 again.
    assert ingest.on_live(2, new[2], 7.0).replay_from == 0
    for seq in range(3):
        ingest.on_replay_batch(seq, new[seq], 7.1)
    ingest.on_replay_end(7.1)
    assert ingest.view_complete and ingest.next_seq == 3


def test_without_a_replay_endpoint_a_reconnect_waits_for_the_next_batch() -> None:
    ingest = ingest_for(make_index(), replay=False)
    ingest.on_live(0, payloads(CacheModel(20).batches(1))[0], 0.0)
    ingest.on_disconnected(1.0)
    assert ingest.on_connected(1.0).replay_from is None


def test_restart_during_a_replay_abandons_it() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=True)
    old = payloads(CacheModel(16).batches(8))
    for seq in range(3):
        ingest.on_live(seq, old[seq], 0.0)
    ingest.on_live(5, old[5], 0.0)
    ingest.on_live(6, old[6], 0.0)
    new = CacheModel(17)
    new_batches = new.batches(1)
    step = ingest.on_live(0, encode_batch(new_batches[0]), 0.5)
    assert step.abandon_replay and step.action is Action.APPLIED and not ingest.replay_in_flight
    assert ingest.buffered == 0 and ingest.stats.restarts == 1 and ingest.stats.resets == 1
    assert_same_view(index, reference(new_batches), new.prompts)


# --- bad input --------------------------------------------------------------------------------


def test_undecodable_payload_is_lost_and_resets_without_replay() -> None:
    model = CacheModel(18)
    batches = model.batches(6)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    ingest.on_live(0, data[0], 0.0)
    ingest.on_live(1, data[1], 0.0)
    step = ingest.on_live(2, b"\xc1 not msgpack", 0.0)
    assert step.action is Action.LOST and step.replay_from is None
    ingest.on_live(3, b"\x93\x01\x02\x03", 0.0)  # msgpack, but not [ts, events, rank]
    for seq in (4, 5):
        assert ingest.on_live(seq, data[seq], 0.0).action is Action.APPLIED
    stats = ingest.stats
    assert (stats.malformed_payloads, stats.resets, stats.lost_batches, stats.replays_requested) == (
        2,
        1,
        2,
        0,
    )
    assert ingest.next_seq == 6
    assert index.worker_blocks(W) == reference(batches[4:6]).worker_blocks(W)


def test_a_batch_over_max_batch_bytes_is_skipped_undecoded() -> None:
    """A hostile 1M-block batch (57 MB) took seconds of the event loop and 660 MB to decode."""
    model = CacheModel(18)
    batches = model.batches(3)
    data = payloads(batches)
    index = make_index()
    worker = ingest_for(index, replay=False, max_batch_bytes=1024)
    huge = encode_batch(
        EventBatch(0.0, [BlockStored(list(range(1, 200)), None, list(range(199 * BLOCK)), BLOCK)])
    )
    assert len(huge) > 1024 and all(len(payload) <= 1024 for payload in data)
    assert worker.on_live(0, data[0], 0.0).action is Action.APPLIED
    assert worker.on_live(1, huge, 0.0).action is Action.LOST
    assert worker.on_live(2, data[2], 0.0).action is Action.APPLIED
    stats = worker.stats
    assert (stats.oversized_batches, stats.lost_batches, stats.resets, stats.malformed_payloads) == (
        1,
        1,
        1,
        0,
    )
    assert W not in index.match_tokens(list(range(4 * BLOCK)))  # nothing of the huge batch


def test_bad_events_are_skipped_without_a_reset() -> None:
    import msgpack

    index = make_index()
    ingest = ingest_for(index, replay=False)
    tokens = list(range(1, BLOCK + 1))
    good = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": None, "token_ids": tokens,
            "block_size": BLOCK, "lora_id": None, "medium": None, "lora_name": None}  # fmt: skip
    payload = msgpack.packb([1.0, [{"type": "BlockMoved"}, good, ["BlockRemoved", "x"]], 0])
    assert ingest.on_live(0, payload, 0.0).action is Action.APPLIED
    assert ingest.stats.bad_events == 2 and ingest.stats.resets == 0
    assert index.match_tokens(tokens)[W].total_blocks == 1


def test_block_size_mismatch_is_counted_as_an_event_error() -> None:
    index = make_index()
    ingest = ingest_for(index, replay=False)
    batch = EventBatch(0.0, [BlockStored([1], None, list(range(16)), 16)])
    ingest.on_live(0, encode_batch(batch), 0.0)
    assert ingest.stats.event_errors == 1 and ingest.stats.batches_applied == 1


def test_malformed_frames_are_counted() -> None:
    ingest = ingest_for(make_index(), replay=False)
    ingest.malformed_frame("2 frames")
    ingest.malformed_frame("2 frames")
    assert ingest.stats.malformed_frames == 2


# --- orphans and completeness -----------------------------------------------------------------


def _chain(tokens: list[int], hashes: list[int]) -> list[EventBatch]:
    """One batch per block, each block chained onto the previous one."""
    return [
        EventBatch(
            float(i),
            [BlockStored([h], hashes[i - 1] if i else None, tokens[i * BLOCK : (i + 1) * BLOCK], BLOCK)],
            0,
        )
        for i, h in enumerate(hashes)
    ]


TOKENS = list(range(1, 3 * BLOCK + 1))


def test_orphans_are_acted_on_only_while_the_view_is_complete() -> None:
    root, _, orphan = _chain(TOKENS, [1, 2, 3])
    index = make_index()
    ingest = ingest_for(index, replay=False)
    ingest.on_live(0, encode_batch(root), 0.0)
    ingest.on_live(1, encode_batch(orphan), 0.0)
    # Complete view and no replay: reset; the view is now incomplete, so more orphans are only counted.
    assert ingest.stats.orphans == 1 and ingest.stats.resets == 1 and not ingest.view_complete
    ingest.on_live(2, encode_batch(root), 0.0)
    ingest.on_live(3, encode_batch(orphan), 0.0)
    assert ingest.stats.orphans == 2 and ingest.stats.resets == 1
    assert index.match_tokens(TOKENS)[W].total_blocks == 1
    # AllBlocksCleared: the engine's cache is empty, so the view is complete again.
    ingest.on_live(4, encode_batch(EventBatch(2.0, [AllBlocksCleared()], 0)), 0.0)
    assert ingest.view_complete and index.match_tokens(TOKENS) == {}


def test_orphans_from_the_publishers_own_history_do_not_loop() -> None:
    root, _, orphan = _chain(TOKENS, [1, 2, 3])
    clear = EventBatch(0.0, [AllBlocksCleared()], 0)
    data = payloads([root, clear, root, orphan, root])
    index = make_index()
    ingest = ingest_for(index, replay=True, min_rebuild_interval_s=30.0)
    for seq in range(3):
        ingest.on_live(seq, data[seq], 0.0)
    step = ingest.on_live(3, data[3], 100.0)
    # Rebuild from the last known-empty point: the AllBlocksCleared at seq 1.
    assert step.replay_from == 1 and ingest.stats.rebuilds == 1
    for seq in range(1, 4):
        ingest.on_replay_batch(seq, data[seq], 100.1)
    ingest.on_replay_end(100.1)
    # The orphan is in the publisher's own history: rebuilding again would not help.
    assert not ingest.view_complete and ingest.stats.rebuilds == 1 and not ingest.replay_in_flight
    assert index.match_tokens(TOKENS)[W].total_blocks == 1
    assert ingest.on_live(4, data[4], 101.0).replay_from is None


def test_orphans_soon_after_a_rebuild_make_the_view_incomplete() -> None:
    root, middle, leaf = _chain(TOKENS, [1, 2, 3])
    data = payloads([root, middle, leaf, leaf])
    index = make_index()
    ingest = ingest_for(index, replay=True, min_rebuild_interval_s=30.0)
    ingest.on_live(0, data[0], 0.0)
    ingest.on_live(1, data[1], 0.0)
    index.clear_worker(W)
    assert ingest.on_live(2, data[2], 10.0).replay_from == 0
    for seq in range(3):
        ingest.on_replay_batch(seq, data[seq], 10.0)
    ingest.on_replay_end(10.0)
    assert ingest.view_complete
    index.clear_worker(W)
    assert ingest.on_live(3, data[3], 20.0).replay_from is None
    assert ingest.stats.rebuilds == 1 and not ingest.view_complete


# Both hash modes detect orphans alike. Each batch goes through one of three paths: the
# kernel's decoder ("kernel"), the codec onto the native table ("codec": the batch carries an
# event type from a newer vLLM, which the kernel leaves to the codec, and the codec skips),
# or the codec onto the pure-Python reference table ("reference").
ORPHAN_PATHS = pytest.mark.parametrize(
    ("hash_mode", "path"),
    [(mode, path) for mode in ("own", "vllm") for path in ("kernel", "codec", "reference")],
)


def _mode_index(hash_mode: str, path: str) -> PrefixIndex:
    backend = "reference" if path == "reference" else "native"
    return PrefixIndex(IndexConfig(block_size=BLOCK, hash_mode=hash_mode, backend=backend))  # type: ignore[arg-type]


def _path_payloads(index: PrefixIndex, path: str, batches: list[EventBatch]) -> list[bytes]:
    import msgpack

    data = payloads(batches)
    if path == "codec":
        data = [
            msgpack.packb([b.ts, [*msgpack.unpackb(d)[1], {"type": "BlockMoved"}], 0])
            for b, d in zip(batches, data, strict=True)
        ]
        assert all(index.apply_payload("probe", d) is None for d in data)  # the kernel declines them
    return data


def _mode_chain(index: PrefixIndex, tokens: list[int]) -> list[EventBatch]:
    # vLLM mode keys blocks by the engine's own hashes: publish the ones vLLM would compute.
    hashes = list(index.request_keys(tokens)) if index.config.hash_mode == "vllm" else [11, 12, 13]
    return _chain(tokens, hashes)


@ORPHAN_PATHS
def test_orphans_with_a_complete_view_rebuild_in_both_hash_modes(hash_mode: str, path: str) -> None:
    index = _mode_index(hash_mode, path)
    data = _path_payloads(index, path, _mode_chain(index, TOKENS))
    ingest = ingest_for(index, replay=True)
    ingest.on_live(0, data[0], 0.0)
    ingest.on_live(1, data[1], 0.0)
    # The worker's entries were lost although no seq is missing (an event lost upstream):
    # the next block's parent is one this worker never reported as far as the index knows.
    index.clear_worker(W)
    step = ingest.on_live(2, data[2], 5.0)
    assert step.replay_from == 0 and ingest.replay_in_flight
    assert (ingest.stats.orphans, ingest.stats.rebuilds, ingest.stats.resets) == (1, 1, 1)
    for seq in range(3):
        ingest.on_replay_batch(seq, data[seq], 5.1)
    ingest.on_replay_end(5.1)
    assert ingest.view_complete and ingest.stats.orphans == 1
    assert index.match_tokens(TOKENS)[W].total_blocks == 3


@ORPHAN_PATHS
def test_orphans_without_a_replay_endpoint_reset_in_both_hash_modes(hash_mode: str, path: str) -> None:
    index = _mode_index(hash_mode, path)
    root, _, orphan = _mode_chain(index, TOKENS)
    data = _path_payloads(index, path, [root, orphan])
    ingest = ingest_for(index, replay=False)
    ingest.on_live(0, data[0], 0.0)
    ingest.on_live(1, data[1], 0.0)
    # Complete view, no replay: the worker is reset and its view is approximate from now on.
    assert (ingest.stats.orphans, ingest.stats.resets) == (1, 1) and not ingest.view_complete
    assert index.match_tokens(TOKENS) == {} and index.num_blocks == 0
    ingest.on_live(2, data[0], 0.0)
    ingest.on_live(3, data[1], 0.0)
    # Incomplete view: orphans are expected and only counted; nothing unreachable is stored.
    assert (ingest.stats.orphans, ingest.stats.resets) == (2, 1)
    assert index.match_tokens(TOKENS)[W].total_blocks == 1 and index.num_blocks == 1


def test_a_worker_the_index_refuses_is_counted_not_raised() -> None:
    index = PrefixIndex(IndexConfig(block_size=BLOCK, max_workers=1))
    index.apply_batch("someone-else", EventBatch(0.0))
    ingest = ingest_for(index, replay=False)
    batch = encode_batch(CacheModel(30).batch(0.0))
    assert ingest.on_live(0, batch, 0.0).action is Action.LOST
    assert ingest.on_live(1, batch, 0.0).action is Action.LOST
    assert ingest.stats.event_errors == 2 and ingest.stats.batches_applied == 0 and ingest.next_seq == 2


def test_live_batches_a_replay_already_delivered_are_duplicates() -> None:
    model = CacheModel(31)
    batches = model.batches(10)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    ingest.on_live(0, data[0], 0.0)
    assert ingest.on_live(3, data[3], 0.0).replay_from == 1
    # The ROUTER answers up to its newest batch, 6; live 4..6 are still on their way.
    for seq in range(1, 7):
        ingest.on_replay_batch(seq, data[seq], 0.1)
    ingest.on_replay_end(0.1)
    for seq in range(4, 10):
        step = ingest.on_live(seq, data[seq], 0.2)
        assert step.action is (Action.DUPLICATE if seq <= 6 else Action.APPLIED)
    assert ingest.stats.duplicates == 4 and ingest.stats.batches_applied == 10 and ingest.next_seq == 10
    assert_same_view(index, reference(batches), model.prompts)


def _drive(
    seed: int, *, buffer_steps: int, n: int = 120
) -> tuple[WorkerIngest, PrefixIndex, CacheModel, list[EventBatch]]:
    """A publisher that drops live batches at random and answers replays late.

    Replies cover what the publisher has published by the time it answers (within its last
    ``buffer_steps``), so they overlap live batches published meanwhile.
    """
    rng = random.Random(seed)
    model = CacheModel(seed)
    batches = model.batches(n)
    data = payloads(batches)
    index = make_index()
    ingest = ingest_for(index, replay=True)
    pending: tuple[int, int] | None = None  # (start, answer once this many are published)
    now = 0.0

    def answer(start: int, published: int) -> None:
        nonlocal pending
        pending = None
        oldest = max(0, published - buffer_steps)
        step = None
        for seq in range(max(start, oldest), published):
            step = ingest.on_replay_batch(seq, data[seq], now)
            if rng.random() < 0.02:  # the connection breaks mid-replay
                step = ingest.on_replay_failed("connection lost", now)
                break
        else:
            step = ingest.on_replay_end(now)
        follow(step, published)

    def follow(step: object, published: int) -> None:
        nonlocal pending
        start = getattr(step, "replay_from", None)
        if start is not None:
            pending = (start, published + rng.randint(0, 5))

    for seq in range(n):
        now += 0.01
        if rng.random() >= 0.15:
            follow(ingest.on_live(seq, data[seq], now), seq + 1)
        if pending is not None and seq + 1 >= pending[1]:
            answer(pending[0], seq + 1)
    while pending is not None:
        answer(pending[0], n)
    return ingest, index, model, batches


@pytest.mark.parametrize("seed", range(25))
def test_random_loss_with_a_deep_replay_buffer_ends_exact(seed: int) -> None:
    ingest, index, model, batches = _drive(seed, buffer_steps=10_000)
    # The live stream may end on dropped batches nobody can notice yet; compare up to what was applied.
    applied = ingest.next_seq
    assert applied is not None and not ingest.replay_in_flight
    if ingest.stats.replays_failed == 0:
        assert ingest.stats.resets == 0 and ingest.view_complete
    if ingest.view_complete:
        assert_same_view(index, reference(batches[:applied]), model.prompts)


@pytest.mark.parametrize("seed", range(25))
def test_random_loss_with_a_shallow_replay_buffer_is_exact_or_says_so(seed: int) -> None:
    ingest, index, model, batches = _drive(seed, buffer_steps=3)
    applied = ingest.next_seq
    assert applied is not None
    if ingest.view_complete:
        assert_same_view(index, reference(batches[:applied]), model.prompts)
    else:
        assert ingest.stats.lost_batches > 0


# --- the publisher's view ------------------------------------------------------------------------


def test_the_publisher_view_says_exact_degraded_and_why() -> None:
    model = CacheModel(40)
    data = payloads(model.batches(8))
    index = make_index()
    ingest = ingest_for(index, replay=True)
    view = ingest.view(0.0, endpoint="e", rank=1)
    assert (view.endpoint, view.rank, view.worker) == ("e", 1, W)
    assert (view.state, view.reason, view.view_complete, view.last_event_age_s) == (
        "degraded",
        NO_BATCH_YET,
        False,
        None,
    )
    ingest.on_live(0, data[0], 10.0)
    ingest.on_live(1, data[1], 11.0)
    view = ingest.view(14.5)
    assert (view.state, view.view_complete, view.next_seq, view.last_event_age_s) == ("exact", True, 2, 3.5)
    assert view.stats is not None and view.stats.batches_applied == 2
    # A gap: the replay catches up while live batches wait.
    ingest.on_live(4, data[4], 20.0)
    ingest.on_live(5, data[5], 20.5)
    view = ingest.view(21.0)
    assert (view.state, view.replay_in_flight, view.replay_purpose, view.replay_from, view.buffered) == (
        "degraded",
        True,
        "gap",
        2,
        2,
    )
    assert view.reason == "replaying from seq 2 (gap); 2 live batches wait"
    assert view.as_dict()["counters"]["gaps"] == 1 and "stats" not in view.as_dict()
    for seq in (2, 3):
        ingest.on_replay_batch(seq, data[seq], 21.0)
    ingest.on_replay_end(21.0)
    assert ingest.view(21.0).state == "exact" and ingest.view(21.0).buffered == 0
    # A gap the replay cannot cover: history is lost, the view is approximate until a clear.
    ingest.on_live(7, data[7], 22.0)
    ingest.on_replay_end(22.0)
    view = ingest.view(22.0)
    assert (view.state, view.view_complete) == ("degraded", False)
    assert view.reason == "seq 6 never applied: the replay did not cover the missing batches"
    ingest.on_live(8, encode_batch(EventBatch(0.0, [AllBlocksCleared()], 0)), 23.0)
    assert ingest.view(23.0).state == "exact"


def test_a_late_join_without_replay_says_so() -> None:
    ingest = ingest_for(make_index(), replay=False)
    ingest.on_live(5, encode_batch(CacheModel(41).batch(0.0)), 0.0)
    view = ingest.view(0.0)
    assert view.state == "degraded"
    assert view.reason == "seq 0..4 never applied: joined the stream late, no replay endpoint"
    assert PublisherView.without_events("e", 0, "e").state == "fallback"
