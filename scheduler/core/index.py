"""The prefix index: which KV blocks live on which worker, in which tier.

A radix tree over chained block keys (each key names a whole prefix), stored in a
``BlockTable`` (Cython in ``kernels/blocktable.pyx``, pure-Python twin in
``blocktable_ref``). This facade turns decoded KV events into table operations and
requests into prefix matches:

* ``own`` hash mode (default): keys are kvsched's own chained hash over the
  ``token_ids`` that BlockStored carries, with a per-worker map from the engine's wire
  hash to the key so that BlockRemoved can be applied. Requests are hashed with the same
  function, so matching never depends on the engine's hash algorithm, seed or version
  (the design llm-d moved to; see shared PROTOCOLS.md §1).
* ``vllm`` hash mode: keys are vLLM's own ``sha256_cbor`` wire hashes, recomputed for
  requests with the configured seed, for pools whose events carry no token ids.

In both modes a BlockStored chained onto a parent block the worker never reported is an
orphan: nothing is stored (no lookup could reach it through the worker's chain) and
``ApplyResult.orphans`` counts it, so ingest can resynchronise the worker.

Only full-attention KV-cache groups count for prefix reuse; sliding-window and Mamba
groups are skipped. Worker names are opaque strings (normally ``ip:port``).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core import blockhash_ref
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier

log = logging.getLogger(__name__)

HashMode = Literal["own", "vllm"]
Backend = Literal["native", "reference"]


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(
        16, ge=1, le=4096, description="Tokens per KV block; must equal vLLM's --block-size."
    )
    hash_mode: HashMode = Field(
        "own",
        description="'own': kvsched's chained keys over the token ids in BlockStored (robust, default). "
        "'vllm': vLLM's sha256_cbor wire hashes, for pools whose events carry no token ids.",
    )
    own_seed: int = Field(0, ge=0, description="Seed of kvsched's own chained keys.")
    vllm_hash_seed: str = Field(
        blockhash_ref.VLLM_DEFAULT_SEED,
        description="vLLM's NONE_HASH seed: PYTHONHASHSEED of the vLLM pods, else 'vllm-none-hash'.",
    )
    max_blocks: int = Field(
        0,
        ge=0,
        description="Memory bound: most blocks kept; least-recently-used subtrees go first. 0 = no bound.",
    )
    max_workers: int = Field(
        256, ge=1, le=4096, description="Most workers (pods x data-parallel ranks) tracked."
    )
    backend: Backend = Field(
        "native", description="'native' (Cython) or 'reference' (pure Python, for tests)."
    )


class BlockTable(Protocol):
    """What the index needs from its storage; see kernels/blocktable.pyx for semantics."""

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
    ) -> int: ...

    def store_keys(self, worker: int, tier: int, keys: list[int], parent_key: int | None) -> int: ...

    def remove_blocks(self, worker: int, tier: int, engine_hashes: list[int]) -> int: ...

    def clear_worker(self, worker: int) -> int: ...

    def match(
        self, keys: Any, worker_filter: Any = None, touch: bool = True
    ) -> list[tuple[int, int, int, int, int]]: ...

    def match_named(
        self,
        keys: Any,
        names: list[str | None],
        match_type: type,
        worker_filter: Any = None,
        touch: bool = True,
    ) -> dict[str, Any]: ...

    def worker_blocks(self, worker: int) -> int: ...

    def entries(self) -> int: ...

    def bytes_used(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def unknown_removals(self) -> int: ...

    @property
    def evictions(self) -> int: ...


class PrefixMatch(NamedTuple):
    """Leading blocks of one request that one worker holds, split by the fastest tier.

    A tuple rather than a dataclass: a lookup builds one per matching worker (64 on a
    64-pod fleet whose system prompt is everywhere), and tuple construction is the
    cheapest Python object there is.
    """

    total_blocks: int
    gpu_blocks: int = 0
    cpu_blocks: int = 0
    storage_blocks: int = 0


_new_match = tuple.__new__


@dataclass(slots=True)
class ApplyResult:
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    skipped: int = 0
    # BlockStored whose parent the worker never reported: a missed message upstream.
    orphans: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class IndexStats:
    blocks_stored: int = 0
    blocks_removed: int = 0
    clears: int = 0
    skipped_blocks: int = 0
    orphans: int = 0
    event_errors: int = 0


def _make_table(config: IndexConfig) -> BlockTable:
    if config.backend == "native":
        from scheduler._native.blocktable import BlockTable as NativeTable

        table: BlockTable = NativeTable(config.max_workers, config.max_blocks)
        return table
    from scheduler.core.blocktable_ref import BlockTable as ReferenceTable

    return ReferenceTable(config.max_workers, config.max_blocks)


def _hash_functions(backend: Backend) -> Any:
    if backend == "native":
        return importlib.import_module("scheduler._native.blockhash")
    return blockhash_ref


def _extra_keys_salt(extra: object) -> int:
    """Fold one block's extra keys (LoRA, cache salt, multimodal hashes) into a 64-bit salt."""
    if extra is None:
        return 0
    encoded = blockhash_ref.cbor_canonical(extra)  # type: ignore[arg-type]
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "big") or 1


def adapter_root_id(adapter: str) -> int:
    """The id a LoRA adapter's own-key chain is rooted at, from its name.

    By name rather than vLLM's ``lora_id`` (its ``lora_int_id``): a request names its adapter,
    and each vLLM server numbers adapters in the order it loads them, so one adapter's id can
    differ between pods. The top bit set keeps these apart from the small ints of old events
    that carry only a ``lora_id``."""
    digest = hashlib.blake2b(adapter.encode(), digest_size=8, person=b"kvsched-lora").digest()
    return int.from_bytes(digest, "big") | (1 << 63)


def _block_extra_without_adapter(extra: object, event: BlockStored) -> object:
    """A block's extra keys less its adapter's, which vLLM puts first (``lora_name``; its
    ``lora_int_id`` before vLLM switched, ``vllm/v1/core/kv_cache_utils.py``
    ``_gen_lora_extra_hash_keys``): the chain's root already carries the adapter, and a
    request's keys are built from its name alone."""
    if isinstance(extra, list | tuple) and extra and extra[0] in (event.lora_name, event.lora_id):
        return tuple(extra[1:]) or None
    return extra


class PrefixIndex:
    """Blocks per worker and tier, fed by KV events, queried by request tokens."""

    def __init__(self, config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        self._table = _make_table(self.config)
        self._hashing = _hash_functions(self.config.backend)
        # The kernel module (PromptKeys, the fast payload path) when the backend is native.
        self._native: Any = None
        if self.config.backend == "native":
            self._native = importlib.import_module("scheduler._native.blocktable")
        self._worker_ids: dict[str, int] = {}
        self._worker_names: dict[int, str] = {}
        # Name by worker id (None where the id is free): what match_named reads.
        self._names: list[str | None] = [None] * self.config.max_workers
        self._free_ids: list[int] = []
        self._next_id = 0
        # Per worker, KV-cache groups known not to be full attention (from BlockStored).
        self._skipped_groups: dict[int, set[int]] = {}
        self._root_keys: dict[int | None, int] = {}
        self._vllm_root = self._hashing.vllm_none_hash(self.config.vllm_hash_seed)
        self.stats = IndexStats()
        # Made now rather than on the first request, so that a read-only lookup leaves no state.
        self._root_key(None)

    # --- workers -----------------------------------------------------------------------

    def _worker_id(self, worker: str) -> int:
        wid = self._worker_ids.get(worker)
        if wid is not None:
            return wid
        if self._free_ids:
            wid = self._free_ids.pop()
        elif self._next_id < self.config.max_workers:
            wid = self._next_id
            self._next_id += 1
        else:
            raise ValueError(
                f"prefix index is full: {self.config.max_workers} workers tracked; raise max_workers"
            )
        self._worker_ids[worker] = wid
        self._worker_names[wid] = worker
        self._names[wid] = worker
        return wid

    @property
    def workers(self) -> list[str]:
        return sorted(self._worker_ids)

    def clear_worker(self, worker: str) -> int:
        """Forget every block of a worker (AllBlocksCleared, resync after lost events)."""
        wid = self._worker_ids.get(worker)
        if wid is None:
            return 0
        self.stats.clears += 1
        return self._table.clear_worker(wid)

    def remove_worker(self, worker: str) -> None:
        """The worker left the pool: drop its blocks and free its id."""
        wid = self._worker_ids.pop(worker, None)
        if wid is None:
            return
        self._table.clear_worker(wid)
        del self._worker_names[wid]
        self._names[wid] = None
        self._skipped_groups.pop(wid, None)
        self._free_ids.append(wid)

    def worker_blocks(self, worker: str) -> int:
        wid = self._worker_ids.get(worker)
        return 0 if wid is None else self._table.worker_blocks(wid)

    # --- events ------------------------------------------------------------------------

    def _event_root(self, event: BlockStored) -> int:
        """The root an event's chain hangs from: its adapter's (by name when the event names
        it), else the base model's."""
        if event.lora_name is not None:
            return self._root_key(adapter_root_id(event.lora_name))
        return self._root_key(event.lora_id)

    def _root_key(self, lora_id: int | None) -> int:
        key = self._root_keys.get(lora_id)
        if key is None:
            key = self._hashing.own_root_key(self.config.own_seed, lora_id)
            self._root_keys[lora_id] = key
        return key

    def _store(self, wid: int, event: BlockStored, result: ApplyResult) -> None:
        if not event.counts_for_prefix_reuse:
            self._skipped_groups.setdefault(wid, set()).add(event.group_idx)
            result.skipped += len(event.block_hashes)
            return
        if not event.block_hashes:
            return
        if self.config.hash_mode == "vllm":
            stored = self._table.store_keys(wid, event.medium, event.block_hashes, event.parent_block_hash)
        else:
            if event.block_size != self.config.block_size:
                result.errors.append(
                    f"BlockStored with block_size {event.block_size} but the index uses "
                    f"{self.config.block_size}: set kvsched's block size to vLLM's --block-size"
                )
                return
            salts = None
            if event.extra_keys:
                if event.lora_name is None and event.lora_id is None:
                    salts = [_extra_keys_salt(extra) for extra in event.extra_keys]
                else:
                    extras = [_block_extra_without_adapter(extra, event) for extra in event.extra_keys]
                    salts = [_extra_keys_salt(extra) for extra in extras]
                    if not any(salts):
                        salts = None
            try:
                stored = self._table.store_blocks(
                    wid,
                    event.medium,
                    event.block_hashes,
                    event.parent_block_hash,
                    event.token_ids,
                    event.block_size,
                    self._event_root(event),
                    salts,
                )
            except (ValueError, TypeError, OverflowError) as exc:
                result.errors.append(f"BlockStored not applied: {exc}")
                return
        if stored < 0:
            result.orphans += 1
        else:
            result.stored += stored

    def apply_batch(self, worker: str, batch: EventBatch) -> ApplyResult:
        """Apply one decoded event batch of one worker; problems are reported, not raised."""
        wid = self._worker_id(worker)
        result = ApplyResult()
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(wid, event, result)
            elif isinstance(event, BlockRemoved):
                if event.group_idx in self._skipped_groups.get(wid, ()):
                    result.skipped += len(event.block_hashes)
                    continue
                result.removed += self._table.remove_blocks(wid, event.medium, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                result.cleared += self._table.clear_worker(wid)
        stats = self.stats
        stats.blocks_stored += result.stored
        stats.blocks_removed += result.removed
        stats.skipped_blocks += result.skipped
        stats.orphans += result.orphans
        stats.event_errors += len(result.errors)
        return result

    def apply_payload(self, worker: str, payload: bytes) -> tuple[ApplyResult, bool] | None:
        """Decode one vLLM KV-event batch (msgpack) and apply it in the kernel.

        Gives what ``apply_batch(worker, decode_batch(payload).batch)`` gives, plus whether
        the batch held AllBlocksCleared; None, having changed nothing, when the kernel
        leaves the payload to the reference codec (the reference backend; a malformed
        payload; an event the codec would reject or the index would report as an error).
        The kernel decodes without a Python object per block: 3x the codec's rate.
        """
        if self._native is None:
            return None
        native_table: Any = self._table  # the Cython table; the reference has no fast path
        counts = native_table.apply_payload(
            payload,
            lambda: self._worker_id(worker),
            self.config.hash_mode == "own",
            self.config.block_size,
            self.config.own_seed,
            self._skipped_groups,
            _extra_keys_salt,
        )
        if counts is None:
            return None
        stored, removed, cleared, skipped, orphans, had_clear = counts
        result = ApplyResult(stored, removed, cleared, skipped, orphans)
        stats = self.stats
        stats.blocks_stored += stored
        stats.blocks_removed += removed
        stats.skipped_blocks += skipped
        stats.orphans += orphans
        return result, had_clear

    def record_routed(self, worker: str, keys: Sequence[int]) -> None:
        """Approximate mode: assume ``worker`` now caches these request keys (it sends no events).
        With the native backend ``keys`` may be a uint64 array, which its table reads in place
        (the reference backend's keys are lists)."""
        if len(keys):
            self._table.store_keys(self._worker_id(worker), Tier.GPU, cast("list[int]", keys), None)

    def forget_routed(self, worker: str, keys: Sequence[int]) -> None:
        """Approximate mode: an assumed cache entry expired."""
        wid = self._worker_ids.get(worker)
        if wid is not None and len(keys):
            self._table.remove_blocks(wid, Tier.GPU, cast("list[int]", keys))

    # --- queries -----------------------------------------------------------------------

    def request_keys(
        self,
        tokens: Sequence[int],
        *,
        lora_id: int | None = None,
        extra_keys: Sequence[object] | None = None,
        adapter: str | None = None,
    ) -> Any:
        """Chained keys of the request's full blocks, in the index's hash mode.

        ``adapter``: the LoRA adapter the request names. vLLM hashes its blocks with the
        adapter's name as each block's first extra key, so one adapter's prefix never serves
        another's (or the base model's); the index keys them apart the same way: in vLLM's
        hash mode with that extra key, in its own from a root of the adapter's.

        With the native backend a lazy sequence (``PromptKeys``): ``len()`` is free,
        ``match`` hashes only the blocks its walk reaches, iterating hashes the rest.
        """
        if adapter is not None:
            if self.config.hash_mode == "vllm" and extra_keys is None:
                extra_keys = [(adapter,)] * (len(tokens) // self.config.block_size)
            lora_id = adapter_root_id(adapter)
        if self.config.hash_mode == "vllm":
            if self._native is not None:
                return self._native.vllm_prompt_keys(
                    tokens, self.config.block_size, self._vllm_root, extra_keys
                )
            return self._hashing.vllm_block_wire_hashes(
                tokens, self.config.block_size, self._vllm_root, extra_keys
            )
        salts = [_extra_keys_salt(extra) for extra in extra_keys] if extra_keys else None
        if self.config.backend == "native":
            return self._native.own_prompt_keys(
                tokens, self.config.block_size, self._root_key(lora_id), salts
            )
        return self._hashing.own_block_keys(tokens, self.config.block_size, self._root_key(lora_id), salts)

    def match(self, keys: Any) -> dict[str, PrefixMatch]:
        """Leading blocks of ``keys`` that each worker holds (workers with none are absent)."""
        if self._native is not None:
            matches: dict[str, PrefixMatch] = self._table.match_named(keys, self._names, PrefixMatch)
            return matches
        names = self._worker_names
        return {
            names[row[0]]: _new_match(PrefixMatch, row[1:])
            for row in self._table.match(keys)
            if row[0] in names
        }

    def peek(self, keys: Any) -> dict[str, PrefixMatch]:
        """As ``match``, leaving no trace: the recency order that decides what the memory
        bound evicts next is not touched (a diagnosis must not keep blocks alive)."""
        if self._native is not None:
            matches: dict[str, PrefixMatch] = self._table.match_named(
                keys, self._names, PrefixMatch, None, False
            )
            return matches
        names = self._worker_names
        return {
            names[row[0]]: _new_match(PrefixMatch, row[1:])
            for row in self._table.match(keys, None, False)
            if row[0] in names
        }

    def match_tokens(
        self,
        tokens: Sequence[int],
        *,
        lora_id: int | None = None,
        extra_keys: Sequence[object] | None = None,
    ) -> dict[str, PrefixMatch]:
        return self.match(self.request_keys(tokens, lora_id=lora_id, extra_keys=extra_keys))

    # --- footprint ---------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._table.num_blocks

    @property
    def unknown_removals(self) -> int:
        return self._table.unknown_removals

    @property
    def evictions(self) -> int:
        return self._table.evictions

    def bytes_per_block(self) -> float:
        blocks = self._table.num_blocks
        return self._table.bytes_used() / blocks if blocks else 0.0

    def entries(self) -> int:
        """(block, worker) pairs held, whatever the tiers."""
        return self._table.entries()

    def bytes_per_entry(self) -> float:
        entries = self._table.entries()
        return self._table.bytes_used() / entries if entries else 0.0

    def footprint(self) -> Mapping[str, float]:
        return {
            "blocks": float(self.num_blocks),
            "entries": float(self.entries()),
            "bytes": float(self._table.bytes_used()),
            "bytes_per_block": self.bytes_per_block(),
            "bytes_per_entry": self.bytes_per_entry(),
            "workers": float(len(self._worker_ids)),
        }
