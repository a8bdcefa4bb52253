"""The vLLM KV-event codec: both event encodings, hash normalisation, malformed input."""

from __future__ import annotations

import json

import msgpack
import pytest

from scheduler.codec.kvevents import (
    KVEventDecodeError,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
)
from scheduler.core.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Tier,
    normalize_block_hash,
)


def _sample_batch() -> EventBatch:
    return EventBatch(
        ts=2.25,
        events=[
            BlockStored(
                block_hashes=[11, 12],
                parent_block_hash=None,
                token_ids=list(range(32)),
                block_size=16,
                medium=Tier.CPU,
                lora_id=3,
                lora_name="adapter",
                group_idx=1,
                kv_cache_spec_kind="full_attention",
            ),
            BlockRemoved(block_hashes=[11], medium=Tier.STORAGE, group_idx=1),
            AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip_keeps_every_field(legacy: bool) -> None:
    batch = _sample_batch()
    decoded = decode_batch(encode_batch(batch, legacy=legacy))
    assert decoded.bad_events == []
    assert decoded.batch.ts == 2.25
    assert decoded.batch.data_parallel_rank == 2
    stored, removed, cleared = decoded.batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [11, 12]
    assert stored.token_ids == list(range(32))
    assert (stored.medium, stored.lora_id, stored.lora_name, stored.group_idx) == (Tier.CPU, 3, "adapter", 1)
    # The legacy array encoding predates kv_cache_spec_kind.
    assert stored.kv_cache_spec_kind == (None if legacy else "full_attention")
    assert removed == BlockRemoved([11], Tier.STORAGE, 1 if not legacy else 0)
    assert isinstance(cleared, AllBlocksCleared)


def test_tagged_map_layout_matches_vllm_0_33(shared_dir) -> None:  # type: ignore[no-untyped-def]
    vectors = json.loads((shared_dir / "vectors" / "vllm_kv_events.json").read_text())
    example = vectors["zmq_framing"]["example_0_33_batch"]
    decoded = decode_batch(msgpack.packb(example))
    assert decoded.bad_events == []
    stored = decoded.batch.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [8866452693264111234]
    assert stored.kv_cache_spec_kind == "full_attention"
    # Our encoder writes the same map, key for key (None-valued optional keys omitted).
    ours = msgpack.unpackb(encode_batch(decoded.batch))
    assert ours[1][0] == example[1][0]
    assert ours[1][2] == example[1][2]


def test_hashes_normalise_to_uint64() -> None:
    digest = bytes(range(32))
    assert normalize_block_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert normalize_block_hash(-1) == (1 << 64) - 1
    assert normalize_block_hash(5) == 5
    payload = msgpack.packb([0.0, [["BlockRemoved", [-2, digest, 7], None]], None], use_bin_type=True)
    (event,) = decode_batch(payload).batch.events
    assert isinstance(event, BlockRemoved)
    assert event.block_hashes == [(1 << 64) - 2, int.from_bytes(digest[-8:], "big"), 7]
    with pytest.raises(ValueError):
        normalize_block_hash(True)


def test_unknown_fields_and_missing_optionals() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": 9,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": None,
        "lora_name": None,
        "future_field": [1, 2],
    }
    legacy = ["BlockStored", [1], 9, [1, 2], 2, None, None, None, None, 0, "full_attention", "extra"]
    decoded = decode_batch(msgpack.packb([1, [event, legacy]]))
    assert decoded.bad_events == []
    assert decoded.batch.data_parallel_rank is None
    first, second = decoded.batch.events
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert first.medium == Tier.GPU and first.parent_block_hash == 9
    assert second.kv_cache_spec_kind == "full_attention"


def test_bad_events_are_reported_and_the_rest_kept() -> None:
    payload = msgpack.packb(
        [
            0.5,
            [
                {"type": "Nonsense"},
                {"type": "BlockStored", "block_hashes": "x", "block_size": 16},
                {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 0},
                ["BlockRemoved", [4], "GPU"],
                42,
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
    )
    decoded = decode_batch(payload)
    assert [type(e).__name__ for e in decoded.batch.events] == ["BlockRemoved", "AllBlocksCleared"]
    assert len(decoded.bad_events) == 4
    assert decoded.bad_events[0].startswith("event 0:")


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1not msgpack",
        msgpack.packb({"a": 1}),
        msgpack.packb([1]),
        msgpack.packb(["ts", []]),
        msgpack.packb([1.0, {}]),
        msgpack.packb([1.0, [], "rank"]),
    ],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(payload)


def test_sequence_frames() -> None:
    assert encode_seq(0) == b"\x00" * 8
    assert decode_seq(encode_seq(2**64 - 1)) == 2**64 - 1
    with pytest.raises(KVEventDecodeError):
        decode_seq(b"\x00\x01")
