# cython: language_level=3
"""The sample lines of a few metrics, out of a whole Prometheus text page, in one pass.

The pure-Python twin is ``scheduler/codec/prom.py::_sample_lines`` (one ``bytes.find``
per wanted name); both return, per wanted name, every line whose metric name is exactly
that name: at a line start after optional blanks, followed by ``{``, a blank or a tab,
the line from the name to its newline. Property tests hold the two to each other and to
prometheus_client's parser.

Why a kernel. A vLLM 0.33 page is 60 KB and 650 lines, of which kvsched reads five.
``bytes.find`` compares byte by byte on text this repetitive (every line starts with
``vllm:``): ~1.2 bytes/ns, 50 us per name over a whole page here, and every name has to
be searched to the page's end to catch a family split into two groups. This walks the
lines once instead: ``memchr`` to each newline, and a compare of the line's first bytes
with each name (most differ at the first or sixth byte), ~10 us for the page.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy


DEF MAX_NAMES = 16


def sample_lines(const unsigned char[::1] page, tuple names):
    """Per name of ``names`` (at most 16 bytes objects), the list of its sample lines in
    ``page``, in page order."""
    cdef Py_ssize_t n = page.shape[0]
    cdef Py_ssize_t count = len(names)
    if count > MAX_NAMES:
        raise ValueError(f"at most {MAX_NAMES} names, got {count}")
    cdef list out = [[] for _ in range(count)]
    if n == 0 or count == 0:
        return out
    cdef const unsigned char* starts[MAX_NAMES]
    cdef Py_ssize_t sizes[MAX_NAMES]
    # A name's first 8 bytes (fewer for a shorter name, the rest masked off) as one word: a
    # line is compared with each name in a register, and only a line that shares them goes
    # on to memcmp (on a vLLM page every line starts "vllm:", so a byte-wise compare would
    # get five bytes in before failing).
    cdef uint64_t heads[MAX_NAMES]
    cdef uint64_t masks[MAX_NAMES]
    cdef unsigned char ones[8]
    cdef uint64_t word
    cdef Py_ssize_t i, k, m
    for k in range(count):
        item = names[k]
        if not isinstance(item, bytes) or len(<bytes>item) == 0:
            raise TypeError("names must be non-empty bytes")
        starts[k] = <const unsigned char*><char*><bytes>item
        sizes[k] = len(<bytes>item)
        m = min(sizes[k], 8)
        for i in range(8):
            ones[i] = 0xFF if i < m else 0
        memcpy(&masks[k], ones, 8)
        heads[k] = 0
        memcpy(&heads[k], starts[k], m)
    cdef const unsigned char* base = &page[0]
    cdef Py_ssize_t pos = 0, start, eol, size
    cdef const unsigned char* hit
    cdef unsigned char after
    while pos < n:
        start = pos
        while start < n and (base[start] == 32 or base[start] == 9):
            start += 1
        hit = <const unsigned char*>memchr(base + start, 10, n - start)
        eol = n if hit == NULL else hit - base
        if eol - start > 1:  # a name and what follows it
            word = 0
            memcpy(&word, base + start, 8 if n - start >= 8 else n - start)
            for k in range(count):
                size = sizes[k]
                if (
                    (word & masks[k]) == heads[k]
                    and eol - start > size
                    and memcmp(base + start, starts[k], size) == 0
                ):
                    after = base[start + size]
                    if after == 123 or after == 32 or after == 9:  # '{', ' ', '\t'
                        (<list>out[k]).append(
                            PyBytes_FromStringAndSize(<const char*>(base + start), eol - start)
                        )
        pos = eol + 1
    return out
