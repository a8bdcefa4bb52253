"""The kernel's vLLM batch decoder (PrefixIndex.apply_payload) against the reference codec.

The codec (codec/kvevents.py decode_batch) followed by PrefixIndex.apply_batch is the
specification. For every payload, well-formed or not, the kernel either applies it with
exactly the reference's effect, or declines it having changed nothing, and then the
reference path runs. Random event streams in both encodings, with fields of every type
the codec accepts or rejects, and byte-level damage, are fed to two indexes side by side.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.codec.kvevents import KVEventDecodeError, decode_batch, encode_batch
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from scheduler.core.index import ApplyResult, IndexConfig, PrefixIndex

BS = 2
WORKERS = ("a", "b")
hash_ints = st.integers(0, 24)  # a small pool: parents resolve, removals find their blocks
# Hashes as vLLM may send them: uint64, Python's signed hash(), digest bytes.
good_hash = st.one_of(
    hash_ints, st.integers(-3, -1), st.integers(2**64 - 3, 2**64 - 1), st.binary(min_size=1, max_size=10)
)
good_token = st.one_of(st.integers(0, 3), st.integers(-2, -1), st.integers(2**40, 2**40 + 1), st.booleans())
good = {
    "medium": st.sampled_from([None, "GPU", "cpu", "CPU_PINNED", "Disk", "dram", "cuda"]),
    "kind": st.sampled_from([None, "full_attention", "FullAttentionSpec", "full", "sliding_window", 7]),
    "group": st.sampled_from([0, 0, 1, 2, None, -1, 2**63]),
    "lora": st.sampled_from([None, 0, 3, -1]),
    "extra": st.none()
    | st.lists(st.none() | st.tuples(st.sampled_from(["lora", "salt"]), st.integers(0, 2)), max_size=3)
    | st.just(5),
    "block_size": st.just(BS),
    "ts": st.sampled_from([0.5, 1, 1.0]),
    "rank": st.sampled_from([0, None, 1]),
}
# What the codec rejects or the index reports, mixed in when a payload is drawn "odd".
odd = {
    "medium": st.sampled_from([5, b"CPU", "cpu_p\u0131nned"]),
    "kind": st.sampled_from([b"full"]),
    "group": st.sampled_from([True, "1"]),
    "lora": st.sampled_from([True, "x"]),
    "extra": st.lists(st.just({}), min_size=1, max_size=2),
    "block_size": st.sampled_from([4, 0, -1, None, True, 2**64 - 1]),
    "ts": st.sampled_from([None, True]),
    "rank": st.sampled_from(["r", True]),
}
odd_hash = st.sampled_from([b"", True, "7", 1.5])
odd_token = st.sampled_from([1.5, "x", None, [1, 2]])


def _pick(draw: st.DrawFn, name: str, weird: bool) -> Any:
    if weird and draw(st.integers(0, 5)) == 0:
        return draw(odd[name])
    return draw(good[name])


def _maybe_odd(
    draw: st.DrawFn, value: st.SearchStrategy[Any], other: st.SearchStrategy[Any], weird: bool
) -> Any:
    return draw(other) if weird and draw(st.integers(0, 9)) == 0 else draw(value)


@st.composite
def stored_fields(draw: st.DrawFn, weird: bool) -> dict[str, Any]:
    n = draw(st.integers(0, 3))
    hashes = [_maybe_odd(draw, good_hash, odd_hash, weird) for _ in range(n)]
    tokens_len = n * BS + (draw(st.sampled_from([0, 0, 1, -1])) if weird else draw(st.sampled_from([0, 1])))
    tokens: Any = [_maybe_odd(draw, good_token, odd_token, weird) for _ in range(max(tokens_len, 0))]
    if weird and draw(st.integers(0, 9)) == 0:
        tokens = draw(st.sampled_from([None, 3, "abc"]))
    return {
        "block_hashes": hashes if not weird or draw(st.integers(0, 9)) else draw(st.sampled_from([None, 5])),
        "parent_block_hash": draw(st.none() | hash_ints | good_hash)
        if not weird
        else draw(st.none() | odd_hash),
        "token_ids": tokens,
        "block_size": _pick(draw, "block_size", weird),
        "lora_id": _pick(draw, "lora", weird),
        "medium": _pick(draw, "medium", weird),
        "lora_name": draw(st.none() | st.just("adapter") | st.just(3)),
        "extra_keys": _pick(draw, "extra", weird) if draw(st.integers(0, 3)) == 0 else None,
        "group_idx": _pick(draw, "group", weird),
        "kv_cache_spec_kind": _pick(draw, "kind", weird),
    }


STORED_ORDER = [
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
]


@st.composite
def raw_event(draw: st.DrawFn, weird: bool) -> Any:
    tags = ["BlockStored"] * 5 + ["BlockRemoved"] * 3 + ["AllBlocksCleared"] + (["Other"] if weird else [])
    tag = draw(st.sampled_from(tags))
    if tag == "BlockRemoved":
        fields = {
            "block_hashes": [
                _maybe_odd(draw, good_hash, odd_hash, weird) for _ in range(draw(st.integers(0, 3)))
            ],
            "medium": _pick(draw, "medium", weird),
            "group_idx": _pick(draw, "group", weird),
        }
        order = ["block_hashes", "medium", "group_idx"]
    else:
        fields = draw(stored_fields(weird))
        order = STORED_ORDER
    tag_value: Any = tag.encode() if draw(st.integers(0, 10)) == 0 else tag
    if draw(st.booleans()):  # legacy positional array, sometimes short or with more fields
        values = [fields[name] for name in order]
        cut = draw(st.sampled_from([len(values)] * 4 + [len(values) - 1, 1, len(values) + 1]))
        values = values[:cut] + (["more"] if cut > len(values) else [])
        return [tag_value, *values]
    event: dict[Any, Any] = {"type": tag_value}
    for name in order:
        value = fields[name]
        if value is not None or name in ("lora_id", "medium", "lora_name", "parent_block_hash"):
            event[name] = value
    if draw(st.integers(0, 8)) == 0:  # keys the codec does not read
        event[draw(st.sampled_from([b"type", 7, "unknown", None]))] = 1
    if weird and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([[], {}, 5, "BlockStored"]))
    return event


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    weird = draw(st.booleans())
    events = draw(st.lists(raw_event(weird), max_size=4))
    top: list[Any] = [_pick(draw, "ts", weird), events, _pick(draw, "rank", weird)]
    if draw(st.integers(0, 8)) == 0:
        top.append("more")
    if weird and draw(st.integers(0, 9)) == 0:
        top = top[:1]
    data = msgpack.packb(top, use_bin_type=True)
    damage = draw(st.integers(0, 9)) if weird else -1
    if damage == 0 and data:  # cut short
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == 1 and data:  # one byte changed
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif damage == 2:  # trailing bytes
        data += b"\x00"
    return bytes(data)


def _state(index: PrefixIndex) -> tuple[Any, ...]:
    probes = [[t for t in range(k) for _ in range(BS)] for k in range(1, 5)]
    return (
        index.num_blocks,
        index.entries(),
        index.unknown_removals,
        tuple(index.worker_blocks(w) for w in WORKERS),
        tuple(tuple(sorted(index.match_tokens(p).items())) for p in probes),
        tuple(sorted((k, tuple(sorted(v))) for k, v in index._skipped_groups.items())),
        index.stats,
        tuple(index.workers),
    )


def _reference(index: PrefixIndex, worker: str, data: bytes) -> tuple[ApplyResult | None, bool, list[str]]:
    try:
        decoded = decode_batch(data)
    except KVEventDecodeError:
        return None, False, []
    try:
        result = index.apply_batch(worker, decoded.batch)
    except (ValueError, TypeError) as exc:
        return ApplyResult(errors=[f"raised {type(exc).__name__}"]), False, decoded.bad_events
    cleared = any(isinstance(event, AllBlocksCleared) for event in decoded.batch.events)
    return result, cleared, decoded.bad_events


def _twin_indexes(hash_mode: str) -> tuple[PrefixIndex, PrefixIndex]:
    config = IndexConfig(block_size=BS, hash_mode=hash_mode, max_workers=4)  # type: ignore[arg-type]
    return PrefixIndex(config), PrefixIndex(config)


@pytest.mark.parametrize("hash_mode", ["own", "vllm"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(st.tuples(st.sampled_from(WORKERS), payload()), min_size=1, max_size=6))
def test_kernel_decoder_applies_exactly_what_the_codec_would_or_declines(
    hash_mode: str, stream: list[tuple[str, bytes]]
) -> None:
    reference, fast = _twin_indexes(hash_mode)
    for worker, data in stream:
        before = _state(fast)
        expected, expected_cleared, bad_events = _reference(reference, worker, data)
        got = fast.apply_payload(worker, data)
        if got is None:
            assert _state(fast) == before  # declined: nothing changed
            _reference(fast, worker, data)
        else:
            result, cleared = got
            # Taken only when the reference would decode every event and report nothing.
            assert expected is not None and not bad_events and not expected.errors
            assert result == expected and cleared == expected_cleared
        assert _state(fast) == _state(reference)


def _stored(hashes: list[int], parent: int | None, **fields: Any) -> BlockStored:
    return BlockStored(hashes, parent, [h % 3 for h in hashes for _ in range(BS)], BS, **fields)


@pytest.mark.parametrize("hash_mode", ["own", "vllm"])
@pytest.mark.parametrize("legacy", [False, True], ids=["tagged-map", "legacy-array"])
@settings(max_examples=100, deadline=None)
@given(
    chains=st.lists(
        st.lists(st.integers(1, 30), min_size=1, max_size=5, unique=True), min_size=1, max_size=4
    ),
    tier=st.sampled_from(list(Tier)),
    lora_id=st.none() | st.integers(0, 3),
    extra=st.none() | st.just([("lora", 1)]),
)
def test_the_common_layout_is_never_declined(
    hash_mode: str, legacy: bool, chains: list[list[int]], tier: Tier, lora_id: int | None, extra: Any
) -> None:
    reference, fast = _twin_indexes(hash_mode)
    events: list[Any] = []
    for chain in chains:
        events.append(_stored(chain, None, medium=tier, lora_id=lora_id, extra_keys=extra))
        events.append(BlockRemoved(chain[-1:], tier))
    events.append(AllBlocksCleared())
    events.append(_stored(chains[0], None, medium=tier, group_idx=1, kv_cache_spec_kind="sliding_window"))
    data = encode_batch(EventBatch(1.5, events, 0), legacy=legacy)
    expected, expected_cleared, bad_events = _reference(reference, "a", data)
    got = fast.apply_payload("a", data)
    if hash_mode == "own" and lora_id is not None:
        # An adapter's chain is rooted at its name, which the kernel does not decode: such a
        # batch is left to the codec, whole and unchanged (LoRA pools ingest at the codec's rate).
        assert got is None and _state(fast) == _state(_twin_indexes(hash_mode)[0])
        return
    assert got is not None, "the kernel left a well-formed vLLM batch to the codec"
    assert got == (expected, expected_cleared) and not bad_events
    assert _state(fast) == _state(reference)


def test_declined_payload_goes_through_the_codec_in_ingest() -> None:
    from scheduler.codec.kvevents import decode_batch
    from scheduler.core.kvingest import WorkerIngest

    index = PrefixIndex(IndexConfig(block_size=BS))
    ingest = WorkerIngest("a", index, replay_available=False, decode=decode_batch)
    good = encode_batch(EventBatch(0.0, [_stored([1, 2], None)], 0))
    bad_event = msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": [3], "block_size": 0}], 0])
    assert index.apply_payload("a", bad_event) is None  # the kernel declines ...
    ingest.on_live(0, good, 0.0)
    ingest.on_live(1, bad_event, 0.0)  # ... and ingest counts it as the codec reports it
    assert ingest.stats.bad_events == 1 and ingest.stats.resets == 0
    assert ingest.stats.blocks_stored == 2 and index.num_blocks == 2
    # A payload that is not msgpack loses its events: the worker is reset, as before.
    ingest.on_live(2, b"\xc1", 0.0)
    assert ingest.stats.malformed_payloads == 1 and ingest.stats.resets == 1
    assert index.num_blocks == 0


@pytest.mark.parametrize("hash_mode", ["own", "vllm"])
def test_a_block_stored_under_a_named_adapter_hangs_from_its_adapters_root(hash_mode: str) -> None:
    """The kernel keyed blocks by lora_id alone and stored a named adapter's blocks under the
    base model's root, where a base-model prompt then matched them (found by the property test
    above: BlockStored [0, 0] with lora_name 'adapter')."""
    reference, fast = _twin_indexes(hash_mode)
    stored = BlockStored([7, 8], None, [0, 0, 1, 1], BS, lora_name="adapter")
    data = encode_batch(EventBatch(0.5, [stored], 0))
    expected, _, _ = _reference(reference, "a", data)
    got = fast.apply_payload("a", data)
    if got is None:  # declined: the codec applies it
        _reference(fast, "a", data)
    else:
        assert got[0] == expected
    assert _state(fast) == _state(reference)
    if hash_mode == "own":
        assert reference.match_tokens([0, 0, 1, 1]) == {}  # not the base model's blocks
