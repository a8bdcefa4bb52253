# cython: language_level=3
"""A JSON array of token ids read straight into a uint64 buffer.

Decoding a completions body's ``prompt`` of 8,192 ids into a Python list allocates 8,192
int objects, and hashing the prompt's blocks then reads them back one object at a time;
the index hashes a uint64 buffer in place instead (``array('Q')``, what the native
transport's parser hands over too). Only the plain shape is read here: non-negative
integers without fraction, exponent or sign that fit 64 bits; anything else answers None
and the caller's general decoder decides (and phrases the error).
"""

from cpython.array cimport array, clone
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #include <stdint.h>
    /* Digits at the start of 8 bytes (first character in the lowest byte, little-endian
       load): the count of leading ASCII digits (8 when all are) and their value.
       x ^ 0x30.. maps '0'..'9' to 0..9; a byte is a digit iff that is <= 9, and adding
       0x76 sets the byte's top bit exactly when it is not (carries only reach later bytes,
       past the first non-digit). The value: the digits shifted to the top bytes (zeros
       below are leading zeros), then pairs, quads and octets combined by multiplication
       (Lemire, "Fast float parsing in practice", the 8-digit SWAR step). */
    static inline int kv_swar_digits(uint64_t word, uint64_t *value) {
        uint64_t x = word ^ 0x3030303030303030ULL;
        uint64_t nondigit = ((x + 0x7676767676767676ULL) | x) & 0x8080808080808080ULL;
        int n = nondigit ? (__builtin_ctzll(nondigit) >> 3) : 8;
        if (n == 0) { *value = 0; return 0; }
        x <<= 8 * (8 - n);
        x = (x * 10) + (x >> 8);
        x = (((x & 0x000000FF000000FFULL) * (100 + (1000000ULL << 32)))
             + (((x >> 16) & 0x000000FF000000FFULL) * (1 + (10000ULL << 32)))) >> 32;
        *value = x;
        return n;
    }
    """
    int kv_swar_digits(uint64_t word, uint64_t* value) noexcept nogil

from array import array as _array_type

cdef array _TEMPLATE = _array_type("Q")

cdef enum:
    ZERO = 0x30      # "0"
    NINE = 0x39      # "9"
    COMMA = 0x2C     # ","
    OPEN = 0x5B      # "["
    CLOSE = 0x5D     # "]"


cdef inline bint _space(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09


def json_uint_array(const unsigned char[::1] raw):
    """``raw`` (the bytes of one JSON value) as an ``array('Q')``, or None.

    None when the value is not a non-empty array of integers in [0, 2**64): strings,
    nested arrays, ``-0``, ``1.0``, ``1e3``, leading zeros, 2**64 and malformed JSON all
    answer None.
    """
    cdef Py_ssize_t n = raw.shape[0], i = 0, count = 1, k = 0
    cdef uint64_t value, digit
    cdef uint64_t tenth = ~(<uint64_t>0) // 10   # 1844674407370955161; 2**64 - 1 ends in 5
    cdef array out
    cdef uint64_t* dest
    cdef unsigned char c
    cdef uint64_t word
    cdef int digits
    while i < n and _space(raw[i]):
        i += 1
    if i == n or raw[i] != OPEN:
        return None
    # Commas bound the count (exactly, for a well-formed array of numbers).
    for k in range(i, n):
        if raw[k] == COMMA:
            count += 1
    out = clone(_TEMPLATE, count, False)
    dest = <uint64_t*>out.data.as_voidptr
    k = 0
    i += 1
    while True:
        while i < n and _space(raw[i]):
            i += 1
        if i == n:
            return None
        c = raw[i]
        if c < ZERO or c > NINE:
            return None  # "]" right away (empty) lands here too: the general decoder decides
        if c == ZERO and i + 1 < n and ZERO <= raw[i + 1] <= NINE:
            return None  # a leading zero is not JSON
        value = 0
        if i + 8 <= n:
            # Ids of up to 7 digits (every vocabulary's) in one step, no branch per digit.
            memcpy(&word, &raw[i], 8)
            digits = kv_swar_digits(word, &value)
            if digits < 8:
                i += digits
            else:
                value = 0
        while i < n and ZERO <= raw[i] <= NINE:
            digit = raw[i] - ZERO
            if value >= tenth and (value > tenth or digit > 5):
                return None
            value = value * 10 + digit
            i += 1
        if k == count:
            return None
        dest[k] = value
        k += 1
        while i < n and _space(raw[i]):
            i += 1
        if i == n:
            return None
        c = raw[i]
        i += 1
        if c == COMMA:
            continue
        if c != CLOSE:
            return None
        break
    while i < n and _space(raw[i]):
        i += 1
    if i != n or k != count:
        return None
    return out
