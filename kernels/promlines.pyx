# cython: language_level=3
"""The sample lines of a few metrics, out of a whole Prometheus text page, in one pass.

The scan itself is ``kernels/promscan.h`` (C), shared with the native scraper
(``kernels/pagescrape.pyx``) so that a page read here and a page read off a socket there
give the same lines. The pure-Python twin is ``scheduler/codec/prom.py::_sample_lines``;
property tests hold the two to each other and to prometheus_client's parser.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, realloc


cdef extern from "promscan.h":
    enum: PROMSCAN_MAX_NAMES
    ctypedef struct promscan_names:
        pass
    ctypedef void (*promscan_hit)(void *context, int which, const unsigned char *line, size_t size) noexcept nogil
    int promscan_prepare(promscan_names *names, const unsigned char *const *starts, const size_t *sizes, int count)
    void promscan_lines(const promscan_names *names, const unsigned char *base, size_t n, promscan_hit hit, void *context)


cdef struct _Hits:
    Py_ssize_t count
    Py_ssize_t capacity
    Py_ssize_t *items  # (which, offset, size) per line
    const unsigned char *base
    int failed


cdef void _record(void *context, int which, const unsigned char *line, size_t size) noexcept nogil:
    cdef _Hits *hits = <_Hits*>context
    cdef Py_ssize_t *grown
    if hits.failed:
        return
    if hits.count == hits.capacity:
        grown = <Py_ssize_t*>realloc(hits.items, 3 * sizeof(Py_ssize_t) * (hits.capacity * 2 + 16))
        if grown == NULL:
            hits.failed = 1
            return
        hits.items = grown
        hits.capacity = hits.capacity * 2 + 16
    hits.items[3 * hits.count] = which
    hits.items[3 * hits.count + 1] = line - hits.base
    hits.items[3 * hits.count + 2] = <Py_ssize_t>size
    hits.count += 1


def sample_lines(const unsigned char[::1] page, tuple names):
    """Per name of ``names`` (at most 16 bytes objects), the list of its sample lines in
    ``page``, in page order."""
    cdef Py_ssize_t n = page.shape[0]
    cdef Py_ssize_t count = len(names)
    if count > PROMSCAN_MAX_NAMES:
        raise ValueError(f"at most {PROMSCAN_MAX_NAMES} names, got {count}")
    cdef list out = [[] for _ in range(count)]
    if n == 0 or count == 0:
        return out
    cdef const unsigned char* starts[PROMSCAN_MAX_NAMES]
    cdef size_t sizes[PROMSCAN_MAX_NAMES]
    cdef Py_ssize_t k
    for k in range(count):
        item = names[k]
        if not isinstance(item, bytes) or len(<bytes>item) == 0:
            raise TypeError("names must be non-empty bytes")
        starts[k] = <const unsigned char*><char*><bytes>item
        sizes[k] = len(<bytes>item)
    cdef promscan_names prepared
    promscan_prepare(&prepared, starts, sizes, <int>count)
    cdef _Hits hits
    hits.count = hits.capacity = 0
    hits.items = NULL
    hits.base = &page[0]
    hits.failed = 0
    cdef Py_ssize_t i
    try:
        promscan_lines(&prepared, &page[0], <size_t>n, _record, &hits)
        if hits.failed:
            raise MemoryError()
        for i in range(hits.count):
            (<list>out[hits.items[3 * i]]).append(
                PyBytes_FromStringAndSize(<const char*>(hits.base + hits.items[3 * i + 1]), hits.items[3 * i + 2])
            )
    finally:
        free(hits.items)
    return out
