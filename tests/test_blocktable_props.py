"""Block table: semantics by example, and the Cython table against the pure-Python reference."""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler._native import blocktable as native_blocktable
from scheduler.core import blockhash_ref
from scheduler.core.blocktable_ref import BlockTable as ReferenceTable

NativeTable = native_blocktable.BlockTable
own_prompt_keys = native_blocktable.own_prompt_keys

GPU, CPU, STORAGE = 0, 1, 2
BS = 4
ROOT = blockhash_ref.own_root_key(0)
IMPLS = pytest.mark.parametrize("make", [ReferenceTable, NativeTable], ids=["reference", "native"])
Make = Callable[..., Any]


def tokens_for(*blocks: int) -> list[int]:
    """One block of BS tokens per argument, all equal to it (distinct arguments, distinct keys)."""
    return [token for block in blocks for token in [block] * BS]


def keys_for(*blocks: int) -> list[int]:
    return blockhash_ref.own_block_keys(tokens_for(*blocks), BS, ROOT)


@IMPLS
def test_store_then_match_counts_leading_blocks_per_worker(make: Make) -> None:
    table = make(8)
    assert table.store_blocks(0, GPU, [10, 11, 12], None, tokens_for(1, 2, 3), BS, ROOT) == 3
    assert table.store_blocks(1, GPU, [20], None, tokens_for(1), BS, ROOT) == 1
    assert table.num_blocks == 3
    assert table.match(keys_for(1, 2, 3, 4)) == [(0, 3, 3, 0, 0), (1, 1, 1, 0, 0)]
    assert table.match(keys_for(1, 2, 3, 4), worker_filter=[1, 99]) == [(1, 1, 1, 0, 0)]
    assert table.match(keys_for(2, 3)) == []
    assert table.match([]) == []
    assert table.match(np.asarray(keys_for(1, 2), dtype=np.uint64)) == [(0, 2, 2, 0, 0), (1, 1, 1, 0, 0)]
    assert table.worker_blocks(0) == 3 and table.worker_blocks(1) == 1


@IMPLS
def test_chaining_through_the_parent_engine_hash(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    # Extra tokens beyond the stored blocks are ignored.
    assert table.store_blocks(0, GPU, [11, 12], 10, [*tokens_for(2, 3), 9, 9], BS, ROOT) == 2
    assert table.match(keys_for(1, 2, 3)) == [(0, 3, 3, 0, 0)]


@IMPLS
def test_unknown_parent_returns_minus_one_and_changes_nothing(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    assert table.store_blocks(0, GPU, [11], 999, tokens_for(2), BS, ROOT) == -1
    assert table.store_blocks(1, GPU, [11], 10, tokens_for(2), BS, ROOT) == -1  # 10 is worker 0's
    assert table.num_blocks == 1 and table.worker_blocks(1) == 0


@IMPLS
def test_too_few_tokens_raise_and_change_nothing(make: Make) -> None:
    table = make(4)
    with pytest.raises(ValueError):
        table.store_blocks(0, GPU, [10, 11], None, [*tokens_for(1), 2], BS, ROOT)
    with pytest.raises(ValueError):
        table.store_blocks(7, GPU, [10], None, tokens_for(1), BS, ROOT)
    with pytest.raises(ValueError):
        table.store_blocks(0, 3, [10], None, tokens_for(1), BS, ROOT)
    with pytest.raises(ValueError):
        table.store_keys(0, GPU, [5, 0], None)
    assert table.num_blocks == 0 and table.worker_blocks(0) == 0


@IMPLS
def test_reference_counts_store_twice_remove_once_still_held(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    assert table.remove_blocks(0, GPU, [10]) == 1
    assert table.match(keys_for(1)) == [(0, 1, 1, 0, 0)]
    assert table.remove_blocks(0, GPU, [10]) == 1
    assert table.match(keys_for(1)) == []
    assert table.num_blocks == 0
    assert table.remove_blocks(0, GPU, [10]) == 0
    assert table.unknown_removals == 1


@IMPLS
def test_tiers_split_by_the_fastest_copy(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10, 11], None, tokens_for(1, 2), BS, ROOT)
    table.store_blocks(0, CPU, [12, 13], 11, tokens_for(3, 4), BS, ROOT)
    table.store_blocks(0, STORAGE, [11], 10, tokens_for(2), BS, ROOT)  # slower copy of a GPU block
    table.store_blocks(1, STORAGE, [20, 21], None, tokens_for(1, 2), BS, ROOT)
    table.store_blocks(1, CPU, [21], 20, tokens_for(2), BS, ROOT)
    assert table.match(keys_for(1, 2, 3, 4)) == [(0, 4, 2, 2, 0), (1, 2, 0, 1, 1)]
    # Removing the GPU copy leaves the storage copy: still matched, now as storage.
    assert table.remove_blocks(0, GPU, [11]) == 1
    assert table.match(keys_for(1, 2, 3, 4)) == [(0, 4, 1, 2, 1), (1, 2, 0, 1, 1)]
    # A tier the worker does not hold the block in: an unknown removal, mapping kept.
    assert table.remove_blocks(0, CPU, [10]) == 0
    assert table.unknown_removals == 1
    assert table.remove_blocks(0, GPU, [10]) == 1


@IMPLS
def test_removing_a_middle_block_ends_the_run_there(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10, 11, 12], None, tokens_for(1, 2, 3), BS, ROOT)
    table.remove_blocks(0, GPU, [11])
    assert table.match(keys_for(1, 2, 3)) == [(0, 1, 1, 0, 0)]
    assert table.num_blocks == 3  # the emptied middle node still carries block 3
    table.remove_blocks(0, GPU, [12])
    assert table.num_blocks == 1  # block 3 went, and its empty parent with it


@IMPLS
def test_clear_worker_forgets_blocks_and_mappings(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10, 11], None, tokens_for(1, 2), BS, ROOT)
    table.store_blocks(1, CPU, [20], None, tokens_for(1), BS, ROOT)
    assert table.clear_worker(0) == 2
    assert table.worker_blocks(0) == 0
    assert table.num_blocks == 1
    assert table.match(keys_for(1, 2)) == [(1, 1, 0, 1, 0)]
    assert table.remove_blocks(0, GPU, [10]) == 0
    assert table.unknown_removals == 1
    assert table.store_blocks(0, GPU, [12], 11, tokens_for(3), BS, ROOT) == -1
    assert table.clear_worker(0) == 0


@IMPLS
def test_exact_mode_keys_and_unknown_parent(make: Make) -> None:
    table = make(4)
    assert table.store_keys(0, GPU, [101, 102], None) == 2
    assert table.store_keys(1, GPU, [103], None) == 1
    assert table.store_keys(1, CPU, [101], None) == 1
    assert table.match([101, 102]) == [(0, 2, 2, 0, 0), (1, 1, 0, 1, 0)]
    assert table.match([103]) == [(1, 1, 1, 0, 0)]
    assert table.remove_blocks(0, GPU, [102, 101]) == 2
    assert table.match([101, 102]) == [(1, 1, 0, 1, 0)]


@IMPLS
def test_eviction_takes_the_least_recently_used_subtree(make: Make) -> None:
    table = make(4, 4)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    table.store_blocks(0, GPU, [11], 10, tokens_for(2), BS, ROOT)  # 10 now older than its child
    table.store_blocks(1, GPU, [20, 21], None, tokens_for(7, 8), BS, ROOT)
    assert table.num_blocks == 4 and table.evictions == 0
    table.store_blocks(1, GPU, [30], None, tokens_for(9), BS, ROOT)
    assert table.num_blocks == 3
    assert table.evictions == 2  # block 1 and its child, block 2
    assert table.match(keys_for(1, 2)) == []
    assert table.match(keys_for(7, 8)) == [(1, 2, 2, 0, 0)]
    assert table.worker_blocks(0) == 0
    # The stale mapping of block 2 still chains a later store from its key.
    assert table.store_blocks(0, GPU, [12], 11, tokens_for(3), BS, ROOT) == 1
    tail = blockhash_ref.own_block_keys(tokens_for(3), BS, keys_for(1, 2)[-1])
    assert table.match(tail) == [(0, 1, 1, 0, 0)]
    # And removing an evicted block is an unknown removal.
    assert table.remove_blocks(0, GPU, [10]) == 0
    assert table.unknown_removals == 1


@IMPLS
def test_match_refreshes_recency(make: Make) -> None:
    table = make(4, 3)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT)
    table.store_blocks(0, GPU, [20], None, tokens_for(2), BS, ROOT)
    table.store_blocks(0, GPU, [30], None, tokens_for(3), BS, ROOT)
    table.match(keys_for(1))  # block 1 is now the most recent; block 2 the least
    table.store_blocks(0, GPU, [40], None, tokens_for(4), BS, ROOT)
    assert table.match(keys_for(2)) == []
    assert table.match(keys_for(1)) == [(0, 1, 1, 0, 0)]
    assert table.evictions == 1


@IMPLS
def test_salts_separate_otherwise_equal_blocks(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10], None, tokens_for(1), BS, ROOT, [5])
    assert table.match(keys_for(1)) == []
    salted = blockhash_ref.own_block_keys(tokens_for(1), BS, ROOT, [5])
    assert table.match(salted) == [(0, 1, 1, 0, 0)]


@IMPLS
def test_numpy_tokens_store_the_same_keys(make: Make) -> None:
    table = make(4)
    table.store_blocks(0, GPU, [10, 11], None, np.asarray(tokens_for(1, 2), dtype=np.int64), BS, ROOT)
    assert table.match(keys_for(1, 2)) == [(0, 2, 2, 0, 0)]


@IMPLS
def test_exact_mode_store_under_a_parent_the_worker_never_reported_is_an_orphan(make: Make) -> None:
    # As in own-key mode: the parent must be one this worker reported, whoever else holds it.
    table = make(4)
    assert table.store_keys(0, GPU, [101, 102], None) == 2
    assert table.store_keys(1, GPU, [103], 102) == -1  # worker 0 holds 102, worker 1 never did
    assert table.store_keys(1, GPU, [104], 555) == -1  # nobody holds 555
    assert table.store_keys(1, GPU, [], 555) == -1  # nothing to store, still a missed message
    assert (table.num_blocks, table.worker_blocks(1), table.match([103]), table.match([104])) == (
        2,
        0,
        [],
        [],
    )
    assert table.store_keys(0, GPU, [103], 102) == 1
    assert table.match([101, 102, 103]) == [(0, 3, 3, 0, 0)]
    # A parent the worker stopped holding (removed, or cleared) no longer chains.
    assert table.remove_blocks(0, GPU, [103]) == 1
    assert table.store_keys(0, CPU, [105], 103) == -1
    table.clear_worker(0)
    assert table.store_keys(0, GPU, [106], 101) == -1 and table.num_blocks == 0


@IMPLS
def test_a_match_without_touch_leaves_the_eviction_order_alone(make: Make) -> None:
    evicted = []
    for touch in (False, True):
        table = make(4, 4)
        table.store_blocks(0, GPU, [10, 11], None, tokens_for(1, 2), BS, ROOT)
        table.store_blocks(1, GPU, [20, 21], None, tokens_for(3, 4), BS, ROOT)
        assert table.match(keys_for(1, 2), touch=touch) == [(0, 2, 2, 0, 0)]
        assert table.match_named(keys_for(1, 2), ["a"], tuple, touch=touch) == {"a": (2, 2, 0, 0)}
        table.store_blocks(2, GPU, [30], None, tokens_for(5), BS, ROOT)  # one over the bound
        evicted.append((table.match(keys_for(1, 2)), table.match(keys_for(3, 4))))
    # Untouched, blocks 1-2 are the least recent and block 2 goes; touched, block 4 goes.
    assert evicted == [([(0, 1, 1, 0, 0)], [(1, 2, 2, 0, 0)]), ([(0, 2, 2, 0, 0)], [(1, 1, 1, 0, 0)])]


@IMPLS
def test_workers_in_several_bitmask_words(make: Make) -> None:
    table = make(200)
    for worker in (0, 63, 64, 130, 199):
        table.store_keys(worker, GPU if worker != 130 else CPU, [7, 8], None)
    table.store_keys(199, GPU, [9], 8)
    result = table.match([7, 8, 9])
    assert result == [
        (0, 2, 2, 0, 0),
        (63, 2, 2, 0, 0),
        (64, 2, 2, 0, 0),
        (130, 2, 0, 2, 0),
        (199, 3, 3, 0, 0),
    ]


def test_native_table_across_node_chunks() -> None:
    # More nodes than one 2**20-node chunk holds; bytes_used follows the growth.
    table = NativeTable(64)
    empty = table.bytes_used()
    chains, length = 1100, 1000
    for chain in range(chains):
        keys = np.arange(chain * length + 1, (chain + 1) * length + 1, dtype=np.uint64)
        table.store_keys(chain % 64, GPU, keys, None)
    assert table.num_blocks == chains * length and table.entries() == chains * length
    # Per entry at least its 40-byte node, its key slot and its engine-map slot.
    assert table.bytes_used() > empty + chains * length * (40 + 8 + 16)
    for chain in (0, 700, chains - 1):
        keys = np.arange(chain * length + 1, (chain + 1) * length + 1, dtype=np.uint64)
        assert table.match(keys) == [(chain % 64, length, length, 0, 0)]
    # 1,100 chains over 64 workers: workers 0..11 hold 18 chains, 12..63 hold 17.
    assert table.clear_worker(0) == 18 * length
    assert table.clear_worker(63) == 17 * length
    assert table.num_blocks == (chains - 35) * length
    assert table.match(np.arange(1, length + 1, dtype=np.uint64)) == []
    assert ReferenceTable(64).bytes_used() > 0


# --- native against reference --------------------------------------------------------

WORKERS = (0, 1, 64, 129)  # three bitmask words
MAX_WORKERS = 130
SMALL_BS = 2
ROOTS = (ROOT, blockhash_ref.own_root_key(0, 3))
workers = st.sampled_from(WORKERS)
tiers = st.integers(0, 2)
engine_hashes = st.integers(0, 20)  # a small pool: parents resolve, hashes repeat and get reused
table_keys = st.integers(1, 20)
small_tokens = st.lists(st.integers(1, 2), max_size=12)  # few distinct blocks: chains share prefixes


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return ("ok", call())
    except (ValueError, TypeError) as exc:
        return ("raised", type(exc))


class NativeMatchesReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ref: ReferenceTable = ReferenceTable(MAX_WORKERS)
        self.nat: Any = NativeTable(MAX_WORKERS)
        # Root-chained token runs stored so far: replayed to other workers and tiers and
        # matched again, so deep shared prefixes, mixed tiers and evictions come up often.
        self.chains: list[tuple[list[int], int]] = []

    @initialize(max_blocks=st.sampled_from([0, 0, 2, 3, 6, 12]))
    def create(self, max_blocks: int) -> None:
        self.ref = ReferenceTable(MAX_WORKERS, max_blocks)
        self.nat = NativeTable(MAX_WORKERS, max_blocks)

    def both(self, name: str, *args: Any) -> Any:
        expected = _outcome(lambda: getattr(self.ref, name)(*args))
        actual = _outcome(lambda: getattr(self.nat, name)(*args))
        assert actual == expected, name
        return expected

    @rule(
        worker=workers,
        tier=tiers,
        hashes=st.lists(engine_hashes, max_size=4),
        parent=st.none() | engine_hashes,
        tokens=small_tokens,
        root=st.sampled_from(ROOTS),
        salts=st.none() | st.lists(st.integers(0, 2), max_size=3),
    )
    def store_blocks(
        self,
        worker: int,
        tier: int,
        hashes: list[int],
        parent: int | None,
        tokens: list[int],
        root: int,
        salts: list[int] | None,
    ) -> None:
        outcome = self.both("store_blocks", worker, tier, hashes, parent, tokens, SMALL_BS, root, salts)
        if outcome[0] == "ok" and outcome[1] > 0 and parent is None and salts is None:
            self.chains.append((tokens[: len(hashes) * SMALL_BS], root))

    @precondition(lambda self: self.chains)
    @rule(data=st.data(), worker=workers, tier=tiers)
    def store_known_chain(self, data: st.DataObject, worker: int, tier: int) -> None:
        tokens, root = data.draw(st.sampled_from(self.chains))
        blocks = data.draw(st.integers(1, len(tokens) // SMALL_BS))
        hashes = data.draw(st.lists(engine_hashes, min_size=blocks, max_size=blocks))
        self.both("store_blocks", worker, tier, hashes, None, tokens, SMALL_BS, root, None)

    @precondition(lambda self: self.chains)
    @rule(
        data=st.data(),
        extra=small_tokens,
        worker_filter=st.none() | st.lists(workers, max_size=2),
        as_array=st.booleans(),
    )
    def match_known_chain(
        self, data: st.DataObject, extra: list[int], worker_filter: list[int] | None, as_array: bool
    ) -> None:
        tokens, root = data.draw(st.sampled_from(self.chains))
        keys = blockhash_ref.own_block_keys(tokens + extra, SMALL_BS, root)
        expected = self.ref.match(keys, worker_filter)
        query: Any = np.asarray(keys, dtype=np.uint64) if as_array else keys
        assert self.nat.match(query, worker_filter) == expected
        # The lazy keys of the same prompt (hashed as the walk goes) give the same answer,
        # and so does the named form.
        lazy = own_prompt_keys(tokens + extra, SMALL_BS, root)
        assert self.nat.match(lazy, worker_filter) == expected
        # Ids in a uint64 buffer (as the ext_proc parsers hand them) take a longer lead.
        buffered = own_prompt_keys(array("Q", tokens + extra), SMALL_BS, root)
        assert self.nat.match(buffered, worker_filter) == expected
        names = [f"w{w}" for w in range(MAX_WORKERS)]
        assert self.nat.match_named(lazy, names, tuple, worker_filter) == self.ref.match_named(
            keys, names, tuple, worker_filter
        )

    @rule(worker=workers, tier=tiers, keys=st.lists(table_keys, max_size=4), parent=st.none() | table_keys)
    def store_keys(self, worker: int, tier: int, keys: list[int], parent: int | None) -> None:
        self.both("store_keys", worker, tier, keys, parent)

    @rule(worker=workers, tier=tiers, hashes=st.lists(engine_hashes | table_keys, max_size=4))
    def remove_blocks(self, worker: int, tier: int, hashes: list[int]) -> None:
        self.both("remove_blocks", worker, tier, hashes)

    @rule(worker=workers)
    def clear_worker(self, worker: int) -> None:
        self.both("clear_worker", worker)

    @rule(
        tokens=small_tokens,
        root=st.sampled_from(ROOTS),
        raw=st.none() | st.lists(table_keys, max_size=5),
        worker_filter=st.none() | st.lists(workers, max_size=2),
        as_array=st.booleans(),
    )
    def match(
        self,
        tokens: list[int],
        root: int,
        raw: list[int] | None,
        worker_filter: list[int] | None,
        as_array: bool,
    ) -> None:
        keys = raw if raw is not None else blockhash_ref.own_block_keys(tokens, SMALL_BS, root)
        expected = self.ref.match(keys, worker_filter)
        query: Any = np.asarray(keys, dtype=np.uint64) if as_array else keys
        assert self.nat.match(query, worker_filter) == expected

    @invariant()
    def same_counters(self) -> None:
        assert self.nat.num_blocks == self.ref.num_blocks
        assert self.nat.unknown_removals == self.ref.unknown_removals
        assert self.nat.evictions == self.ref.evictions
        assert self.nat.entries() == self.ref.entries()
        for worker in WORKERS:
            assert self.nat.worker_blocks(worker) == self.ref.worker_blocks(worker)


NativeMatchesReference.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestNativeMatchesReference = NativeMatchesReference.TestCase


@pytest.mark.parametrize("max_blocks", [0, 150])
def test_long_churn_matches_reference(max_blocks: int) -> None:
    """Thousands of operations over a few hundred keys: table growth, backward-shift
    deletion, per-worker map growth and recency-queue compaction all get exercised."""
    rng = random.Random(max_blocks)
    ref = ReferenceTable(MAX_WORKERS, max_blocks)
    nat = NativeTable(MAX_WORKERS, max_blocks)
    for step in range(6000):
        worker = rng.choice(WORKERS)
        tier = rng.randrange(3)
        roll = rng.random()
        if roll < 0.4:
            blocks = rng.randint(1, 8)
            hashes = [rng.randrange(400) for _ in range(blocks)]
            parent = None if rng.random() < 0.3 else rng.randrange(400)
            tokens = [rng.randint(1, 3) for _ in range(blocks * SMALL_BS)]
            args: tuple[Any, ...] = (worker, tier, hashes, parent, tokens, SMALL_BS, ROOT)
            assert nat.store_blocks(*args) == ref.store_blocks(*args), step
        elif roll < 0.5:
            keys = [rng.randint(1, 300) for _ in range(rng.randint(1, 6))]
            parent_key = rng.choice([None, rng.randint(1, 300)])
            assert nat.store_keys(worker, tier, keys, parent_key) == ref.store_keys(
                worker, tier, keys, parent_key
            )
        elif roll < 0.8:
            hashes = [rng.randrange(400) for _ in range(rng.randint(1, 6))]
            assert nat.remove_blocks(worker, tier, hashes) == ref.remove_blocks(worker, tier, hashes), step
        elif roll < 0.81:
            assert nat.clear_worker(worker) == ref.clear_worker(worker)
        else:
            tokens = [rng.randint(1, 3) for _ in range(rng.randint(1, 10) * SMALL_BS)]
            keys = blockhash_ref.own_block_keys(tokens, SMALL_BS, ROOT)
            assert nat.match(keys) == ref.match(keys), step
        assert nat.num_blocks == ref.num_blocks, step
    assert nat.unknown_removals == ref.unknown_removals
    assert nat.evictions == ref.evictions
    assert [nat.worker_blocks(w) for w in WORKERS] == [ref.worker_blocks(w) for w in WORKERS]
    assert ref.num_blocks > 100
    if max_blocks:
        assert ref.evictions > 0


# --- wide worker sets: nodes held by many workers, ids past 64 -------------------------------

WIDE_WORKERS = (0, 3, 17, 40, 63, 64, 65, 70, 90, 100, 111, 127, 128, 140, 150, 160, 170, 180, 190, 199)
WIDE_MAX = 200
wide_workers = st.sampled_from(WIDE_WORKERS)
wide_keys = st.integers(1, 8)  # few keys, so one node gathers more than 12 holders


class WideWorkerSetsMatchReference(RuleBasedStateMachine):
    """Holder sets that grow past one 64-bit word and past the 12 inline entries, shrink
    back, and workers that restart (clear, then store their chains again)."""

    def __init__(self) -> None:
        super().__init__()
        self.ref: ReferenceTable = ReferenceTable(WIDE_MAX)
        self.nat: Any = NativeTable(WIDE_MAX)
        self.stored: dict[int, list[tuple[int, list[int], int | None]]] = {}

    @initialize(max_blocks=st.sampled_from([0, 0, 5]))
    def create(self, max_blocks: int) -> None:
        self.ref = ReferenceTable(WIDE_MAX, max_blocks)
        self.nat = NativeTable(WIDE_MAX, max_blocks)

    def both(self, name: str, *args: Any) -> Any:
        expected = _outcome(lambda: getattr(self.ref, name)(*args))
        actual = _outcome(lambda: getattr(self.nat, name)(*args))
        assert actual == expected, name
        return expected

    @rule(
        workers=st.lists(wide_workers, min_size=1, max_size=16, unique=True),
        tier=tiers,
        keys=st.lists(wide_keys, min_size=1, max_size=3),
        parent=st.none() | wide_keys,
    )
    def store_on_many(self, workers: list[int], tier: int, keys: list[int], parent: int | None) -> None:
        for worker in workers:
            self.both("store_keys", worker, tier, keys, parent)
            self.stored.setdefault(worker, []).append((tier, keys, parent))

    @rule(
        workers=st.lists(wide_workers, min_size=1, max_size=16, unique=True),
        tier=tiers,
        keys=st.lists(wide_keys, min_size=1, max_size=3),
    )
    def remove_on_many(self, workers: list[int], tier: int, keys: list[int]) -> None:
        for worker in workers:
            self.both("remove_blocks", worker, tier, keys)

    @rule(worker=wide_workers)
    def restart(self, worker: int) -> None:
        self.both("clear_worker", worker)
        for tier, keys, parent in self.stored.pop(worker, [])[-2:]:
            self.both("store_keys", worker, tier, keys, parent)

    @rule(keys=st.lists(wide_keys, min_size=1, max_size=5), worker_filter=st.none() | st.lists(wide_workers))
    def match(self, keys: list[int], worker_filter: list[int] | None) -> None:
        assert self.nat.match(keys, worker_filter) == self.ref.match(keys, worker_filter)

    @invariant()
    def same_counters(self) -> None:
        assert self.nat.num_blocks == self.ref.num_blocks
        assert self.nat.unknown_removals == self.ref.unknown_removals
        assert self.nat.evictions == self.ref.evictions
        assert self.nat.entries() == self.ref.entries()
        for worker in WIDE_WORKERS:
            assert self.nat.worker_blocks(worker) == self.ref.worker_blocks(worker)


WideWorkerSetsMatchReference.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestWideWorkerSetsMatchReference = WideWorkerSetsMatchReference.TestCase


def test_a_thousand_workers_on_one_block_and_back() -> None:
    table = NativeTable(1000)
    for worker in range(1000):
        table.store_keys(worker, GPU if worker % 3 else CPU, [7, 8], None)
    result = table.match([7, 8])
    assert len(result) == 1000
    assert result[3] == (3, 2, 0, 2, 0) and result[4] == (4, 2, 2, 0, 0)
    for worker in range(999):
        table.remove_blocks(worker, GPU if worker % 3 else CPU, [7, 8])
    assert table.match([7, 8]) == [(999, 2, 0, 2, 0)]
    assert table.num_blocks == 2 and table.entries() == 2
    table.clear_worker(999)
    assert table.num_blocks == 0 and table.match([7]) == []


def test_lazy_walk_hashes_only_a_short_lead_past_the_match() -> None:
    table = NativeTable(4)
    tokens = [t for block in range(200) for t in [block + 1] * BS]
    table.store_blocks(0, GPU, list(range(10)), None, tokens[: 10 * BS], BS, ROOT)
    keys = own_prompt_keys(tokens, BS, ROOT)
    assert table.match(keys) == [(0, 10, 10, 0, 0)]
    # The walk fetches table slots 8 blocks ahead and hashes 4 blocks per step, so it
    # stops at most 12 blocks past the first block nobody holds: 23 of 200 here.
    assert 11 <= keys.hashed <= 23
    assert len(keys) == 200
    # From a uint64 buffer: slots 24 ahead, 8 blocks a step, so at most 43 of 200.
    buffered = own_prompt_keys(array("Q", tokens), BS, ROOT)
    assert table.match(buffered) == [(0, 10, 10, 0, 0)]
    assert 11 <= buffered.hashed <= 43
