# cython: language_level=3
"""Block hashing hot path: kvsched's chained keys and vLLM's sha256_cbor, bit-identical to
scheduler/core/blockhash_ref.py (the specification; see its docstring for both schemes).

Token sequences may be Python lists (as msgpack decodes them) or integer buffers (numpy
arrays, array.array, memoryview); lists are read item by item in C, contiguous 8-byte
buffers in place.
"""

include "_hashcore.pxi"


import numpy as np

from cpython.long cimport PyLong_FromUnsignedLongLong

from scheduler.core import blockhash_ref as _ref

VLLM_DEFAULT_SEED = _ref.VLLM_DEFAULT_SEED
cdef object _cbor_canonical = _ref.cbor_canonical
cdef uint64_t MASK64 = 0xFFFFFFFFFFFFFFFFULL


# --- kvsched's own chained keys -------------------------------------------------------

def own_root_key(seed, lora_id=None):
    """Chain root for one (seed, LoRA adapter) namespace; 0 is reserved for 'no key'."""
    cdef uint64_t lora = 0 if lora_id is None else _mask_obj(lora_id) + 1
    cdef uint64_t key = _avalanche(_mask_obj(seed) * PRIME64_1 ^ lora * PRIME64_2)
    return PyLong_FromUnsignedLongLong(key if key != 0 else 1)


cdef Py_ssize_t _own_keys(object tokens, Py_ssize_t block_size, object parent_key, object salts,
                          uint64_t** out) except -1:
    """Chained keys of every full block into a malloc'd array (caller frees); returns the count."""
    cdef Py_ssize_t nblocks, nsalts = 0
    cdef uint64_t key = _mask_obj(parent_key)
    cdef uint64_t* salt_values = NULL
    cdef uint64_t* keys = NULL
    cdef U64View view
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    view.owned = NULL
    view.has_buffer = False
    view.data = NULL
    if type(tokens) is list:
        nblocks = PyList_GET_SIZE(tokens) // block_size
    else:
        _view_open(tokens, -1, &view)
        nblocks = view.n // block_size
    try:
        _salts_array(salts, &nsalts, &salt_values)
        keys = <uint64_t*>malloc(max(nblocks, 1) * sizeof(uint64_t))
        if keys == NULL:
            raise MemoryError()
        try:
            _chain_keys(tokens, view.data, 0, nblocks, block_size, key, salt_values, nsalts, keys)
        except BaseException:
            free(keys)
            raise
    finally:
        free(salt_values)
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

include "_cbor.pxi"
include "_sha256.pxi"


cdef bytes _sha256_of(const CBuf* buf):
    cdef uint8_t digest[32]
    kv_sha256(<const uint8_t*>buf.data, buf.length, digest)
    return PyBytes_FromStringAndSize(<const char*>digest, 32)


def vllm_none_hash(seed=VLLM_DEFAULT_SEED):
    """vLLM's NONE_HASH: sha256 of the canonical CBOR of the seed string."""
    cdef CBuf buf
    buf.data = NULL
    buf.length = 0
    buf.capacity = 0
    try:
        _put_value(&buf, seed)
        return _sha256_of(&buf)
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
            parent = _sha256_of(&buf)
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


def sha256_digest(data, bint portable=False):
    """SHA-256 of bytes with this module's C implementation (tests hold it to hashlib);
    ``portable`` runs the plain C rounds even where the CPU has SHA instructions."""
    cdef bytes raw = bytes(data)
    cdef uint8_t digest[32]
    global kv_sha256_force_portable
    kv_sha256_force_portable = 1 if portable else 0
    try:
        kv_sha256(<const uint8_t*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), digest)
    finally:
        kv_sha256_force_portable = 0
    return PyBytes_FromStringAndSize(<const char*>digest, 32)


def sha256_uses_cpu_instructions():
    """Whether SHA-256 runs on the CPU's SHA extensions here (decided on first use)."""
    cdef uint8_t digest[32]
    kv_sha256(<const uint8_t*>b"", 0, digest)
    return kv_sha256_uses_ni == 1
