"""Pure-Python block table: the specification of kernels/blocktable.pyx, same API and results.

A forest of blocks keyed by chained uint64 keys (0 is never a key). Each node records
which workers hold it in which tier (GPU=0, CPU=1, STORAGE=2) with reference counts,
and each worker has a map from the engine's wire hash to kvsched's key.

Rules both implementations follow:

* A node lives while some worker holds it in some tier or it has children; when it
  loses both it is freed and its parent is checked the same way.
* A node's parent is fixed when the node is created: the previous block of the stored
  chain, or for a chain's first block the node of the parent key if there is one.
* A stored chain whose parent block the worker never reported (no mapping for it in the
  worker's engine hashes) is an orphan in both key modes: nothing is stored and -1 is
  returned, so the caller can count the missed message and resynchronise the worker.
* Recency (for the ``max_blocks`` bound) is an operation counter, not a clock: a store
  touches its blocks, a match touches the blocks it matched, deepest first, so that
  ancestors end more recent than their descendants. While the table holds more than
  ``max_blocks`` nodes after a store, the least recently touched node goes together
  with its whole subtree; ``evictions`` counts every node that bound removed.
* A worker's (hash -> key) mapping is dropped when a removal finds the worker no longer
  holds the key in any tier; mappings left pointing at evicted keys are tolerated.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from scheduler.core.blockhash_ref import own_block_keys

MASK64 = (1 << 64) - 1
TIERS = 3
MAX_WORKERS_LIMIT = 1 << 12


class _Node:
    __slots__ = ("children", "key", "parent", "presence")

    def __init__(self, key: int, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: set[int] = set()
        # worker -> per-tier reference counts; a worker is present only while a count is > 0.
        self.presence: dict[int, list[int]] = {}


def _u64(value: Any) -> int:
    return operator.index(value) & MASK64


class BlockTable:
    """Blocks per worker and tier, as a forest of chained keys (pure Python)."""

    def __init__(self, max_workers: int = 128, max_blocks: int = 0) -> None:
        if not 1 <= max_workers <= MAX_WORKERS_LIMIT:
            raise ValueError(f"max_workers must be in 1..{MAX_WORKERS_LIMIT}")
        if max_blocks < 0:
            raise ValueError("max_blocks must be >= 0")
        self._max_workers = max_workers
        self._max_blocks = max_blocks
        self._nodes: dict[int, _Node] = {}
        self._engine: list[dict[int, int]] = [{} for _ in range(max_workers)]
        self._held: list[set[int]] = [set() for _ in range(max_workers)]
        # Keys from least to most recently touched (dicts keep insertion order).
        self._recency: dict[int, None] = {}
        self._unknown_removals = 0
        self._evictions = 0

    # --- arguments ---------------------------------------------------------------------

    def _check(self, worker: int, tier: int) -> None:
        if not 0 <= worker < self._max_workers:
            raise ValueError(f"worker {worker} outside 0..{self._max_workers - 1}")
        if not 0 <= tier < TIERS:
            raise ValueError(f"tier {tier} outside 0..{TIERS - 1}")

    # --- writes ------------------------------------------------------------------------

    def store_blocks(
        self,
        worker: int,
        tier: int,
        engine_hashes: list[int],
        parent_engine_hash: int | None,
        tokens: Sequence[int],
        block_size: int,
        root_key: int,
        salts: list[int] | None = None,
    ) -> int:
        """Own-key mode: key each block from its tokens, chained from the parent's key.

        Returns the number of blocks stored, or -1 (and changes nothing) when the worker
        never reported the parent block.
        """
        self._check(worker, tier)
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        hashes = [_u64(h) for h in engine_hashes]
        needed = len(hashes) * block_size
        if len(tokens) < needed:
            raise ValueError(f"{len(hashes)} blocks of {block_size} need {needed} tokens, got {len(tokens)}")
        if parent_engine_hash is None:
            parent_key = _u64(root_key)
            parent_node = None
        else:
            mapped = self._engine[worker].get(_u64(parent_engine_hash))
            if mapped is None:
                return -1
            parent_key = mapped
            parent_node = self._nodes.get(parent_key)
        if not hashes:
            return 0
        block_tokens = [operator.index(t) for t in tokens[:needed]]
        keys = own_block_keys(block_tokens, block_size, parent_key, salts)
        return self._store(worker, tier, hashes, keys, parent_node)

    def store_keys(self, worker: int, tier: int, keys: list[int], parent_key: int | None) -> int:
        """Exact mode: the engine's wire hash is the key.

        Returns the number of blocks stored, or -1 (and changes nothing) when the worker
        never reported the parent block, as ``store_blocks``: another worker holding that
        key does not make it this worker's prefix.
        """
        self._check(worker, tier)
        masked = [_u64(k) for k in keys]
        if 0 in masked:
            raise ValueError("0 is not a valid block key")
        parent_node = None
        if parent_key is not None:
            parent = _u64(parent_key)
            if parent not in self._engine[worker]:
                return -1
            parent_node = self._nodes.get(parent)
        if not masked:
            return 0
        return self._store(worker, tier, masked, masked, parent_node)

    def _store(
        self, worker: int, tier: int, hashes: list[int], keys: list[int], parent_node: _Node | None
    ) -> int:
        nodes = self._nodes
        engine = self._engine[worker]
        held = self._held[worker]
        for engine_hash, key in zip(hashes, keys, strict=True):
            node = nodes.get(key)
            if node is None:
                node = _Node(key, parent_node)
                nodes[key] = node
                if parent_node is not None:
                    parent_node.children.add(key)
            counts = node.presence.get(worker)
            if counts is None:
                counts = node.presence[worker] = [0] * TIERS
                held.add(key)
            counts[tier] += 1
            engine[engine_hash] = key
            parent_node = node
        self._touch(reversed(keys))
        if self._max_blocks and len(nodes) > self._max_blocks:
            self._enforce_bound()
        return len(keys)

    def remove_blocks(self, worker: int, tier: int, engine_hashes: list[int]) -> int:
        """Drop one reference per hash; unknown hashes or absent tiers count as unknown removals."""
        self._check(worker, tier)
        hashes = [_u64(h) for h in engine_hashes]
        engine = self._engine[worker]
        applied = 0
        for engine_hash in hashes:
            key = engine.get(engine_hash)
            if key is None:
                self._unknown_removals += 1
                continue
            node = self._nodes.get(key)
            counts = None if node is None else node.presence.get(worker)
            if node is None or counts is None:
                self._unknown_removals += 1
                del engine[engine_hash]
                continue
            if counts[tier] == 0:
                self._unknown_removals += 1
                continue
            counts[tier] -= 1
            applied += 1
            if not any(counts):
                del node.presence[worker]
                self._held[worker].discard(key)
                del engine[engine_hash]
                self._release(node)
        return applied

    def clear_worker(self, worker: int) -> int:
        """Forget every block and mapping of a worker; returns the number of blocks it held."""
        self._check(worker, 0)
        held = self._held[worker]
        cleared = len(held)
        for key in held:
            node = self._nodes[key]
            del node.presence[worker]
            self._release(node)
        self._held[worker] = set()
        self._engine[worker] = {}
        return cleared

    def _release(self, node: _Node | None) -> None:
        """Free the node if nothing holds it and nothing hangs below it, then its parent likewise."""
        while node is not None and not node.presence and not node.children:
            del self._nodes[node.key]
            self._recency.pop(node.key, None)
            parent = node.parent
            if parent is not None:
                parent.children.discard(node.key)
            node = parent

    # --- recency and the memory bound ----------------------------------------------------

    def _touch(self, keys: Iterable[int]) -> None:
        if not self._max_blocks:
            return  # no bound, so recency is never consulted
        recency = self._recency
        for key in keys:
            recency.pop(key, None)
            recency[key] = None

    def _enforce_bound(self) -> None:
        nodes = self._nodes
        while len(nodes) > self._max_blocks:
            before = len(nodes)
            victim = nodes[next(iter(self._recency))]
            parent = victim.parent
            stack = [victim]
            while stack:
                node = stack.pop()
                stack.extend(nodes[child] for child in node.children)
                for worker in node.presence:
                    self._held[worker].discard(node.key)
                del nodes[node.key]
                del self._recency[node.key]
            if parent is not None:
                parent.children.discard(victim.key)
                self._release(parent)
            self._evictions += before - len(nodes)

    # --- reads -------------------------------------------------------------------------

    def match(
        self, keys: Iterable[int], worker_filter: Iterable[int] | None = None, touch: bool = True
    ) -> list[tuple[int, int, int, int, int]]:
        """Per worker holding keys[0]: (worker, leading blocks held, of which GPU, CPU, storage).

        A worker's run continues while it holds the next block in any tier; each block is
        counted in the fastest tier the worker holds it in. ``touch`` False leaves the
        recency order (the memory bound's) as it was.
        """
        allowed = None if worker_filter is None else set(worker_filter)
        runs: dict[int, list[int]] = {}
        alive: list[int] | None = None
        walked: list[int] = []
        nodes = self._nodes
        for raw in keys:
            key = _u64(raw)
            node = nodes.get(key)
            if node is None:
                break
            presence = node.presence
            if alive is None:
                alive = sorted(w for w in presence if allowed is None or w in allowed)
            else:
                alive = [w for w in alive if w in presence]
            if not alive:
                break
            for worker in alive:
                counts = presence[worker]
                fastest = 0 if counts[0] else 1 if counts[1] else 2
                run = runs.get(worker)
                if run is None:
                    run = runs[worker] = [0, 0, 0, 0]
                run[0] += 1
                run[1 + fastest] += 1
            walked.append(key)
        if touch:
            self._touch(reversed(walked))
        return [(worker, run[0], run[1], run[2], run[3]) for worker, run in sorted(runs.items())]

    def match_named(
        self,
        keys: Iterable[int],
        names: Sequence[str | None],
        match_type: type[tuple[int, int, int, int]],
        worker_filter: Iterable[int] | None = None,
        touch: bool = True,
    ) -> dict[str, tuple[int, int, int, int]]:
        """As match, keyed by ``names[worker]`` (workers without a name are left out)."""
        result = {}
        for worker, *counts in self.match(keys, worker_filter, touch):
            name = names[worker] if worker < len(names) else None
            if name is not None:
                result[name] = tuple.__new__(match_type, counts)
        return result

    def entries(self) -> int:
        """(block, worker) pairs held."""
        return sum(len(held) for held in self._held)

    @property
    def num_blocks(self) -> int:
        return len(self._nodes)

    def worker_blocks(self, worker: int) -> int:
        self._check(worker, 0)
        return len(self._held[worker])

    @property
    def unknown_removals(self) -> int:
        return self._unknown_removals

    @property
    def evictions(self) -> int:
        return self._evictions

    def bytes_used(self) -> int:
        """Rough footprint: containers and nodes, not the shared small ints inside them."""
        size = sys.getsizeof(self._nodes) + sys.getsizeof(self._recency)
        for node in self._nodes.values():
            size += sys.getsizeof(node) + sys.getsizeof(node.children) + sys.getsizeof(node.presence)
            size += len(node.presence) * sys.getsizeof([0] * TIERS)
        for engine, held in zip(self._engine, self._held, strict=True):
            size += sys.getsizeof(engine) + sys.getsizeof(held)
        return size
