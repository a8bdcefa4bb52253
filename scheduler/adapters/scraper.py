"""Scrapes every endpoint's Prometheus page on an interval and reports to the Scheduler.

The scraper only reports: ``update_metrics`` after a good scrape, ``record_scrape_failure``
after a bad one. Whether an endpoint is healthy or its numbers are stale is the Scheduler's
call (N consecutive failures -> not picked; recovered by the next good scrape).

Cost model. One shared aiohttp session keeps a connection open per endpoint; responses are
requested uncompressed (``Accept-Encoding: identity``: gzip on loopback or in-cluster links
spends CPU on both ends to save bandwidth nobody is short of) and in the classic text format.
Each endpoint has its own task; their phases follow the golden-ratio sequence over the
interval, so any number of endpoints, added in any order, stay close to evenly spread
instead of being scraped in one burst per tick.

Default interval 100 ms. GIE's EPP refreshes every 50 ms, but kvsched also counts every
request it routes the moment it routes it (in-flight requests and uncached prefill tokens
per endpoint), so the scraped queue and cache figures are a correction, not the only load
signal; halving the rate halves the scraper's CPU on this process and the /metrics
rendering work on every model server (a vLLM API server renders its whole page per scrape).
Staleness (2 s by default, the Scheduler's setting) is still twenty intervals away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.codec.prom import MetricsSpec, PromMetricsError, parse_endpoint_metrics
from scheduler.core.scheduler import EndpointMetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.1
DEFAULT_TIMEOUT_S = 1.0
# A vLLM page is tens of KB; anything near this is not a metrics page.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_HEADERS = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}


class MetricsSink(Protocol):
    """The Scheduler methods the scraper calls."""

    def update_metrics(self, name: str, metrics: EndpointMetrics, now: float) -> None: ...

    def record_scrape_failure(self, name: str, error: str, now: float) -> None: ...


class ScrapeError(Exception):
    """A scrape that produced no usable numbers (HTTP status, size, encoding)."""


@dataclass(slots=True)
class ScrapeStats:
    scrapes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_duration_s: float = 0.0
    last_bytes: int = 0


@dataclass(slots=True)
class _Target:
    name: str
    url: str
    phase: float
    stats: ScrapeStats
    task: asyncio.Task[None] | None = None


class MetricsScraper:
    """Per-endpoint scrape loops sharing one HTTP session; ``add``/``remove`` follow discovery."""

    def __init__(
        self,
        sink: MetricsSink,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        spec: MetricsSpec | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("scrape interval and timeout must be positive")
        self.sink = sink
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.spec = spec or MetricsSpec()
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self._targets: dict[str, _Target] = {}
        self._session: aiohttp.ClientSession | None = None
        self._epoch: float | None = None
        self._added = 0
        self._stopped = False

    # --- lifecycle -----------------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._stopped:
            raise RuntimeError("scraper stopped")
        if self._session is None:
            # limit=0: one keep-alive connection per endpoint, never queued behind a global cap.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=max(30.0, 4 * self.interval_s))
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                auto_decompress=False,
                headers=_HEADERS,
            )
            self._epoch = asyncio.get_running_loop().time()
        return self._session

    async def start(self) -> None:
        self._ensure_session()

    async def stop(self) -> None:
        self._stopped = True
        tasks = [target.task for target in self._targets.values() if target.task is not None]
        self._targets.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MetricsScraper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- targets -------------------------------------------------------------------------

    @property
    def targets(self) -> dict[str, str]:
        return {name: target.url for name, target in self._targets.items()}

    def stats(self, name: str) -> ScrapeStats:
        return self._targets[name].stats

    def phases(self) -> dict[str, float]:
        """Each endpoint's scrape phase as a fraction of the interval."""
        return {name: target.phase for name, target in self._targets.items()}

    def all_stats(self) -> dict[str, ScrapeStats]:
        return {name: target.stats for name, target in self._targets.items()}

    async def add(self, name: str, url: str) -> None:
        """Start scraping ``url`` for endpoint ``name`` (a changed URL restarts its loop)."""
        current = self._targets.get(name)
        if current is not None:
            if current.url == url:
                return
            await self.remove(name)
        session = self._ensure_session()
        phase = (self._added * _GOLDEN) % 1.0
        self._added += 1
        target = _Target(name, url, phase, ScrapeStats())
        target.task = asyncio.create_task(self._loop(session, target), name=f"scrape {name}")
        self._targets[name] = target

    async def remove(self, name: str) -> None:
        target = self._targets.pop(name, None)
        if target is None or target.task is None:
            return
        target.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await target.task

    async def set_targets(self, targets: Mapping[str, str]) -> None:
        """Make the scraped set exactly ``targets`` (name -> metrics URL)."""
        for name in [name for name in self._targets if name not in targets]:
            await self.remove(name)
        for name, url in targets.items():
            await self.add(name, url)

    # --- scraping ------------------------------------------------------------------------

    async def _fetch(self, session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(url) as response:
            if response.status != 200:
                raise ScrapeError(f"HTTP {response.status}")
            length = response.content_length
            if length is not None and length > self.max_body_bytes:
                raise ScrapeError(f"page of {length} bytes exceeds {self.max_body_bytes}")
            if length is not None:
                body = await response.read()
            else:
                parts: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise ScrapeError(f"page exceeds {self.max_body_bytes} bytes")
                    parts.append(chunk)
                body = b"".join(parts)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise ScrapeError(f"unexpected Content-Encoding {encoding!r}")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScrapeError(f"page is not UTF-8: {exc}") from None

    async def scrape_once(self, name: str) -> bool:
        """One scrape of ``name``, reported to the sink; True when it produced metrics."""
        target = self._targets[name]
        return await self._scrape(self._ensure_session(), target)

    async def _scrape(self, session: aiohttp.ClientSession, target: _Target) -> bool:
        stats = target.stats
        stats.scrapes += 1
        started = self.clock()
        try:
            text = await self._fetch(session, target.url)
            stats.last_bytes = len(text)
            parsing = STAGE_TIMES.start()
            metrics = parse_endpoint_metrics(text, self.spec)
            STAGE_TIMES.stop("scrape_parse", parsing)
        except (TimeoutError, aiohttp.ClientError, ScrapeError, PromMetricsError) as exc:
            self._failed(target, _describe(exc), started)
            return False
        except Exception as exc:  # the loop outlives any surprise; it is logged once per streak
            if stats.consecutive_failures == 0:
                log.exception("scraping %s (%s): unexpected error", target.name, target.url)
            self._failed(target, _describe(exc), started, logged=True)
            return False
        now = self.clock()
        stats.last_duration_s = now - started
        if stats.consecutive_failures:
            log.info(
                "scraping %s (%s) works again after %d failures",
                target.name,
                target.url,
                stats.consecutive_failures,
            )
        stats.consecutive_failures = 0
        stats.last_error = ""
        self.sink.update_metrics(target.name, metrics, now)
        return True

    def _failed(self, target: _Target, error: str, started: float, *, logged: bool = False) -> None:
        stats = target.stats
        now = self.clock()
        stats.last_duration_s = now - started
        stats.failures += 1
        stats.last_error = error
        if stats.consecutive_failures == 0 and not logged:
            # Once per failure streak; the count and last error stay visible in kvsched's metrics.
            log.warning("scraping %s (%s) failed: %s", target.name, target.url, error)
        stats.consecutive_failures += 1
        self.sink.record_scrape_failure(target.name, error, now)

    async def _loop(self, session: aiohttp.ClientSession, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        assert self._epoch is not None
        interval = self.interval_s
        # Ticks at epoch + (phase + k) * interval; an overrun skips the ticks it missed.
        offset = self._epoch + target.phase * interval
        tick = math.floor((loop.time() - offset) / interval) + 1
        while True:
            delay = offset + tick * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._scrape(session, target)
            tick = max(tick + 1, math.floor((loop.time() - offset) / interval) + 1)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
