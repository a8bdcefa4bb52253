# cython: language_level=3
"""Many endpoints' metrics pages fetched and scanned on a native thread (``scrapeloop.h``).

``PageScrapeLoop`` owns the thread. The scraper (``scheduler/adapters/scraper.py``) keeps
the schedule, the timeouts and the reports; this only moves pages: ``fetch`` queues a GET
(sent at the next ``flush``), and ``take`` hands back every scrape finished since the last
call, each as the page's sample lines of the wanted names (the scan of ``promlines.pyx``),
ready for ``codec/prom.py`` to interpret. ``notify_fd`` turns readable when results wait.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strdup


cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    struct sockaddr_storage:
        unsigned short ss_family


cdef extern from "<netinet/in.h>":
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    int AF_INET
    int AF_INET6
    unsigned short htons(unsigned short)


cdef extern from "<arpa/inet.h>":
    int inet_pton(int af, const char *src, void *dst)


cdef extern from "scrapeloop.h":
    enum: PROMSCAN_MAX_NAMES
    enum:
        SL_OK
        SL_ERROR
        SL_CMD_ADD
        SL_CMD_FETCH
        SL_CMD_ABORT
        SL_CMD_REMOVE
        SL_CMD_MAX_BODY
    ctypedef struct sl_command:
        int kind
        int64_t id
        uint64_t seq
        size_t size
        sockaddr_storage addr
        socklen_t addrlen
        char *request
        size_t request_len
        char *where
    ctypedef struct sl_result:
        int64_t id
        uint64_t seq
        int status
        int marks
        int unchanged
        size_t page_bytes
        char *data
        size_t size
    ctypedef struct scrapeloop:
        int notify_fd
    int scrapeloop_start(scrapeloop *loop, const unsigned char *const *names, const size_t *sizes,
                         int count, int want_marks, size_t max_body) nogil
    void scrapeloop_stop(scrapeloop *loop) nogil
    int scrapeloop_command(scrapeloop *loop, sl_command *c, int wake) nogil
    void scrapeloop_wake(scrapeloop *loop) nogil
    sl_result *scrapeloop_take(scrapeloop *loop, size_t *count) nogil


OK = SL_OK
ERROR = SL_ERROR


cdef class PageScrapeLoop:
    """The thread, its sockets and its queues. ``names``: the metric names whose sample
    lines each page is scanned for (at most 16); ``marks``: also say whether the page holds
    ``vllm:`` or else ``sglang:`` (``MetricsSpec(engine="auto")``)."""

    cdef scrapeloop loop
    cdef bint running
    cdef readonly int name_count
    cdef int pending  # fetches queued since the last flush

    def __cinit__(self, tuple names, *, bint marks, Py_ssize_t max_body_bytes):
        cdef const unsigned char *starts[PROMSCAN_MAX_NAMES]
        cdef size_t sizes[PROMSCAN_MAX_NAMES]
        self.running = False
        memset(&self.loop, 0, sizeof(self.loop))
        if len(names) > PROMSCAN_MAX_NAMES:
            raise ValueError(f"at most {PROMSCAN_MAX_NAMES} names, got {len(names)}")
        for k, name in enumerate(names):
            if not isinstance(name, bytes) or len(<bytes>name) == 0:
                raise TypeError("names must be non-empty bytes")
            starts[k] = <const unsigned char*><char*><bytes>name
            sizes[k] = len(<bytes>name)
        self.name_count = len(names)
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        # The names are copied by scrapeloop_start, so the tuple need not outlive this call.
        if scrapeloop_start(&self.loop, starts, sizes, self.name_count, marks, <size_t>max_body_bytes) != 0:
            scrapeloop_stop(&self.loop)
            raise OSError("cannot start the native scraper thread")
        self.running = True

    def __dealloc__(self):
        if self.running:
            with nogil:
                scrapeloop_stop(&self.loop)
            self.running = False

    @property
    def notify_fd(self) -> int:
        return self.loop.notify_fd

    def close(self) -> None:
        """Stop the thread; every connection is closed and queued results dropped."""
        if self.running:
            self.running = False
            with nogil:
                scrapeloop_stop(&self.loop)

    cdef void _send(self, sl_command *c, bint wake) except *:
        if not self.running:
            free(c.request)
            free(c.where)
            raise RuntimeError("native scraper stopped")
        if scrapeloop_command(&self.loop, c, wake) != 0:
            free(c.request)
            free(c.where)
            raise MemoryError()

    cdef void _command(self, int kind, int64_t target, uint64_t seq, bint wake) except *:
        cdef sl_command c
        memset(&c, 0, sizeof(c))
        c.kind = kind
        c.id = target
        c.seq = seq
        self._send(&c, wake)

    def add(self, int64_t target, str host, int port, bytes request, str where) -> None:
        """Scrape ``host`` (a numeric IPv4 or IPv6 address) at ``port`` with ``request``
        (the whole GET, bytes) as target number ``target``."""
        cdef sl_command c
        memset(&c, 0, sizeof(c))
        cdef bytes host_b = host.encode("ascii")
        cdef sockaddr_in *v4 = <sockaddr_in*>&c.addr
        cdef sockaddr_in6 *v6 = <sockaddr_in6*>&c.addr
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if inet_pton(AF_INET, host_b, &v4.sin_addr) == 1:
            v4.sin_family = AF_INET
            v4.sin_port = htons(port)
            c.addrlen = sizeof(sockaddr_in)
        elif inet_pton(AF_INET6, host_b, &v6.sin6_addr) == 1:
            v6.sin6_family = AF_INET6
            v6.sin6_port = htons(port)
            c.addrlen = sizeof(sockaddr_in6)
        else:
            raise ValueError(f"not a numeric IP address: {host!r}")
        c.kind = SL_CMD_ADD
        c.id = target
        c.request_len = len(request)
        c.request = <char*>malloc(c.request_len + 1)
        if c.request == NULL:
            raise MemoryError()
        memcpy(c.request, <char*>request, c.request_len)
        where_b = where.encode("utf-8")
        c.where = strdup(<char*>where_b)
        if c.where == NULL:
            free(c.request)
            raise MemoryError()
        self._send(&c, True)

    def fetch(self, int64_t target, uint64_t seq) -> None:
        """Queue one GET of ``target`` as request ``seq``; sent at the next ``flush``."""
        self._command(SL_CMD_FETCH, target, seq, False)
        self.pending += 1

    def flush(self) -> None:
        """Wake the thread for the fetches queued since the last flush (one write for all)."""
        if self.pending and self.running:
            self.pending = 0
            scrapeloop_wake(&self.loop)

    def abort(self, int64_t target, uint64_t seq) -> None:
        """Drop request ``seq`` of ``target`` and its connection; no result comes for it."""
        self._command(SL_CMD_ABORT, target, seq, True)

    def remove(self, int64_t target) -> None:
        self._command(SL_CMD_REMOVE, target, 0, True)

    def set_max_body_bytes(self, Py_ssize_t value) -> None:
        cdef sl_command c
        if value <= 0:
            raise ValueError("max_body_bytes must be positive")
        memset(&c, 0, sizeof(c))
        c.kind = SL_CMD_MAX_BODY
        c.size = <size_t>value
        self._send(&c, True)

    def take(self) -> list:
        """Every scrape finished since the last call, as tuples ``(target, seq, ok, page
        bytes, marks, lines)``: ``lines`` per name a list of its sample lines, or None when
        they are the same as that target's previous page's; for a failed scrape ``ok`` is
        False and ``lines`` the reason (str)."""
        cdef size_t count = 0, i
        cdef sl_result *results
        cdef sl_result *r
        cdef list out = []
        cdef list groups
        cdef size_t pos
        cdef uint32_t size
        cdef unsigned char which
        if not self.running:
            return out
        results = scrapeloop_take(&self.loop, &count)
        try:
            for i in range(count):
                r = &results[i]
                if r.status != SL_OK:
                    out.append((r.id, r.seq, False, 0, 0, r.data[:r.size].decode("utf-8", "replace")))
                    continue
                if r.unchanged:
                    out.append((r.id, r.seq, True, r.page_bytes, r.marks, None))
                    continue
                groups = [[] for _ in range(self.name_count)]
                pos = 0
                while pos + 5 <= r.size:
                    which = <unsigned char>r.data[pos]
                    memcpy(&size, r.data + pos + 1, 4)
                    (<list>groups[which]).append(PyBytes_FromStringAndSize(r.data + pos + 5, size))
                    pos += 5 + size
                out.append((r.id, r.seq, True, r.page_bytes, r.marks, groups))
        finally:
            for i in range(count):
                free(results[i].data)
            free(results)
        return out
