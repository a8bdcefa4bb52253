# Shared by blockhash.pyx and blocktable.pyx (textual include): token conversion and the
# own-key chain. The arithmetic mirrors scheduler/core/blockhash_ref.py bit for bit.

from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_FORMAT,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

cdef extern from *:
    """
    #include <stdint.h>

    /* PyLong -> uint64 with PyLong_AsUnsignedLongLongMask semantics (value mod 2**64).
       Token ids arrive as Python lists (msgpack decodes them that way), so the per-item
       conversion is the hot loop: read small exact ints straight from their digits and
       leave everything else (subclasses, huge ints, __index__ objects) to the C API. */
    static inline int kv_mask_u64(PyObject *o, uint64_t *out) {
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            *out = (uint64_t)(int64_t)PyUnstable_Long_CompactValue((PyLongObject *)o);
            return 0;
        }
    #else
        if (PyLong_CheckExact(o)) {
            const digit *d = ((PyLongObject *)o)->ob_digit;
            switch (Py_SIZE(o)) {
                case 0: *out = 0; return 0;
                case 1: *out = (uint64_t)d[0]; return 0;
                case -1: *out = (uint64_t)0 - (uint64_t)d[0]; return 0;
                case 2: *out = (uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT); return 0;
                case -2: *out = (uint64_t)0 - ((uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT)); return 0;
                case 3:
                    *out = (uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT)
                           | ((uint64_t)d[2] << (2 * PyLong_SHIFT));
                    return 0;
                default: break;
            }
        }
    #endif
        {
            unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
            if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
            *out = (uint64_t)v;
            return 0;
        }
    }

    /* The common token: an exact int of one 30-bit digit (3.11) or compact (3.12+), read
       inline with no error path. Hashing a token list is bound by reading its ints:
       this takes a block of 16 from 20 to 17 ns (measured on this machine's Zen 2). */
    static inline int kv_small_int(PyObject *o, uint64_t *out) {
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyLong_CheckExact(o) && PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            *out = (uint64_t)(int64_t)PyUnstable_Long_CompactValue((PyLongObject *)o);
            return 1;
        }
    #else
        if (PyLong_CheckExact(o) && Py_SIZE(o) == 1) {
            *out = (uint64_t)((PyLongObject *)o)->ob_digit[0];
            return 1;
        }
    #endif
        return 0;
    }

    /* 64x64 -> 128-bit product, folded: low half xor high half (xxHash's XXH3
       mul128_fold64). One multiply mixes two token words. */
    static inline uint64_t kv_mum(uint64_t a, uint64_t b) {
    #if defined(__SIZEOF_INT128__)
        __uint128_t p = (__uint128_t)a * b;
        return (uint64_t)p ^ (uint64_t)(p >> 64);
    #else
        uint64_t al = a & 0xFFFFFFFFu, ah = a >> 32, bl = b & 0xFFFFFFFFu, bh = b >> 32;
        uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
        uint64_t mid = (ll >> 32) + (lh & 0xFFFFFFFFu) + (hl & 0xFFFFFFFFu);
        uint64_t lo = (mid << 32) | (ll & 0xFFFFFFFFu);
        uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
        return lo ^ hi;
    #endif
    }

    /* XXH64 constants (xxHash spec, PRIME64_1..5), as in blockhash_ref. */
    #define KV_PRIME64_1 0x9E3779B185EBCA87ULL
    #define KV_PRIME64_2 0xC2B2AE3D27D4EB4FULL
    #define KV_PRIME64_3 0x165667B19E3779F9ULL
    #define KV_PRIME64_4 0x85EBCA77C2B2AE63ULL
    #define KV_PRIME64_5 0x27D4EB2F165667C5ULL
    """
    int kv_mask_u64(PyObject *o, uint64_t *out) except -1
    int kv_small_int(PyObject *o, uint64_t *out) nogil
    uint64_t kv_mum(uint64_t a, uint64_t b) nogil
    const uint64_t PRIME64_1 "KV_PRIME64_1"
    const uint64_t PRIME64_2 "KV_PRIME64_2"
    const uint64_t PRIME64_3 "KV_PRIME64_3"
    const uint64_t PRIME64_4 "KV_PRIME64_4"
    const uint64_t PRIME64_5 "KV_PRIME64_5"


cdef inline uint64_t _avalanche(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= PRIME64_2
    h ^= h >> 29
    h *= PRIME64_3
    h ^= h >> 32
    return h


cdef inline uint64_t _own_root(uint64_t seed, bint has_lora, uint64_t lora_id) noexcept nogil:
    """blockhash_ref.own_root_key: the chain root of one (seed, LoRA adapter) namespace."""
    cdef uint64_t lora = lora_id + 1 if has_lora else 0
    cdef uint64_t key = _avalanche(seed * PRIME64_1 ^ lora * PRIME64_2)
    return key if key != 0 else 1


cdef inline uint64_t _chain(uint64_t parent, uint64_t digest) noexcept nogil:
    cdef uint64_t key = _avalanche(parent * PRIME64_1 ^ digest)
    return key if key != 0 else 1


# A block's digest (blockhash_ref.own_block_digest): token pair k is mixed as
# mum(t[2k] ^ (PRIME64_1 + k*PRIME64_4 + salt), t[2k+1] ^ (PRIME64_2 + k*PRIME64_5 - salt)),
# the products are summed onto len * PRIME64_3 and the sum avalanched. The products are
# independent, so a block is one multiply per two tokens with no chain between them:
# what limits hashing a token list is reading the Python ints, not mixing them.

cdef inline uint64_t _digest_u64(uint64_t salt, const uint64_t* tokens, Py_ssize_t n) noexcept nogil:
    cdef uint64_t acc0 = <uint64_t>n * PRIME64_3, acc1 = 0
    cdef uint64_t m0 = PRIME64_1 + salt, m1 = PRIME64_2 - salt
    cdef Py_ssize_t j = 0
    while j + 4 <= n:
        acc0 += kv_mum(tokens[j] ^ m0, tokens[j + 1] ^ m1)
        acc1 += kv_mum(tokens[j + 2] ^ (m0 + PRIME64_4), tokens[j + 3] ^ (m1 + PRIME64_5))
        m0 += 2 * PRIME64_4
        m1 += 2 * PRIME64_5
        j += 4
    if j + 2 <= n:
        acc0 += kv_mum(tokens[j] ^ m0, tokens[j + 1] ^ m1)
        m0 += PRIME64_4
        m1 += PRIME64_5
        j += 2
    if j < n:
        acc1 += kv_mum(tokens[j] ^ m0, m1)
    return _avalanche(acc0 + acc1)


cdef inline int _digest_list(list tokens, Py_ssize_t start, Py_ssize_t n, uint64_t salt,
                             uint64_t* out) except -1:
    # Conversion and mixing in one loop: the item loads run ahead of the multiplies.
    cdef uint64_t acc0 = <uint64_t>n * PRIME64_3, acc1 = 0
    cdef uint64_t m0 = PRIME64_1 + salt, m1 = PRIME64_2 - salt
    cdef uint64_t t0, t1, t2, t3
    cdef Py_ssize_t j = 0
    cdef PyObject* o0
    cdef PyObject* o1
    cdef PyObject* o2
    cdef PyObject* o3
    while j + 4 <= n:
        o0 = PyList_GET_ITEM(tokens, start + j)
        o1 = PyList_GET_ITEM(tokens, start + j + 1)
        o2 = PyList_GET_ITEM(tokens, start + j + 2)
        o3 = PyList_GET_ITEM(tokens, start + j + 3)
        if not (kv_small_int(o0, &t0) & kv_small_int(o1, &t1) & kv_small_int(o2, &t2)
                & kv_small_int(o3, &t3)):
            kv_mask_u64(o0, &t0)
            kv_mask_u64(o1, &t1)
            kv_mask_u64(o2, &t2)
            kv_mask_u64(o3, &t3)
        acc0 += kv_mum(t0 ^ m0, t1 ^ m1)
        acc1 += kv_mum(t2 ^ (m0 + PRIME64_4), t3 ^ (m1 + PRIME64_5))
        m0 += 2 * PRIME64_4
        m1 += 2 * PRIME64_5
        j += 4
    if j + 2 <= n:
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j), &t0)
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j + 1), &t1)
        acc0 += kv_mum(t0 ^ m0, t1 ^ m1)
        m0 += PRIME64_4
        m1 += PRIME64_5
        j += 2
    if j < n:
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j), &t0)
        acc1 += kv_mum(t0 ^ m0, m1)
    out[0] = _avalanche(acc0 + acc1)
    return 0


cdef int _chain_keys(object tokens, const uint64_t* data, Py_ssize_t first, Py_ssize_t count,
                     Py_ssize_t bs, uint64_t parent, const uint64_t* salts, Py_ssize_t nsalts,
                     uint64_t* out) except -1:
    """Keys of blocks [first, first + count) into out[0:count], chained from parent.

    Tokens come from ``tokens`` when it is a list, else from ``data`` (uint64s). The
    digests go first (independent of each other), then the serial chain over them.
    """
    cdef Py_ssize_t i, b
    cdef uint64_t salt
    cdef bint is_list = type(tokens) is list
    for i in range(count):
        b = first + i
        salt = salts[b] if b < nsalts else 0
        if is_list:
            _digest_list(<list>tokens, b * bs, bs, salt, &out[i])
        else:
            out[i] = _digest_u64(salt, data + b * bs, bs)
    for i in range(count):
        parent = _chain(parent, out[i])
        out[i] = parent
    return 0


cdef int _salts_array(object salts, Py_ssize_t* nsalts, uint64_t** out) except -1:
    """Per-block salts as a malloc'd uint64 array (NULL and 0 when there are none)."""
    cdef Py_ssize_t i, n = 0 if salts is None else len(salts)
    nsalts[0] = 0
    out[0] = NULL
    if n == 0:
        return 0
    out[0] = <uint64_t*>malloc(n * sizeof(uint64_t))
    if out[0] == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            out[0][i] = _mask_obj(salts[i])
    except BaseException:
        free(out[0])
        out[0] = NULL
        raise
    nsalts[0] = n
    return 0


cdef inline uint64_t _mask_obj(object value) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t out = 0
    kv_mask_u64(<PyObject*>value, &out)
    return out


# --- integer sequences as C arrays -------------------------------------------------------

cdef struct U64View:
    const uint64_t* data     # the values, as uint64 (signed sources sign-extended)
    Py_ssize_t n
    uint64_t* owned          # malloc'd copy when the source needed conversion
    bint is_signed           # source type was signed (only matters for exact CBOR ints)
    bint has_buffer
    Py_buffer buffer


cdef inline bint _format_is(const char* fmt, char* code) noexcept:
    # Native-order integer formats only: '@'-prefixed or bare codes (struct module syntax).
    if fmt == NULL:
        code[0] = b'B'
        return True
    if fmt[0] == b'@':
        fmt += 1
    if fmt[0] == 0 or fmt[1] != 0:
        return False
    if fmt[0] in b'bBhHiIlLqQnN':
        code[0] = fmt[0]
        return True
    return False


cdef int _view_open(object source, Py_ssize_t limit, U64View* view) except -1:
    """Expose the first min(len, limit) items of an integer buffer or sequence as uint64s.

    Lists and tuples are converted item by item with mask semantics; C-contiguous native
    integer buffers of 8-byte items are read in place; other buffers are widened; anything
    else goes through list().
    """
    cdef Py_ssize_t i, n
    cdef char code = 0
    cdef const char* raw
    cdef list items
    view.data = NULL
    view.n = 0
    view.owned = NULL
    view.is_signed = False
    view.has_buffer = False
    if type(source) is not list and type(source) is not tuple and PyObject_CheckBuffer(source):
        try:
            PyObject_GetBuffer(source, &view.buffer, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
            view.has_buffer = True
        except (BufferError, ValueError):
            pass  # not C-contiguous (numpy raises ValueError): read it item by item below
        if view.has_buffer:
            if view.buffer.itemsize in (1, 2, 4, 8) and _format_is(view.buffer.format, &code):
                n = view.buffer.len // view.buffer.itemsize
                if limit >= 0 and n > limit:
                    n = limit
                view.n = n
                view.is_signed = code in b'bhilqn'
                raw = <const char*>view.buffer.buf
                if view.buffer.itemsize == 8:
                    view.data = <const uint64_t*>raw
                    return 0
                view.owned = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
                if view.owned == NULL:
                    raise MemoryError()
                _widen(raw, view.buffer.itemsize, view.is_signed, n, view.owned)
                view.data = view.owned
                return 0
            PyBuffer_Release(&view.buffer)
            view.has_buffer = False
    if type(source) is list:
        items = <list>source
    else:
        items = list(source)
    n = PyList_GET_SIZE(items)
    if limit >= 0 and n > limit:
        n = limit
    view.owned = <uint64_t*>malloc(max(n, 1) * sizeof(uint64_t))
    if view.owned == NULL:
        raise MemoryError()
    view.data = view.owned
    view.n = n
    for i in range(n):
        kv_mask_u64(PyList_GET_ITEM(items, i), &view.owned[i])
    return 0


cdef void _widen(const char* raw, Py_ssize_t itemsize, bint is_signed, Py_ssize_t n,
                 uint64_t* out) noexcept nogil:
    cdef Py_ssize_t i
    if itemsize == 4:
        if is_signed:
            for i in range(n):
                out[i] = <uint64_t><int64_t>(<const int32_t*>raw)[i]
        else:
            for i in range(n):
                out[i] = (<const uint32_t*>raw)[i]
    elif itemsize == 2:
        if is_signed:
            for i in range(n):
                out[i] = <uint64_t><int64_t>(<const int16_t*>raw)[i]
        else:
            for i in range(n):
                out[i] = (<const uint16_t*>raw)[i]
    else:
        if is_signed:
            for i in range(n):
                out[i] = <uint64_t><int64_t>(<const int8_t*>raw)[i]
        else:
            for i in range(n):
                out[i] = (<const uint8_t*>raw)[i]


cdef inline void _view_close(U64View* view) noexcept:
    if view.owned != NULL:
        free(view.owned)
        view.owned = NULL
    if view.has_buffer:
        PyBuffer_Release(&view.buffer)
        view.has_buffer = False
