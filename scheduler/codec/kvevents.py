"""vLLM KV-event wire codec (msgpack), used by ingest and by the simulated workers.

Wire facts (vLLM 0.33.0 ``vllm/distributed/kv_events.py``; see shared PROTOCOLS.md §1):

* live: ZMQ PUB multipart ``[topic, seq (8-byte big-endian uint), msgpack(batch)]``;
* replay: DEALER sends ``[b"", start_seq]``; the ROUTER answers ``[b"", topic, seq,
  payload]`` per buffered batch (older: ``[b"", seq, payload]``) and ends with seq
  ``0xFF * 8`` and an empty payload;
* batch: msgpack array ``[ts, events, data_parallel_rank]``;
* events: msgpack maps tagged by ``"type"`` (vLLM >= mid-2026) or positional arrays
  ``[tag, field1, ...]`` in declaration order (legacy). Both decode here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from scheduler.core.events import (
    UINT64_MASK,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EventBatch,
    KVEvent,
    KVEventDecodeError,
    Tier,
    normalize_block_hash,
)

SEQ_STRUCT = struct.Struct(">Q")
REPLAY_END_SEQ = 0xFFFFFFFFFFFFFFFF
REPLAY_END_FRAME = b"\xff" * 8

# Positional field order of the legacy array encoding (msgspec array_like=True).
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

# In the tagged-map encoding vLLM omits None values except for these keys.
_ALWAYS_PRESENT = frozenset({"lora_id", "medium", "lora_name", "parent_block_hash"})


def encode_seq(seq: int) -> bytes:
    return SEQ_STRUCT.pack(seq)


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame must be 8 bytes, got {len(frame)}")
    value: int = SEQ_STRUCT.unpack(frame)[0]
    return value


_INT_ONLY = {int}


def _hashes(values: object) -> list[int]:
    if not isinstance(values, list | tuple):
        raise ValueError(f"block_hashes must be an array, got {type(values).__name__}")
    # Fast path: plain non-negative ints, which is what vLLM sends by default. The type
    # check runs in C (map/set) because this is the per-block part of decoding; inline rather
    # than codec/plain_ints.py's, whose call costs this per-event check ~5% (16 hashes).
    if values and set(map(type, values)) == _INT_ONLY and min(values) >= 0 and max(values) <= UINT64_MASK:
        return values if isinstance(values, list) else list(values)
    return [normalize_block_hash(v) for v in values]


def _opt_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or nil, got {type(value).__name__}")
    return value


def _int(value: object, name: str, default: int) -> int:
    parsed = _opt_int(value, name)
    return default if parsed is None else parsed


def _stored(fields: dict[str, Any]) -> BlockStored:
    token_ids = fields.get("token_ids")
    if token_ids is None:
        token_ids = []
    elif not isinstance(token_ids, list | tuple):
        raise ValueError("token_ids must be an array")
    parent = fields.get("parent_block_hash")
    block_size = _opt_int(fields.get("block_size"), "block_size")
    if block_size is None or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {fields.get('block_size')!r}")
    extra = fields.get("extra_keys")
    kind = fields.get("kv_cache_spec_kind")
    lora_name = fields.get("lora_name")
    return BlockStored(
        block_hashes=_hashes(fields.get("block_hashes")),
        parent_block_hash=None if parent is None else normalize_block_hash(parent),
        token_ids=token_ids if isinstance(token_ids, list) else list(token_ids),
        block_size=block_size,
        lora_id=_opt_int(fields.get("lora_id"), "lora_id"),
        medium=Tier.from_wire(fields.get("medium")),
        lora_name=lora_name if isinstance(lora_name, str) else None,
        extra_keys=list(extra) if isinstance(extra, list | tuple) else None,
        group_idx=_int(fields.get("group_idx"), "group_idx", 0),
        kv_cache_spec_kind=str(kind) if kind is not None else None,
    )


def _removed(fields: dict[str, Any]) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_hashes(fields.get("block_hashes")),
        medium=Tier.from_wire(fields.get("medium")),
        group_idx=_int(fields.get("group_idx"), "group_idx", 0),
    )


def _positional(raw: Sequence[Any], names: tuple[str, ...]) -> dict[str, Any]:
    # Newer versions append fields; older ones may stop early. Unknown extras are ignored.
    return dict(zip(names, raw[1:], strict=False))


def decode_event(raw: object) -> KVEvent:
    """Decode one event in either encoding; raises ValueError when it is malformed."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields: dict[str, Any] = raw
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        fields = {}
    else:
        raise ValueError(f"event must be a map or a non-empty array, got {type(raw).__name__}")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if tag == "BlockStored":
        return _stored(fields if fields else _positional(raw, _STORED_FIELDS))  # type: ignore[arg-type]
    if tag == "BlockRemoved":
        return _removed(fields if fields else _positional(raw, _REMOVED_FIELDS))  # type: ignore[arg-type]
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown event type {tag!r}")


def decode_batch(payload: bytes) -> DecodedBatch:
    """Decode one msgpack batch. A bad event is reported and skipped, not fatal."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise KVEventDecodeError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(raw, list) or len(raw) < 2:
        raise KVEventDecodeError(f"batch must be an array [ts, events, dp_rank], got {type(raw).__name__}")
    ts, raw_events = raw[0], raw[1]
    rank = raw[2] if len(raw) > 2 else None
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise KVEventDecodeError(f"batch timestamp must be a number, got {type(ts).__name__}")
    if not isinstance(raw_events, list):
        raise KVEventDecodeError(f"batch events must be an array, got {type(raw_events).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise KVEventDecodeError(f"data_parallel_rank must be an int or nil, got {type(rank).__name__}")
    decoded = DecodedBatch(EventBatch(ts=float(ts), events=[], data_parallel_rank=rank))
    events = decoded.batch.events
    for position, raw_event in enumerate(raw_events):
        try:
            events.append(decode_event(raw_event))
        except (ValueError, TypeError) as exc:
            decoded.bad_events.append(f"event {position}: {exc}")
    return decoded


def _event_fields(event: KVEvent) -> tuple[str, dict[str, Any]]:
    if isinstance(event, BlockStored):
        return "BlockStored", {
            "block_hashes": event.block_hashes,
            "parent_block_hash": event.parent_block_hash,
            "token_ids": event.token_ids,
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium.wire_name,
            "lora_name": event.lora_name,
            "extra_keys": event.extra_keys,
            "group_idx": event.group_idx,
            "kv_cache_spec_kind": event.kv_cache_spec_kind,
        }
    if isinstance(event, BlockRemoved):
        return "BlockRemoved", {
            "block_hashes": event.block_hashes,
            "medium": event.medium.wire_name,
            "group_idx": event.group_idx,
        }
    return "AllBlocksCleared", {}


def encode_event(event: KVEvent, *, legacy: bool = False) -> Any:
    tag, fields = _event_fields(event)
    if legacy:
        # Legacy arrays stop at the fields that existed before the tagged-map switch.
        names = _STORED_FIELDS[:9] if tag == "BlockStored" else _REMOVED_FIELDS[:2]
        return [tag, *(fields[name] for name in names)] if fields else [tag]
    encoded: dict[str, Any] = {"type": tag}
    for name, value in fields.items():
        if value is not None or name in _ALWAYS_PRESENT:
            encoded[name] = value
    return encoded


def encode_batch(batch: EventBatch, *, legacy: bool = False) -> bytes:
    events = [encode_event(event, legacy=legacy) for event in batch.events]
    payload: bytes = msgpack.packb([batch.ts, events, batch.data_parallel_rank], use_bin_type=True)
    return payload
