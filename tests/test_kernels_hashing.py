"""Block hashing: vLLM 0.33.0's published vectors, and the Cython kernel against the reference."""

from __future__ import annotations

import array
import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler._native import blockhash as native
from scheduler._native import blocktable as lazy
from scheduler.core import blockhash_ref as reference

MASK64 = (1 << 64) - 1
BOTH = pytest.mark.parametrize("impl", [reference, native], ids=["reference", "native"])


@pytest.fixture(scope="module")
def vectors(shared_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((shared_dir / "vectors" / "vllm_kv_events.json").read_text())
    return data


def _two_blocks() -> list[int]:
    # The vectors' setup: block_size 16, block 0 = tokens 1..16, block 1 = 17..32.
    return list(range(1, 33))


def _extra_per_block(case: dict[str, Any], blocks: int) -> list[tuple[Any, ...] | None]:
    extra = tuple(tuple(item) if isinstance(item, list) else item for item in case["extra_keys"])
    if case["applies_to"] == "every block":
        return [extra] * blocks
    assert case["applies_to"] == "block0 only"
    return [extra] + [None] * (blocks - 1)


@BOTH
def test_none_hash_and_wire_ints_for_every_seed(impl: ModuleType, vectors: dict[str, Any]) -> None:
    cases = vectors["sha256_cbor"]
    assert len(cases) >= 3
    for case in cases:
        root = impl.vllm_none_hash(case["seed"])
        assert root.hex() == case["none_hash"]
        digests = impl.vllm_block_digests(_two_blocks(), 16, root)
        wire = [reference.wire_hash(d) for d in digests]
        assert wire == [case["block0_wire_int"], case["block1_wire_int"]]
        if "block0" in case:
            assert [d.hex() for d in digests] == [case["block0"], case["block1"]]


@BOTH
def test_extra_keys_cases(impl: ModuleType, vectors: dict[str, Any]) -> None:
    root = impl.vllm_none_hash(reference.VLLM_DEFAULT_SEED)
    plain = [reference.wire_hash(d) for d in impl.vllm_block_digests(_two_blocks(), 16, root)]
    for case in vectors["sha256_cbor_extra_keys_seed_vllm_none_hash"]:
        digests = impl.vllm_block_digests(_two_blocks(), 16, root, _extra_per_block(case, 2))
        wire = [reference.wire_hash(d) for d in digests]
        assert wire[0] == case["block0_wire_int"]
        assert wire[0] != plain[0]
        if "block1_wire_int" in case:
            assert wire[1] == case["block1_wire_int"]


@BOTH
def test_wire_hashes_are_digest_tails(impl: ModuleType, vectors: dict[str, Any]) -> None:
    case = vectors["sha256_cbor"][0]
    root = impl.vllm_none_hash(case["seed"])
    assert impl.vllm_block_wire_hashes(_two_blocks(), 16, root) == [
        case["block0_wire_int"],
        case["block1_wire_int"],
    ]


def test_seed_cbor_bytes_match_the_vectors(vectors: dict[str, Any]) -> None:
    expected = bytes.fromhex(vectors["cbor_bytes"]["seed_string_vllm-none-hash"])
    assert reference.cbor_canonical("vllm-none-hash") == expected


def test_partial_block_is_ignored_and_bad_block_size_rejected() -> None:
    tokens = list(range(40))
    assert native.own_block_keys(tokens, 16, 7) == reference.own_block_keys(tokens, 16, 7)
    assert len(native.own_block_keys(tokens, 16, 7)) == 2
    assert native.own_block_keys(tokens[:15], 16, 7) == []
    for impl in (reference, native):
        with pytest.raises(ValueError):
            impl.own_block_keys(tokens, 0, 7)
        with pytest.raises(ValueError):
            impl.vllm_block_digests(tokens, 0, b"")


def test_non_integer_tokens_are_rejected_like_the_reference() -> None:
    for bad in ([1.5] * 16, ["a"] * 16):
        with pytest.raises(TypeError):
            reference.own_block_keys(bad, 16, 1)
        with pytest.raises(TypeError):
            native.own_block_keys(bad, 16, 1)
    with pytest.raises(TypeError):
        native.vllm_block_digests([1.5] * 16, 16, b"")
    with pytest.raises(ValueError):
        native.vllm_block_digests([1 << 65] * 16, 16, b"")


def test_keys_array_is_uint64_and_equal_to_list() -> None:
    tokens = list(range(100, 100 + 64))
    keys = native.own_block_keys_array(tokens, 16, 99)
    assert isinstance(keys, np.ndarray) and keys.dtype == np.uint64
    assert keys.tolist() == reference.own_block_keys(tokens, 16, 99)
    assert native.own_block_keys_array([], 16, 99).shape == (0,)


def test_buffer_inputs_of_every_integer_width() -> None:
    tokens = [0, 1, 5, 127, 100, 3] * 8
    expected = reference.own_block_keys(tokens, 8, 3)
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        assert native.own_block_keys(np.asarray(tokens).astype(dtype), 8, 3) == expected
    assert native.own_block_keys(array.array("q", tokens), 8, 3) == expected
    assert native.own_block_keys(memoryview(array.array("I", tokens)), 8, 3) == expected
    assert native.own_block_keys(tuple(tokens), 8, 3) == expected
    strided = np.asarray(tokens * 2, dtype=np.int64)[::2]
    assert native.own_block_keys(strided, 8, 3) == reference.own_block_keys(strided.tolist(), 8, 3)
    signed = [-1, -300, 7, -(1 << 31)] * 4
    assert native.own_block_keys(np.asarray(signed, dtype=np.int32), 4, 3) == reference.own_block_keys(
        signed, 4, 3
    )


token_ids = st.one_of(
    st.integers(0, 200_000),
    st.integers(0, 2**63),
    st.integers(-(2**63), -1),
    st.integers(2**63, 2**64 - 1),
)
u64 = st.integers(0, MASK64)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(token_ids, max_size=300),
    block_size=st.integers(1, 64),
    parent=st.integers(-(2**70), 2**70),
    salts=st.none() | st.lists(st.integers(-(2**65), 2**65), max_size=8),
)
def test_own_keys_native_equals_reference(
    tokens: list[int], block_size: int, parent: int, salts: list[int] | None
) -> None:
    expected = reference.own_block_keys(tokens, block_size, parent, salts)
    assert native.own_block_keys(tokens, block_size, parent, salts) == expected
    masked = [t & MASK64 for t in tokens]
    as_uint64 = np.asarray(masked, dtype=np.uint64)
    assert native.own_block_keys(as_uint64, block_size, parent, salts) == expected
    assert native.own_block_keys_array(as_uint64, block_size, parent, salts).tolist() == expected
    assert native.own_block_keys_array(tokens, block_size, parent, salts).tolist() == expected
    assert native.own_block_keys(array.array("Q", masked), block_size, parent, salts) == expected


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200), block_size=st.integers(1, 64))
def test_own_keys_int64_numpy_equals_list(tokens: list[int], block_size: int) -> None:
    as_int64 = np.asarray(tokens, dtype=np.int64)
    expected = reference.own_block_keys(tokens, block_size, 11)
    assert native.own_block_keys(as_int64, block_size, 11) == expected
    assert native.own_block_keys(tokens, block_size, 11) == expected


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(-(2**70), 2**70), lora=st.none() | st.integers(-(2**65), 2**65))
def test_root_key_native_equals_reference(seed: int, lora: int | None) -> None:
    assert native.own_root_key(seed, lora) == reference.own_root_key(seed, lora)
    assert native.own_root_key(seed, lora) != 0


scalar_extra = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.text(max_size=12),
    st.binary(max_size=12),
)
extra_value = st.recursive(scalar_extra, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3))


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**64 - 1) | st.integers(-(2**64), -1), max_size=120),
    block_size=st.integers(1, 64),
    parent=st.binary(min_size=0, max_size=40),
    extra=st.none() | st.lists(st.none() | st.tuples(extra_value), max_size=5),
)
def test_vllm_digests_native_equals_reference(
    tokens: list[int], block_size: int, parent: bytes, extra: list[Any] | None
) -> None:
    expected = reference.vllm_block_digests(tokens, block_size, parent, extra)
    assert native.vllm_block_digests(tokens, block_size, parent, extra) == expected
    assert native.vllm_block_wire_hashes(tokens, block_size, parent, extra) == [
        reference.wire_hash(d) for d in expected
    ]
    if all(0 <= t < 2**63 for t in tokens):
        as_int64 = np.asarray(tokens, dtype=np.int64)
        assert native.vllm_block_digests(as_int64, block_size, parent, extra) == expected


@settings(max_examples=100, deadline=None)
@given(seed=st.text(max_size=20))
def test_vllm_none_hash_native_equals_reference(seed: str) -> None:
    assert native.vllm_none_hash(seed) == reference.vllm_none_hash(seed)


# --- lazy prompt keys and the C SHA-256 -----------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(token_ids, max_size=200),
    block_size=st.integers(1, 32),
    parent=st.integers(0, MASK64),
    salts=st.none() | st.lists(st.integers(0, MASK64), max_size=6),
    reads=st.lists(st.integers(-20, 40), max_size=4),
)
def test_own_prompt_keys_hash_on_demand_and_equal_the_reference(
    tokens: list[int], block_size: int, parent: int, salts: list[int] | None, reads: list[int]
) -> None:
    expected = reference.own_block_keys(tokens, block_size, parent, salts)
    keys = lazy.own_prompt_keys(tokens, block_size, parent, salts)
    assert len(keys) == len(expected) and keys.hashed == 0  # len() hashes nothing
    most = 0
    for i in reads:  # random access hashes up to the block read, no further
        if -len(expected) <= i < len(expected):
            assert keys[i] == expected[i]
            most = max(most, i % len(expected) + 1)
            assert keys.hashed == most
        else:
            with pytest.raises(IndexError):
                keys[i]
    assert list(keys) == expected and keys.hashed == len(expected)
    assert np.asarray(keys).tolist() == expected
    as_array = lazy.own_prompt_keys(
        np.asarray([t & MASK64 for t in tokens], dtype=np.uint64), block_size, parent, salts
    )
    assert as_array.tolist() == expected


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**64 - 1) | st.integers(-(2**64), -1), max_size=100),
    block_size=st.integers(1, 32),
    parent=st.binary(min_size=0, max_size=40),
    extra=st.none() | st.lists(st.none() | st.tuples(extra_value), max_size=5),
)
def test_vllm_prompt_keys_equal_the_reference(
    tokens: list[int], block_size: int, parent: bytes, extra: list[Any] | None
) -> None:
    expected = reference.vllm_block_wire_hashes(tokens, block_size, parent, extra)
    keys = lazy.vllm_prompt_keys(tokens, block_size, parent, extra)
    assert len(keys) == len(expected) and keys.hashed == 0
    if expected:
        assert keys[0] == expected[0] and keys.hashed == 1
    assert list(keys) == expected


def test_prompt_keys_refuse_a_token_list_that_shrank_and_bad_tokens_when_hashed() -> None:
    tokens = list(range(64))
    keys = lazy.own_prompt_keys(tokens, 16, 1)
    del tokens[20:]
    with pytest.raises(ValueError, match="shrank"):
        list(keys)
    bad = lazy.own_prompt_keys([1] * 16 + [1.5] * 16, 16, 1)
    assert bad[0] == reference.own_block_keys([1] * 16, 16, 1)[0]
    with pytest.raises(TypeError):
        bad[1]


@pytest.mark.parametrize("portable", [False, True], ids=["cpu-instructions", "portable-c"])
def test_sha256_equals_hashlib_at_every_padding_boundary(portable: bool) -> None:
    rng = np.random.default_rng(0)
    for size in [*range(0, 200), 1000, 4096, 65_537]:
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        assert native.sha256_digest(data, portable) == hashlib.sha256(data).digest(), size
