"""KV block pool with vLLM v1 prefix-caching semantics, emitting vLLM's KV events.

Follows vLLM's ``vllm/v1/core/block_pool.py`` and ``kv_cache_manager.py``:

* every block is either held by requests (``ref_cnt > 0``) or in the free queue, an LRU
  list whose head is evicted first; a cached block that is free stays findable until
  its slot is reused;
* only full blocks are cached, keyed by the chained block digest; identical blocks
  computed by two requests at once are both cached (vLLM does not de-duplicate, so its
  events can store and remove one hash twice: consumers reference-count);
* a cache hit "touches" the block: ``ref_cnt += 1`` and out of the free queue;
* allocation pops the head of the free queue and, if that slot still held a cached
  block, evicts it (``BlockRemoved``, one event per block as vLLM emits them);
* caching newly full blocks of one request emits one coalesced ``BlockStored``.

The null block vLLM reserves (block 0) is not modelled: ``capacity`` blocks are usable.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from scheduler.core.events import BlockRemoved, BlockStored, KVEvent, Tier

FULL_ATTENTION = "full_attention"


class KVBlock:
    __slots__ = ("block_id", "digest", "ref_cnt", "wire_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.digest: bytes | None = None
        self.wire_hash = 0

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.digest is not None})"


class BlockPool:
    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.capacity = capacity
        self.block_size = block_size
        self.blocks = [KVBlock(i) for i in range(capacity)]
        # Insertion order is eviction order: first key = least recently freed.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # digest -> {block_id: block}: duplicates allowed, the first one serves hits.
        self._cached: dict[bytes, dict[int, KVBlock]] = {}
        self._events: list[KVEvent] = []

    # -- queries -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: never used, or cached but held by no request."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: cached-but-free blocks do not count as used."""
        return 1.0 - len(self._free) / self.capacity

    def lookup(self, digest: bytes) -> KVBlock | None:
        found = self._cached.get(digest)
        if not found:
            return None
        return next(iter(found.values()))

    def longest_prefix(self, digests: Sequence[bytes], max_blocks: int) -> list[KVBlock]:
        """Cached blocks for the leading ``digests`` (at most ``max_blocks``), stopping at the first miss."""
        hits: list[KVBlock] = []
        for digest in digests[:max_blocks]:
            block = self.lookup(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_wire_hashes(self) -> Counter[int]:
        """Wire hash -> number of cached blocks carrying it (what a ref-counting subscriber holds)."""
        counts: Counter[int] = Counter()
        for blocks in self._cached.values():
            for block in blocks.values():
                counts[block.wire_hash] += 1
        return counts

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # -- mutations ---------------------------------------------------------------------

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        free = self._free
        for block in blocks:
            if block.ref_cnt == 0:
                del free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, count: int) -> list[KVBlock]:
        if count > len(self._free):
            raise RuntimeError(f"cannot allocate {count} blocks, {len(self._free)} free")
        popitem = self._free.popitem
        out: list[KVBlock] = []
        for _ in range(count):
            block = popitem(last=False)[1]
            if block.digest is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        digest = block.digest
        assert digest is not None
        holders = self._cached[digest]
        del holders[block.block_id]
        if not holders:
            del self._cached[digest]
        self._events.append(BlockRemoved(block_hashes=[block.wire_hash], medium=Tier.GPU))
        block.digest = None
        block.wire_hash = 0

    def cache_blocks(
        self,
        blocks: Sequence[KVBlock],
        digests: Sequence[bytes],
        wire_hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Sequence[int],
        lora: tuple[int, str] | None = None,
    ) -> None:
        """Mark ``blocks[start:end]`` full and cached; ``token_ids`` are the request's tokens;
        ``lora`` the (id, name) of the adapter the request names, which vLLM's event carries
        and puts as each block's extra key.

        ``digests``/``wire_hashes`` are the request's per-block hashes (at least ``end``).
        """
        if end <= start:
            return
        cached = self._cached
        for i in range(start, end):
            block = blocks[i]
            digest = digests[i]
            block.digest = digest
            block.wire_hash = wire_hashes[i]
            holders = cached.get(digest)
            if holders is None:
                cached[digest] = {block.block_id: block}
            else:
                holders[block.block_id] = block
        bs = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=list(wire_hashes[start:end]),
                parent_block_hash=wire_hashes[start - 1] if start > 0 else None,
                token_ids=list(token_ids[start * bs : end * bs]),
                block_size=bs,
                lora_id=None if lora is None else lora[0],
                medium=Tier.GPU,
                lora_name=None if lora is None else lora[1],
                extra_keys=None if lora is None else [(lora[1],)] * (end - start),
                group_idx=0,
                kv_cache_spec_kind=FULL_ATTENTION,
            )
        )

    def free(self, blocks_in_eviction_order: Iterable[KVBlock]) -> None:
        """Release one reference on each block; the first one freed is evicted first."""
        free = self._free
        for block in blocks_in_eviction_order:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.block_id] = block
            elif block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than held")
