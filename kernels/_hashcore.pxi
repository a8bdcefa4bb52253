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

    static inline uint64_t kv_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

    /* XXH64 constants (xxHash spec, PRIME64_1..3), as in blockhash_ref. */
    #define KV_PRIME64_1 0x9E3779B185EBCA87ULL
    #define KV_PRIME64_2 0xC2B2AE3D27D4EB4FULL
    #define KV_PRIME64_3 0x165667B19E3779F9ULL
    """
    int kv_mask_u64(PyObject *o, uint64_t *out) except -1
    uint64_t kv_rotl64(uint64_t x, int r) nogil
    const uint64_t PRIME64_1 "KV_PRIME64_1"
    const uint64_t PRIME64_2 "KV_PRIME64_2"
    const uint64_t PRIME64_3 "KV_PRIME64_3"


cdef inline uint64_t _avalanche(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= PRIME64_2
    h ^= h >> 29
    h *= PRIME64_3
    h ^= h >> 32
    return h


cdef inline uint64_t _round(uint64_t lane, uint64_t token) noexcept nogil:
    return kv_rotl64(lane + token * PRIME64_2, 31) * PRIME64_1


cdef struct Lanes:
    # Four independent accumulators (XXH64's layout): token j feeds lane j % 4, so the
    # four multiply chains overlap in the pipeline instead of running one after another.
    uint64_t v0
    uint64_t v1
    uint64_t v2
    uint64_t v3


cdef inline void _lanes_start(Lanes* lanes, uint64_t parent, uint64_t salt) noexcept nogil:
    cdef uint64_t seed = _avalanche(parent ^ salt)
    lanes.v0 = seed + PRIME64_1 + PRIME64_2
    lanes.v1 = seed + PRIME64_2
    lanes.v2 = seed
    lanes.v3 = seed - PRIME64_1


cdef inline uint64_t _lanes_finish(const Lanes* lanes, Py_ssize_t n) noexcept nogil:
    cdef uint64_t acc = (kv_rotl64(lanes.v0, 1) + kv_rotl64(lanes.v1, 7)
                         + kv_rotl64(lanes.v2, 12) + kv_rotl64(lanes.v3, 18)
                         + <uint64_t>n * PRIME64_3)
    cdef uint64_t key = _avalanche(acc)
    return key if key != 0 else 1


cdef inline void _lanes_tail(Lanes* lanes, Py_ssize_t j, uint64_t token) noexcept nogil:
    cdef int lane = j & 3
    if lane == 0:
        lanes.v0 = _round(lanes.v0, token)
    elif lane == 1:
        lanes.v1 = _round(lanes.v1, token)
    elif lane == 2:
        lanes.v2 = _round(lanes.v2, token)
    else:
        lanes.v3 = _round(lanes.v3, token)


cdef inline uint64_t _block_key_u64(uint64_t parent, uint64_t salt, const uint64_t* tokens,
                                    Py_ssize_t n) noexcept nogil:
    cdef Lanes lanes
    cdef Py_ssize_t j = 0
    _lanes_start(&lanes, parent, salt)
    while j + 4 <= n:
        lanes.v0 = _round(lanes.v0, tokens[j])
        lanes.v1 = _round(lanes.v1, tokens[j + 1])
        lanes.v2 = _round(lanes.v2, tokens[j + 2])
        lanes.v3 = _round(lanes.v3, tokens[j + 3])
        j += 4
    while j < n:
        _lanes_tail(&lanes, j, tokens[j])
        j += 1
    return _lanes_finish(&lanes, n)


cdef inline int _block_key_list(list tokens, Py_ssize_t start, Py_ssize_t n, uint64_t parent,
                                uint64_t salt, uint64_t* out) except -1:
    # Conversion and mixing in one loop: the item loads run ahead of the multiply chains.
    cdef Lanes lanes
    cdef uint64_t t0, t1, t2, t3
    cdef Py_ssize_t j = 0
    _lanes_start(&lanes, parent, salt)
    while j + 4 <= n:
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j), &t0)
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j + 1), &t1)
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j + 2), &t2)
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j + 3), &t3)
        lanes.v0 = _round(lanes.v0, t0)
        lanes.v1 = _round(lanes.v1, t1)
        lanes.v2 = _round(lanes.v2, t2)
        lanes.v3 = _round(lanes.v3, t3)
        j += 4
    while j < n:
        kv_mask_u64(PyList_GET_ITEM(tokens, start + j), &t0)
        _lanes_tail(&lanes, j, t0)
        j += 1
    out[0] = _lanes_finish(&lanes, n)
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
