"""KV-cache events as the core sees them, independent of any wire encoding.

Field set follows vLLM 0.33.0 ``vllm/distributed/kv_events.py`` (BlockStored,
BlockRemoved, AllBlocksCleared, KVEventBatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

UINT64_MASK = (1 << 64) - 1


class Tier(IntEnum):
    """Where a cached block lives, fastest first (vLLM calls this the ``medium``)."""

    GPU = 0
    CPU = 1
    STORAGE = 2

    @property
    def wire_name(self) -> str:
        return self.name

    @classmethod
    def from_wire(cls, medium: object) -> Tier:
        """vLLM omits/nils the medium for GPU; offload connectors name other tiers."""
        if medium is None:
            return cls.GPU
        if not isinstance(medium, str):
            raise ValueError(f"medium must be a string or nil, got {type(medium).__name__}")
        name = medium.upper()
        if name in ("GPU", "CUDA", "HBM"):
            return cls.GPU
        if name in ("CPU", "DRAM", "CPU_PINNED"):
            return cls.CPU
        # Disk, remote stores and connector-specific names are all slower than CPU.
        return cls.STORAGE


FULL_ATTENTION_KINDS = frozenset({"full_attention", "FullAttentionSpec", "full"})


@dataclass(slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: Tier = Tier.GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int = 0
    kv_cache_spec_kind: str | None = None

    @property
    def counts_for_prefix_reuse(self) -> bool:
        """Sliding-window and Mamba groups cannot serve a prefix; only full attention can."""
        kind = self.kv_cache_spec_kind
        return kind is None or kind in FULL_ATTENTION_KINDS


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: Tier = Tier.GPU
    group_idx: int = 0


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


def normalize_block_hash(value: object) -> int:
    """Return vLLM's block hash as the uint64 that goes on the wire by default.

    vLLM sends the last 8 bytes of the digest as an unsigned int; with
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` it sends the digest bytes; old versions
    sent Python's signed ``hash()``. All three map to the same uint64.
    """
    if isinstance(value, bool):
        raise ValueError("block hash must be an int or bytes, got bool")
    if isinstance(value, int):
        return value & UINT64_MASK
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise ValueError("empty block hash")
        return int.from_bytes(raw[-8:], "big")
    raise ValueError(f"block hash must be an int or bytes, got {type(value).__name__}")


# --- what a wire decoder hands the core ---------------------------------------------------
# Ingest (``core/kvingest.py``) is given a decoder (``codec/kvevents.py`` ``decode_batch``)
# rather than importing one: the core stays below the codec layer.


class KVEventDecodeError(ValueError):
    """The payload as a whole is not a vLLM event batch."""


@dataclass(slots=True)
class DecodedBatch:
    batch: EventBatch
    # One message per event that could not be decoded; the rest of the batch is kept.
    bad_events: list[str] = field(default_factory=list)
