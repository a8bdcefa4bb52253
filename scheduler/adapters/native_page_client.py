"""Metrics pages fetched and scanned off the event loop, on the native scraper thread.

The same job as ``page_client.PageClient`` (one endpoint's page over a kept-alive
connection, ``fetch`` then exactly one report), done by ``scheduler._native.pagescrape``: a
thread with its own epoll sends the GETs, reads and frames the responses (Content-Length,
chunked, or the connection's end) and scans each page for the sample lines of the wanted
metrics with the scan ``promlines.pyx`` runs (``kernels/promscan.h``). Python sees the
lines only, in batches: one wake-up of the event loop (an eventfd turning readable) hands
over every page finished since the last, instead of a read callback per 64 KB and a bytes
copy of every page. A page whose lines are byte for byte the previous page's comes back as
"unchanged" and is not copied at all.

Where it applies: ``http://`` URLs whose host is a numeric IP address (what discovery gives:
pod IPs). Names to resolve and TLS stay on ``PageClient``, which is also what runs where
the native module is not built.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import itertools
from collections.abc import Callable
from types import ModuleType
from typing import cast

from scheduler.adapters.page_client import PageTarget


def _native_module() -> ModuleType | None:
    try:
        return importlib.import_module("scheduler._native.pagescrape")
    except ImportError:  # not built: every endpoint is scraped by PageClient
        return None


_NATIVE = _native_module()

# The thread's name (scrapeloop.h): its CPU can be told from the event loop's.
NATIVE_THREAD_NAME = "kvsched-scrape"
# Per name scanned, its sample lines; None: the same lines as the target's previous page.
ScannedLines = list[list[bytes]] | None
# (lines, marks, page bytes, current): ``current`` False for a page of a request the scraper
# gave up on (it still updates what "unchanged" refers to, and is not reported).
OnLines = Callable[[ScannedLines, int, int, bool], None]


def available() -> bool:
    return _NATIVE is not None


def serves(target: PageTarget) -> bool:
    """Whether the native thread can scrape ``target`` (plain HTTP to a numeric address)."""
    if _NATIVE is None or target.ssl is not None:
        return False
    try:
        ipaddress.ip_address(target.host)
    except ValueError:
        return False
    return True


class NativePageHub:
    """One native scraper thread and every client on it; results come back on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        names: tuple[bytes, ...],
        *,
        marks: bool,
        max_body_bytes: int,
    ) -> None:
        if _NATIVE is None:
            raise RuntimeError("scheduler._native.pagescrape is not built")
        self._loop = loop
        self._native = _NATIVE.PageScrapeLoop(names, marks=marks, max_body_bytes=max_body_bytes)
        self._clients: dict[int, NativePageClient] = {}
        self._ids = itertools.count(1)
        self._flush_pending = False
        self._closed = False
        loop.add_reader(self._native.notify_fd, self._take)

    def add(self, client: NativePageClient) -> int:
        target = next(self._ids)
        page = client.target
        self._native.add(target, page.host, page.port, page.request, f"{page.host}:{page.port}")
        self._clients[target] = client
        return target

    def fetch(self, target: int, seq: int) -> None:
        self._native.fetch(target, seq)
        if not self._flush_pending:
            # Every fetch of this turn of the loop goes out with one wake-up of the thread.
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def abort(self, target: int, seq: int) -> None:
        self._native.abort(target, seq)

    def remove(self, target: int) -> None:
        if self._clients.pop(target, None) is not None and not self._closed:
            self._native.remove(target)

    def set_max_body_bytes(self, value: int) -> None:
        self._native.set_max_body_bytes(value)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._native.notify_fd)
        self._native.close()
        self._clients.clear()

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._closed:
            self._native.flush()

    def _take(self) -> None:
        clients = self._clients
        for target, seq, ok, page_bytes, marks, payload in self._native.take():
            client = clients.get(target)
            if client is not None:
                client._finished(seq, ok, page_bytes, marks, payload)


class NativePageClient:
    """One endpoint on the native thread, with ``PageClient``'s interface: ``fetch`` sends a
    GET, then ``on_lines`` or ``on_error`` is called once."""

    def __init__(
        self,
        hub: NativePageHub,
        target: PageTarget,
        *,
        on_lines: OnLines,
        on_error: Callable[[str], None],
    ) -> None:
        self.target = target
        self.on_lines = on_lines
        self.on_error = on_error
        self._hub = hub
        self._seq = 0  # of the request in flight, 0 when none
        self._sent = 0
        self._closed = False
        self._id = hub.add(self)

    @property
    def busy(self) -> bool:
        return self._seq != 0

    def fetch(self) -> None:
        if self.busy:
            raise RuntimeError("a request is already in flight")
        if self._closed:
            raise RuntimeError("client closed")
        self._sent += 1
        self._seq = self._sent
        self._hub.fetch(self._id, self._seq)

    def abort(self, reason: str) -> None:
        """Give up on the request in flight: its connection is dropped, ``reason`` reported."""
        if not self.busy:
            return
        seq, self._seq = self._seq, 0
        self._hub.abort(self._id, seq)
        self.on_error(reason)

    def close(self) -> None:
        self._seq = 0
        if not self._closed:
            self._closed = True
            self._hub.remove(self._id)

    def _finished(self, seq: int, ok: bool, page_bytes: int, marks: int, payload: object) -> None:
        current = seq == self._seq
        if current:
            self._seq = 0
        if ok:
            self.on_lines(cast(ScannedLines, payload), marks, page_bytes, current)
        elif current:
            assert isinstance(payload, str)
            self.on_error(payload)
