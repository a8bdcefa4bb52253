# cython: language_level=3
"""Every KV-event subscription's live SUB socket drained on one native thread (``kvrecvloop.h``).

``KVReceiveLoop`` owns the thread. The subscriber (``scheduler/adapters/kv_subscriber.py``)
makes, configures and closes the sockets and keeps every decision; this only moves messages:
``add`` hands a socket to the thread, ``remove`` takes it back (returning once the thread let
go of it), and ``take`` hands over every message received since the last call.
``notify_fd`` turns readable when messages wait.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset


cdef extern from "kvrecvloop.h":
    enum:
        KR_CMD_ADD
        KR_CMD_REMOVE
    ctypedef struct kr_command:
        int kind
        int64_t id
        void *socket
        int fd
        uint64_t ticket
    ctypedef struct kr_zmq_api:
        void (*version)(int *, int *, int *)
    ctypedef struct kvrecvloop:
        int notify_fd
        kr_zmq_api zmq
    int kvrecvloop_start(kvrecvloop *loop, const char *libzmq_path, size_t max_pending) nogil
    void kvrecvloop_stop(kvrecvloop *loop) nogil
    int kvrecvloop_command(kvrecvloop *loop, kr_command *c, uint64_t *ticket) nogil
    void kvrecvloop_wait(kvrecvloop *loop, uint64_t ticket) nogil
    int kvrecvloop_add_failed(kvrecvloop *loop, uint64_t ticket) nogil
    void kvrecvloop_stats(kvrecvloop *loop, uint64_t out[4]) nogil
    unsigned char *kvrecvloop_take(kvrecvloop *loop, size_t *length) nogil


cdef class KVReceiveLoop:
    """The thread and its buffer. ``libzmq_path``: the file of the libzmq pyzmq loaded (the
    sockets handed over are its); ``max_pending_bytes``: received bytes waiting for ``take``
    past which the thread stops receiving until they are taken."""

    cdef kvrecvloop loop
    cdef bint running

    def __cinit__(self, str libzmq_path, Py_ssize_t max_pending_bytes):
        cdef bytes path = libzmq_path.encode()
        cdef int rc
        self.running = False
        memset(&self.loop, 0, sizeof(self.loop))
        if max_pending_bytes <= 0:
            raise ValueError("max_pending_bytes must be positive")
        rc = kvrecvloop_start(&self.loop, path, <size_t>max_pending_bytes)
        if rc != 0:
            kvrecvloop_stop(&self.loop)
            if rc == -2:
                raise OSError(f"no loaded libzmq with zmq_msg_recv at {libzmq_path}")
            raise OSError("cannot start the native KV-event receive thread")
        self.running = True

    def __dealloc__(self):
        if self.running:
            self.running = False
            with nogil:
                kvrecvloop_stop(&self.loop)

    @property
    def notify_fd(self) -> int:
        return self.loop.notify_fd

    @property
    def zmq_version(self) -> tuple:
        """The version of the libzmq whose functions the thread calls."""
        cdef int major = 0, minor = 0, patch = 0
        self.loop.zmq.version(&major, &minor, &patch)
        return (major, minor, patch)

    def stats(self) -> dict:
        """Totals: messages received, stalls for the pending bound, receive errors, and
        messages dropped for want of memory."""
        cdef uint64_t totals[4]
        if not self.running:
            return {"messages": 0, "stalls": 0, "receive_errors": 0, "dropped_oom": 0}
        kvrecvloop_stats(&self.loop, totals)
        return {
            "messages": totals[0],
            "stalls": totals[1],
            "receive_errors": totals[2],
            "dropped_oom": totals[3],
        }

    def close(self) -> None:
        """Stop the thread; messages not taken are dropped, the sockets stay open."""
        if self.running:
            self.running = False
            with nogil:
                kvrecvloop_stop(&self.loop)

    cdef uint64_t _send(self, int kind, int64_t target, void *socket, int fd) except? 0:
        cdef kr_command c
        cdef uint64_t ticket = 0
        if not self.running:
            raise RuntimeError("native KV-event receive thread stopped")
        memset(&c, 0, sizeof(c))
        c.kind = kind
        c.id = target
        c.socket = socket
        c.fd = fd
        if kvrecvloop_command(&self.loop, &c, &ticket) != 0:
            raise MemoryError()
        return ticket

    def add(self, int64_t target, size_t socket_address, int fd) -> None:
        """Hand the libzmq socket at ``socket_address`` (pyzmq's ``Socket.underlying``), whose
        ``ZMQ_FD`` is ``fd``, to the thread as ``target``; returns once the thread watches it,
        OSError when it cannot (then the socket is still Python's). Python must not use the
        socket until ``remove(target)`` returned."""
        cdef uint64_t ticket
        if socket_address == 0:
            raise ValueError("socket address is NULL")
        ticket = self._send(KR_CMD_ADD, target, <void*>socket_address, fd)
        with nogil:
            kvrecvloop_wait(&self.loop, ticket)
        if kvrecvloop_add_failed(&self.loop, ticket):
            raise OSError(f"the KV-event receive thread cannot watch descriptor {fd}")

    def remove(self, int64_t target) -> None:
        """Take ``target``'s socket back: returns once the thread no longer uses it. Its
        messages not taken yet still come from ``take``."""
        cdef uint64_t ticket = self._send(KR_CMD_REMOVE, target, NULL, -1)
        with nogil:
            kvrecvloop_wait(&self.loop, ticket)

    def take(self) -> list:
        """Every message received since the last call, in order per socket. A message in
        vLLM's live framing (three frames, the second an 8-byte sequence number) comes as
        ``(target, seq, payload)``; any other as ``(target, None, frames)``, a list of bytes,
        for the subscriber to report."""
        cdef size_t length = 0, pos = 0
        cdef unsigned char *data
        cdef int64_t target
        cdef uint32_t count, size, k
        cdef uint32_t sizes[3]
        cdef uint64_t seq
        cdef size_t at
        cdef list out = []
        cdef list frames
        if not self.running:
            return out
        data = kvrecvloop_take(&self.loop, &length)
        if data == NULL:
            return out
        try:
            while pos + 12 <= length:
                memcpy(&target, data + pos, 8)
                memcpy(&count, data + pos + 8, 4)
                pos += 12
                if count == 3:
                    at = pos
                    for k in range(3):
                        memcpy(&sizes[k], data + at, 4)
                        at += 4 + sizes[k]
                    if sizes[1] == 8:
                        seq = 0
                        at = pos + 4 + sizes[0] + 4
                        for k in range(8):
                            seq = (seq << 8) | data[at + k]
                        at += 8 + 4
                        out.append((target, seq, PyBytes_FromStringAndSize(<char*>data + at, sizes[2])))
                        pos = at + sizes[2]
                        continue
                frames = []
                for k in range(count):
                    memcpy(&size, data + pos, 4)
                    frames.append(PyBytes_FromStringAndSize(<char*>data + pos + 4, size))
                    pos += 4 + size
                out.append((target, None, frames))
        finally:
            free(data)
        return out
