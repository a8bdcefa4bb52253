"""A keep-alive HTTP/1.1 GET client for one endpoint's metrics page, on asyncio's buffered protocol.

The scraper asks each endpoint for the same page several times a second, so what counts is
the CPU of one GET on a connection that is already open. aiohttp builds request and
response objects, a stream reader per body and a task per request; this writes a prebuilt
request and lets the socket fill one reused buffer (``recv_into``: no bytes object per
read). The page is copied once out of the buffer for the parser. A whole scrape (this GET,
the parse, the schedule) costs 0.28-0.32x the CPU of the aiohttp scraper's with the same
parser (``kvsched bench scrape``, 8 to 1,000 endpoints).

What it speaks: HTTP/1.1 and 1.0 responses framed by Content-Length, chunked transfer
coding, or the connection's end; ``Connection: close`` honoured. One request at a time per
connection (no pipelining). A request sent on a connection the server had closed while it
was idle (a keep-alive race every client meets) is sent once more on a new connection
before it is reported as failed. Anything else, including a status other than 200, a
compressed body or a page over the size limit, ends the connection and is reported once
through ``on_error`` with a sentence saying what happened; the next ``fetch`` connects
afresh. Results arrive by callback (``on_page``/``on_error``), not by future: the
scraper runs thousands of these, and a callback costs no task step per GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from enum import Enum
from urllib.parse import urlsplit

# Big enough for a vLLM page in one read; grows by doubling up to the page limit.
INITIAL_BUFFER_BYTES = 128 * 1024
_HEAD_LIMIT = 64 * 1024


class _State(Enum):
    IDLE = "idle"  # no request in flight
    HEAD = "head"  # status line and headers
    LENGTH = "length"  # body of Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    EOF = "eof"  # body until the connection closes


class PageTarget:
    """Where a page is and how to ask for it (parsed once from the URL)."""

    __slots__ = ("host", "port", "request", "ssl", "url")

    def __init__(self, url: str, *, accept: str, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rsplit("@", 1)[-1]
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: {accept}\r\n"
            "Accept-Encoding: identity\r\nUser-Agent: kvsched\r\n\r\n"
        ).encode("ascii")


class _Connection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection of a client. A client outlives its connections, and a
    closed one's last callbacks must not touch the next: each forwards only while current."""

    __slots__ = ("client", "transport")

    def __init__(self, client: PageClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client._connection is self:
            self.client._connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.client._connection is self or self.client._connection is None:
            return self.client._get_buffer()
        return memoryview(bytearray(4096))  # a replaced connection's last bytes go nowhere

    def buffer_updated(self, nbytes: int) -> None:
        if self.client._connection is self:
            self.client._buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes an EOF-framed body


class PageClient:
    """One endpoint's page over a kept-alive connection; ``fetch`` sends a GET, then
    ``on_page`` or ``on_error`` is called once."""

    def __init__(
        self,
        target: PageTarget,
        *,
        on_page: Callable[[bytes], None],
        on_error: Callable[[str], None],
        max_body_bytes: int,
    ) -> None:
        self.target = target
        self.on_page = on_page
        self.on_error = on_error
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray(min(INITIAL_BUFFER_BYTES, max_body_bytes + _HEAD_LIMIT))
        self._filled = 0  # bytes of the current response in _buffer
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._state = _State.IDLE
        self._body_start = 0
        self._body_end = 0  # LENGTH: where the body ends in _buffer
        self._chunks = bytearray()  # CHUNKED: the body so far
        self._scan = 0  # CHUNKED / HEAD: where parsing resumes in _buffer
        self._keep_alive = True
        self._reused = False  # this request went out on a connection used before
        self._retried = False
        self.connections = 0  # connections opened, for stats and tests

    # --- the scraper's side -----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._state is not _State.IDLE or self._connecting is not None

    def fetch(self) -> None:
        """Send one GET; exactly one of on_page / on_error is called once it is answered."""
        if self.busy:
            raise RuntimeError("a request is already in flight")
        self._retried = False
        self._send()

    def abort(self, reason: str) -> None:
        """Give up on the request in flight (a timeout): drop the connection, report ``reason``."""
        if not self.busy:
            return
        self._fail(reason)

    def close(self) -> None:
        """End the connection; a request in flight is dropped without a report."""
        self._state = _State.IDLE
        self._drop_connection()

    # --- sending -----------------------------------------------------------------------------

    def _send(self) -> None:
        self._filled = 0
        self._scan = 0
        self._state = _State.HEAD
        connection = self._connection
        if connection is None or connection.transport is None or connection.transport.is_closing():
            self._drop_connection()
            self._connecting = asyncio.ensure_future(self._connect())
            return
        self._reused = True
        connection.transport.write(self.target.request)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        target = self.target
        connection = _Connection(self)
        try:
            await loop.create_connection(
                lambda: connection,
                target.host,
                target.port,
                ssl=target.ssl,
                server_hostname=target.host if target.ssl is not None else None,
            )
        except asyncio.CancelledError:
            raise
        except (OSError, ssl.SSLError) as exc:
            self._connecting = None
            self._fail(f"cannot connect to {target.host}:{target.port}: {exc.strerror or exc}")
            return
        self._connecting = None
        self._connection = connection
        self.connections += 1
        self._reused = False
        self._keep_alive = True
        assert connection.transport is not None
        connection.transport.write(target.request)

    # --- connection callbacks ---------------------------------------------------------------

    def _connection_lost(self, exc: Exception | None) -> None:
        self._connection = None
        if self._state is _State.IDLE:
            return
        if self._state is _State.EOF:
            self._done(bytes(self._buffer[self._body_start : self._filled]))
            return
        if self._state is _State.HEAD and self._filled == 0 and self._reused and not self._retried:
            # The server closed the idle keep-alive connection as the request went out: the
            # request never reached it. Once more, on a new connection.
            self._retried = True
            self._send()
            return
        detail = f": {exc}" if exc else ""
        self._fail(f"connection closed before the page ended{detail}")

    def _get_buffer(self) -> memoryview:
        if len(self._buffer) - self._filled < 16 * 1024:
            # Resize here only: the view handed out for the previous read is gone by now.
            limit = self.max_body_bytes + _HEAD_LIMIT
            self._buffer.extend(bytes(min(len(self._buffer), max(limit - len(self._buffer), 16 * 1024))))
        return memoryview(self._buffer)[self._filled :]

    def _buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        state = self._state
        if state is _State.IDLE:
            self._fail("bytes from the server with no request in flight")
        elif state is _State.HEAD:
            self._read_head()
        elif state is _State.LENGTH:
            self._read_length()
        elif state is _State.CHUNKED:
            self._read_chunks()
        elif self._filled - self._body_start > self.max_body_bytes:
            self._fail(f"page exceeds {self.max_body_bytes} bytes")

    # --- response ----------------------------------------------------------------------------

    def _read_head(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", max(self._scan - 3, 0), self._filled)
        if end < 0:
            self._scan = self._filled
            if self._filled > _HEAD_LIMIT:
                self._fail(f"response head longer than {_HEAD_LIMIT} bytes")
            return
        head = bytes(buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            self._fail(f"not an HTTP/1.x response: {lines[0][:100]!r}")
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(f"malformed header line {line[:100]!r}")
                return
            headers[name.strip().lower()] = value.strip()
        self._keep_alive = status[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if status[1] != "200":
            self._fail(f"HTTP {status[1]}")
            return
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            self._fail(f"unexpected Content-Encoding {encoding!r}")
            return
        self._body_start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _State.CHUNKED
            self._chunks = bytearray()
            self._scan = self._body_start
            self._read_chunks()
            return
        length = headers.get("content-length")
        if length is None:
            self._keep_alive = False
            self._state = _State.EOF
            self._buffer_updated(0)
            return
        if not length.isdigit():
            self._fail(f"bad Content-Length {length[:40]!r}")
            return
        if int(length) > self.max_body_bytes:
            self._fail(f"page of {length} bytes exceeds {self.max_body_bytes}")
            return
        self._body_end = self._body_start + int(length)
        self._state = _State.LENGTH
        self._read_length()

    def _read_length(self) -> None:
        if self._filled < self._body_end:
            return
        if self._filled > self._body_end:
            self._fail("bytes past the end of the page")
            return
        self._done(bytes(memoryview(self._buffer)[self._body_start : self._body_end]))

    def _read_chunks(self) -> None:
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n", self._scan, self._filled)
            if line_end < 0:
                return
            size_text = bytes(buffer[self._scan : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self._fail(f"bad chunk size {size_text[:40]!r}")
                return
            if size == 0:
                # Last chunk: no trailers expected from a metrics server; the blank line ends it.
                if self._filled < line_end + 4:
                    return
                if buffer[line_end + 2 : line_end + 4] != b"\r\n":
                    self._fail("trailers after the last chunk")
                    return
                if self._filled > line_end + 4:
                    self._fail("bytes past the end of the page")
                    return
                self._done(bytes(self._chunks))
                return
            data_end = line_end + 2 + size
            if self._filled < data_end + 2:
                return
            self._chunks += buffer[line_end + 2 : data_end]
            if len(self._chunks) > self.max_body_bytes:
                self._fail(f"page exceeds {self.max_body_bytes} bytes")
                return
            self._scan = data_end + 2

    # --- endings ---------------------------------------------------------------------------

    def _done(self, page: bytes) -> None:
        self._state = _State.IDLE
        if not self._keep_alive:
            self._drop_connection()
        self.on_page(page)

    def _fail(self, reason: str) -> None:
        self._state = _State.IDLE
        self._drop_connection()
        self.on_error(reason)

    def _drop_connection(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None and connecting is not asyncio.current_task():
            connecting.cancel()
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            with contextlib.suppress(Exception):
                connection.transport.abort()
