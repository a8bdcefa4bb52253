# Shared by blockhash.pyx and blocktable.pyx (textual include): canonical CBOR (RFC 8949
# §4.2.1) written straight into a C buffer, for vLLM's sha256_cbor block hash. Shapes the
# fast encoder does not know go to blockhash_ref.cbor_canonical (``_cbor_canonical``,
# which the including module binds), so errors match the reference too.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport realloc
from libc.string cimport memcpy


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


