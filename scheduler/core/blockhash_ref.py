"""Pure-Python reference for block hashing; the Cython kernels must agree bit for bit.

Two key schemes:

* ``own``: kvsched's chained 64-bit keys over token ids. Every key folds in its parent's
  key, so one key names a whole prefix: ``key = avalanche(parent * PRIME64_1 ^
  digest(tokens, salt))``. The digest multiplies token pairs xored with position masks
  and folds the 128-bit products (as XXH3 mixes input with its secret); avalanche and
  constants PRIME64_1..5 are XXH64's (Yann Collet's xxHash spec). The layout is
  kvsched's.
  Computed from the ``token_ids`` in BlockStored events and from request tokens alike,
  so it never depends on the engine's hash algorithm, seed or version.
* ``vllm``: vLLM's own ``sha256_cbor`` prefix-cache hash (vLLM 0.33.0
  ``vllm/utils/hashing.py`` and ``vllm/v1/core/kv_cache_utils.py``): per full block
  ``sha256(cbor_canonical((parent_digest, tuple(tokens), extra_keys_or_None)))``, root
  ``NONE_HASH = sha256(cbor(seed_string))``. The wire value is the digest's last 8 bytes
  read big-endian, which is what this index keys on.

vLLM's other ``--prefix-caching-hash-algo``, ``sha256`` (SHA-256 of the pickled tuple), is
reproduced here too (``vllm_hash``), without a kernel: the index never keys on it, but a
diagnosis (``kvsched doctor``) and the simulated pool need to tell the two apart.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Literal

MASK64 = (1 << 64) - 1
PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME64_4 = 0x85EBCA77C2B2AE63
PRIME64_5 = 0x27D4EB2F165667C5

VLLM_DEFAULT_SEED = "vllm-none-hash"


def avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * PRIME64_2) & MASK64
    h ^= h >> 29
    h = (h * PRIME64_3) & MASK64
    h ^= h >> 32
    return h


def own_root_key(seed: int, lora_id: int | None = None) -> int:
    """Chain root for one (seed, LoRA adapter) namespace; 0 is reserved for 'no key'."""
    lora = 0 if lora_id is None else (lora_id + 1) & MASK64
    key = avalanche(((seed & MASK64) * PRIME64_1 ^ (lora * PRIME64_2 & MASK64)) & MASK64)
    return key or 1


def _mum(a: int, b: int) -> int:
    """64x64 -> 128-bit product folded to 64 bits (xxHash's XXH3 ``mul128_fold64``)."""
    product = a * b
    return (product & MASK64) ^ (product >> 64)


def own_block_digest(tokens: Sequence[int], salt: int = 0) -> int:
    """A block's content digest: its tokens and salt, not its position in the chain.

    Token pair k is mixed as ``mum(t[2k] ^ (PRIME64_1 + k*PRIME64_4 + salt),
    t[2k+1] ^ (PRIME64_2 + k*PRIME64_5 - salt))`` (a lone last token pairs with the mask
    alone); the products are summed onto ``len * PRIME64_3`` and the sum avalanched.
    One multiply per two tokens, all independent: the kernel's cost is reading the
    tokens. Real token ids are below 2**32, so a pair word never cancels its mask.
    """
    salt &= MASK64
    acc = len(tokens) * PRIME64_3
    for k in range(0, len(tokens), 2):
        pair = k // 2
        low = (tokens[k] & MASK64) ^ ((PRIME64_1 + pair * PRIME64_4 + salt) & MASK64)
        mask = (PRIME64_2 + pair * PRIME64_5 - salt) & MASK64
        high = (tokens[k + 1] & MASK64) ^ mask if k + 1 < len(tokens) else mask
        acc += _mum(low, high)
    return avalanche(acc & MASK64)


def own_chain(parent_key: int, digest: int) -> int:
    """A block's key from its parent's key and its content digest; 0 is never a key."""
    key = avalanche(((parent_key * PRIME64_1) & MASK64) ^ digest)
    return key or 1


def own_block_key(parent_key: int, tokens: Sequence[int], salt: int = 0) -> int:
    """Key of one block given its parent's key, its tokens and an optional salt.

    The key names the whole prefix: it folds in the parent's key. Only that fold is
    serial along a prompt; the digests of consecutive blocks are independent.
    """
    return own_chain(parent_key, own_block_digest(tokens, salt))


def own_block_keys(
    tokens: Sequence[int],
    block_size: int,
    parent_key: int,
    salts: Sequence[int] | None = None,
) -> list[int]:
    """Chained keys of every full block of ``tokens`` (a trailing partial block is ignored)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    keys: list[int] = []
    key = parent_key
    for i in range(len(tokens) // block_size):
        salt = salts[i] if salts is not None and i < len(salts) else 0
        key = own_block_key(key, tokens[i * block_size : (i + 1) * block_size], salt)
        keys.append(key)
    return keys


# --- vLLM sha256_cbor -----------------------------------------------------------------

CborValue = int | bytes | str | None | bool | Sequence["CborValue"]


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 1 << 8:
        return bytes([major << 5 | 24, value])
    if value < 1 << 16:
        return bytes([major << 5 | 25]) + value.to_bytes(2, "big")
    if value < 1 << 32:
        return bytes([major << 5 | 26]) + value.to_bytes(4, "big")
    if value < 1 << 64:
        return bytes([major << 5 | 27]) + value.to_bytes(8, "big")
    raise ValueError("integer does not fit CBOR's 64-bit argument")


def cbor_canonical(value: CborValue) -> bytes:
    """Canonical CBOR (RFC 8949 §4.2.1, as ``cbor2.dumps(canonical=True)``) for the value
    shapes vLLM hashes: ints, bytes, text, None, bools and arrays of these."""
    if value is None:
        return b"\xf6"
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if isinstance(value, int):
        return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)
    if isinstance(value, bytes | bytearray):
        return _cbor_head(2, len(value)) + bytes(value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _cbor_head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return _cbor_head(4, len(value)) + b"".join(cbor_canonical(item) for item in value)
    raise TypeError(f"cannot hash a {type(value).__name__} the way vLLM's sha256_cbor does")


# vLLM 0.33.0 ``vllm/utils/hashing.py`` ``get_hash_fn_by_name``: the SHA-256 variants.
VllmHashAlgo = Literal["sha256_cbor", "sha256"]
VLLM_HASH_ALGOS: tuple[VllmHashAlgo, ...] = ("sha256_cbor", "sha256")


def vllm_hash(value: CborValue, algo: VllmHashAlgo = "sha256_cbor") -> bytes:
    """vLLM's hash function ``algo`` of one value: ``sha256_cbor`` hashes canonical CBOR,
    ``sha256`` the value pickled with ``pickle.HIGHEST_PROTOCOL`` (vLLM's own choices)."""
    if algo == "sha256_cbor":
        return hashlib.sha256(cbor_canonical(value)).digest()
    if algo == "sha256":
        return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    raise ValueError(f"unknown vLLM hash algorithm {algo!r} (known: {', '.join(VLLM_HASH_ALGOS)})")


def vllm_none_hash(seed: str = VLLM_DEFAULT_SEED, algo: VllmHashAlgo = "sha256_cbor") -> bytes:
    return vllm_hash(seed, algo)


def vllm_block_digests(
    tokens: Sequence[int],
    block_size: int,
    parent_digest: bytes,
    extra_keys: Sequence[CborValue | None] | None = None,
    algo: VllmHashAlgo = "sha256_cbor",
) -> list[bytes]:
    """Full 32-byte digests of every full block, chained from ``parent_digest``.

    ``extra_keys[i]`` is block i's extra-keys tuple (LoRA, cache salt, multimodal
    hashes) or None, exactly as vLLM builds it.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    digests: list[bytes] = []
    parent = parent_digest
    for i in range(len(tokens) // block_size):
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        parent = vllm_hash((parent, block, extra), algo)
        digests.append(parent)
    return digests


def wire_hash(digest: bytes) -> int:
    """The uint64 vLLM publishes for a digest (last 8 bytes, big-endian)."""
    return int.from_bytes(digest[-8:], "big")


def vllm_block_wire_hashes(
    tokens: Sequence[int],
    block_size: int,
    parent_digest: bytes,
    extra_keys: Sequence[CborValue | None] | None = None,
) -> list[int]:
    """The uint64 vLLM publishes for every full block, chained from ``parent_digest``."""
    return [wire_hash(d) for d in vllm_block_digests(tokens, block_size, parent_digest, extra_keys)]
