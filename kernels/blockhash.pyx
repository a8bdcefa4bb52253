# cython: language_level=3
"""Block hashing hot path: kvsched's chained keys and vLLM's sha256_cbor, bit-identical to
scheduler/core/blockhash_ref.py (the specification; see its docstring for both schemes).

Token sequences may be Python lists (as msgpack decodes them) or integer buffers (numpy
arrays, array.array, memoryview); lists are read item by item in C, contiguous 8-byte
buffers in place.
"""

include "_hashcore.pxi"

import hashlib

import numpy as np

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_FromUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport realloc
from libc.string cimport memcpy

from scheduler.core import blockhash_ref as _ref

VLLM_DEFAULT_SEED = _ref.VLLM_DEFAULT_SEED
cdef object _sha256 = hashlib.sha256
cdef object _cbor_canonical = _ref.cbor_canonical
cdef uint64_t MASK64 = 0xFFFFFFFFFFFFFFFFULL


# --- kvsched's own chained keys -------------------------------------------------------

def own_root_key(seed, lora_id=None):
    """Chain root for one (seed, LoRA adapter) namespace; 0 is reserved for 'no key'."""
    cdef uint64_t lora = 0 if lora_id is None else _mask_obj(lora_id) + 1
    cdef uint64_t key = _avalanche(_mask_obj(seed) * PRIME64_1 ^ lora * PRIME64_2)
    return PyLong_FromUnsignedLongLong(key if key != 0 else 1)


cdef int _salt_at(object salts, Py_ssize_t i, Py_ssize_t nsalts, uint64_t* out) except -1:
    if i >= nsalts:
        out[0] = 0
    elif type(salts) is list:
        kv_mask_u64(PyList_GET_ITEM(salts, i), out)
    else:
        out[0] = _mask_obj(salts[i])
    return 0


cdef Py_ssize_t _own_keys(object tokens, Py_ssize_t block_size, object parent_key, object salts,
                          uint64_t** out) except -1:
    """Chained keys of every full block into a malloc'd array (caller frees); returns the count."""
    cdef Py_ssize_t nblocks, i, nsalts = 0
    cdef uint64_t key = _mask_obj(parent_key)
    cdef uint64_t salt
    cdef U64View view
    cdef uint64_t* keys
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if salts is not None:
        nsalts = len(salts)
    if type(tokens) is list:
        nblocks = PyList_GET_SIZE(tokens) // block_size
        keys = <uint64_t*>malloc(max(nblocks, 1) * sizeof(uint64_t))
        if keys == NULL:
            raise MemoryError()
        try:
            for i in range(nblocks):
                _salt_at(salts, i, nsalts, &salt)
                _block_key_list(<list>tokens, i * block_size, block_size, key, salt, &keys[i])
                key = keys[i]
        except BaseException:
            free(keys)
            raise
        out[0] = keys
        return nblocks
    _view_open(tokens, -1, &view)
    try:
        nblocks = view.n // block_size
        keys = <uint64_t*>malloc(max(nblocks, 1) * sizeof(uint64_t))
        if keys == NULL:
            raise MemoryError()
        try:
            for i in range(nblocks):
                _salt_at(salts, i, nsalts, &salt)
                key = _block_key_u64(key, salt, view.data + i * block_size, block_size)
                keys[i] = key
        except BaseException:
            free(keys)
            raise
    finally:
        _view_close(&view)
    out[0] = keys
    return nblocks


def own_block_keys(tokens, Py_ssize_t block_size, parent_key, salts=None):
    """Chained keys of every full block of ``tokens`` (a trailing partial block is ignored)."""
    cdef uint64_t* keys = NULL
    cdef Py_ssize_t n = _own_keys(tokens, block_size, parent_key, salts, &keys)
    cdef Py_ssize_t i
    cdef list result
    try:
        result = [PyLong_FromUnsignedLongLong(keys[i]) for i in range(n)]
    finally:
        free(keys)
    return result


def own_block_keys_array(tokens, Py_ssize_t block_size, parent_key, salts=None):
    """As own_block_keys, as a numpy uint64 array (no Python int per key)."""
    cdef uint64_t* keys = NULL
    cdef Py_ssize_t n = _own_keys(tokens, block_size, parent_key, salts, &keys)
    cdef uint64_t[::1] dest
    try:
        result = np.empty(n, dtype=np.uint64)
        if n:
            dest = result
            memcpy(&dest[0], keys, n * sizeof(uint64_t))
    finally:
        free(keys)
    return result


# --- vLLM sha256_cbor -------------------------------------------------------------------
# Canonical CBOR (RFC 8949 §4.2.1) written straight into a C buffer; shapes the fast
# encoder does not know are handed to blockhash_ref.cbor_canonical, so errors match too.

cdef struct CBuf:
    char* data
    Py_ssize_t length
    Py_ssize_t capacity


cdef int _cbuf_reserve(CBuf* buf, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = buf.length + extra
    cdef Py_ssize_t cap
    cdef char* grown
    if want <= buf.capacity:
        return 0
    cap = max(buf.capacity * 2, want, 256)
    grown = <char*>realloc(buf.data, cap)
    if grown == NULL:
        raise MemoryError()
    buf.data = grown
    buf.capacity = cap
    return 0


cdef inline void _put_head(CBuf* buf, uint8_t major, uint64_t value) noexcept:
    # Smallest head for the argument; the caller reserved 9 bytes.
    cdef unsigned char* p = <unsigned char*>(buf.data + buf.length)
    cdef uint8_t m = major << 5
    if value < 24:
        p[0] = m | <uint8_t>value
        buf.length += 1
    elif value < 0x100:
        p[0] = m | 24
        p[1] = <uint8_t>value
        buf.length += 2
    elif value < 0x10000:
        p[0] = m | 25
        p[1] = <uint8_t>(value >> 8)
        p[2] = <uint8_t>value
        buf.length += 3
    elif value < 0x100000000ULL:
        p[0] = m | 26
        p[1] = <uint8_t>(value >> 24)
        p[2] = <uint8_t>(value >> 16)
        p[3] = <uint8_t>(value >> 8)
        p[4] = <uint8_t>value
        buf.length += 5
    else:
        p[0] = m | 27
        p[1] = <uint8_t>(value >> 56)
        p[2] = <uint8_t>(value >> 48)
        p[3] = <uint8_t>(value >> 40)
        p[4] = <uint8_t>(value >> 32)
        p[5] = <uint8_t>(value >> 24)
        p[6] = <uint8_t>(value >> 16)
        p[7] = <uint8_t>(value >> 8)
        p[8] = <uint8_t>value
        buf.length += 9


cdef inline int _put_raw(CBuf* buf, const char* data, Py_ssize_t n) except -1:
    _cbuf_reserve(buf, n)
    memcpy(buf.data + buf.length, data, n)
    buf.length += n
    return 0


cdef int _put_signed(CBuf* buf, int64_t value) except -1:
    _cbuf_reserve(buf, 9)
    if value >= 0:
        _put_head(buf, 0, <uint64_t>value)
    else:
        _put_head(buf, 1, <uint64_t>(-1 - value))
    return 0


cdef int _put_fallback(CBuf* buf, object value) except -1:
    cdef bytes encoded = _cbor_canonical(value)
    return _put_raw(buf, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded))


cdef int _put_int(CBuf* buf, object value) except -1:
    cdef int overflow = 0
    cdef long long small = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0:
        return _put_signed(buf, small)
    if overflow > 0:
        try:
            _cbuf_reserve(buf, 9)
            _put_head(buf, 0, PyLong_AsUnsignedLongLong(value))
            return 0
        except OverflowError:
            pass
    # Below -2**63 or above 2**64-1: rare; the reference encodes or rejects it.
    return _put_fallback(buf, value)


cdef int _put_value(CBuf* buf, object value) except -1:
    cdef Py_ssize_t n
    cdef const char* text
    if value is None:
        return _put_raw(buf, b"\xf6", 1)
    if value is True:
        return _put_raw(buf, b"\xf5", 1)
    if value is False:
        return _put_raw(buf, b"\xf4", 1)
    if isinstance(value, int):
        return _put_int(buf, value)
    if isinstance(value, bytes):
        n = PyBytes_GET_SIZE(value)
        _cbuf_reserve(buf, 9)
        _put_head(buf, 2, <uint64_t>n)
        return _put_raw(buf, PyBytes_AS_STRING(value), n)
    if isinstance(value, str):
        text = PyUnicode_AsUTF8AndSize(value, &n)
        _cbuf_reserve(buf, 9)
        _put_head(buf, 3, <uint64_t>n)
        return _put_raw(buf, text, n)
    if isinstance(value, (list, tuple)):
        _cbuf_reserve(buf, 9)
        _put_head(buf, 4, <uint64_t>len(value))
        for item in value:
            _put_value(buf, item)
        return 0
    return _put_fallback(buf, value)


cdef int _put_tokens_list(CBuf* buf, list tokens, Py_ssize_t start, Py_ssize_t n) except -1:
    cdef Py_ssize_t j
    cdef object item
    _cbuf_reserve(buf, 9 + 9 * n)
    _put_head(buf, 4, <uint64_t>n)
    for j in range(start, start + n):
        item = <object>PyList_GET_ITEM(tokens, j)
        if type(item) is int:
            _put_int(buf, item)
        else:
            _put_value(buf, item)
    return 0


cdef int _put_tokens_view(CBuf* buf, const U64View* view, Py_ssize_t start, Py_ssize_t n) except -1:
    cdef Py_ssize_t j
    cdef uint64_t v
    _cbuf_reserve(buf, 9 + 9 * n)
    _put_head(buf, 4, <uint64_t>n)
    for j in range(start, start + n):
        v = view.data[j]
        if view.is_signed and <int64_t>v < 0:
            _put_head(buf, 1, <uint64_t>(-1 - <int64_t>v))
        else:
            _put_head(buf, 0, v)
    return 0


def vllm_none_hash(seed=VLLM_DEFAULT_SEED):
    """vLLM's NONE_HASH: sha256 of the canonical CBOR of the seed string."""
    cdef CBuf buf
    buf.data = NULL
    buf.length = 0
    buf.capacity = 0
    try:
        _put_value(&buf, seed)
        return _sha256(PyBytes_FromStringAndSize(buf.data, buf.length)).digest()
    finally:
        free(buf.data)


cdef list _vllm_digests(object tokens, Py_ssize_t block_size, object parent_digest, object extra_keys):
    cdef Py_ssize_t nblocks, i, nextra = 0, extra_at
    cdef CBuf buf
    cdef U64View view
    cdef bint is_list = type(tokens) is list
    cdef list digests = []
    cdef object parent = parent_digest
    cdef object extra
    cdef object last_extra = None
    cdef bytes last_encoded = None
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if extra_keys is not None:
        nextra = len(extra_keys)
    buf.data = NULL
    buf.length = 0
    buf.capacity = 0
    view.owned = NULL
    view.has_buffer = False
    if not is_list and PyObject_CheckBuffer(tokens):
        _view_open(tokens, -1, &view)
        if not view.has_buffer:
            # Not an integer buffer: encode the items as the objects they are.
            _view_close(&view)
            tokens = list(tokens)
            is_list = True
    elif not is_list:
        tokens = list(tokens)
        is_list = True
    try:
        if is_list:
            nblocks = PyList_GET_SIZE(tokens) // block_size
        else:
            nblocks = view.n // block_size
        for i in range(nblocks):
            buf.length = 0
            _cbuf_reserve(&buf, 1)
            buf.data[0] = <char>0x83  # array of 3: (parent, tokens, extra)
            buf.length = 1
            _put_value(&buf, parent)
            if is_list:
                _put_tokens_list(&buf, <list>tokens, i * block_size, block_size)
            else:
                _put_tokens_view(&buf, &view, i * block_size, block_size)
            extra = extra_keys[i] if i < nextra else None
            if extra is None:
                _put_raw(&buf, b"\xf6", 1)
            else:
                # LoRA extra keys repeat the same tuple on every block: encode it once.
                if extra is not last_extra:
                    extra_at = buf.length
                    _put_value(&buf, extra)
                    last_encoded = PyBytes_FromStringAndSize(buf.data + extra_at, buf.length - extra_at)
                    last_extra = extra
                else:
                    _put_raw(&buf, PyBytes_AS_STRING(last_encoded), PyBytes_GET_SIZE(last_encoded))
            parent = _sha256(PyBytes_FromStringAndSize(buf.data, buf.length)).digest()
            digests.append(parent)
    finally:
        free(buf.data)
        _view_close(&view)
    return digests


def vllm_block_digests(tokens, Py_ssize_t block_size, parent_digest, extra_keys=None):
    """Full 32-byte digests of every full block, chained from ``parent_digest``."""
    return _vllm_digests(tokens, block_size, parent_digest, extra_keys)


def vllm_block_wire_hashes(tokens, Py_ssize_t block_size, parent_digest, extra_keys=None):
    """The uint64 vLLM publishes per block (each digest's last 8 bytes, big-endian)."""
    cdef list digests = _vllm_digests(tokens, block_size, parent_digest, extra_keys)
    cdef list wire = []
    cdef const unsigned char* p
    cdef uint64_t v
    cdef Py_ssize_t k, size
    for digest in digests:
        size = PyBytes_GET_SIZE(digest)
        p = <const unsigned char*>PyBytes_AS_STRING(digest) + size - 8
        v = 0
        for k in range(8):
            v = (v << 8) | p[k]
        wire.append(PyLong_FromUnsignedLongLong(v))
    return wire
