"""Scrapes every endpoint's Prometheus page on an interval and reports to the Scheduler.

The scraper only reports: ``update_metrics`` after a good scrape, ``record_scrape_failure``
after a bad one. Whether an endpoint is healthy or its numbers are stale is the Scheduler's
call (N consecutive failures -> not picked; recovered by the next good scrape).

Cost model. A scrape is paid per endpoint and per tick, whatever the traffic, so it is the
largest part of what one replica costs at rest: with aiohttp and the str parser, ~0.8 ms of
CPU per scrape of a 62 KB vLLM page, which at 1,000 endpoints every 100 ms would be eight
cores. What a scrape of that page is made of now:

* the GET: one kept-alive connection per endpoint with a prebuilt request, the answer read
  into one reused buffer (``page_client.PageClient``);
* the parse: only the lines of the metrics kvsched reads, found by a one-pass line scan in C
  (``kernels/promlines.pyx``), 27 us with the interpretation (``codec/prom.py``);
* the schedule: no task and no timer per endpoint. One timer serves every endpoint: each
  wake-up starts the scrapes due within the next quarter of the interval and checks the
  deadlines of those in flight. Endpoints' ticks are spread over the interval by the
  golden-ratio sequence, so any number of them, added in any order, stay close to evenly
  spread.

All told 75-90 us of CPU per scrape at 64 to 1,000 endpoints, against 250-290 us for an
aiohttp scraper with the same parser in the same run (``kvsched bench scrape``).

Adaptive rate. With ``activity`` given (the Scheduler's "requests in flight there"), an
endpoint kvsched routes nothing to is scraped every ``idle_interval_s`` instead of every
``interval_s``: its figures can only move by traffic kvsched does not route, and it is
scraped at the fast rate again from its first tick after kvsched routes to it. Ticks stay
on the fast grid either way; an idle endpoint's tick only checks the clock.

Page budget. With ``max_pages_per_s``, a pool too large to scrape every endpoint every
``interval_s`` within that many pages a second is scraped every ``endpoints /
max_pages_per_s`` instead (1,000 endpoints at the default 2,000 pages/s: every 0.5 s).
A 62 KB vLLM page costs ~65 us of this process's CPU to fetch and read, so 10,000 pages a
second would be two thirds of a core; figures up to a second old cost nothing the in-flight
accounting does not cover (README, "Following 1,000 endpoints").

The default intervals and the argument for them (what a scraped figure adds to the
in-flight accounting, and how stale it may be) are in the README ("Following 1,000
endpoints").
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.adapters import native_page_client
from scheduler.adapters.native_page_client import NativePageClient, NativePageHub, ScannedLines
from scheduler.adapters.page_client import PageClient, PageTarget
from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.codec.prom import MetricsSpec, PromMetricsError, parse_endpoint_metrics, parse_sample_lines
from scheduler.core.scheduler import EndpointMetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.1
# Pages a second the scraper fetches at most, all endpoints together (None: no bound).
DEFAULT_MAX_PAGES_PER_S = 2000.0
DEFAULT_IDLE_INTERVAL_S = 1.0
DEFAULT_TIMEOUT_S = 1.0
# A scrape past its timeout keeps its connection until this many timeouts have passed.
OVERDUE_LIMIT = 5
# A vLLM page is tens of KB; anything near this is not a metrics page.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# Classic text format, uncompressed: gzip on loopback or in-cluster links spends CPU on both
# ends to save bandwidth nobody is short of.
_ACCEPT = "text/plain;version=0.0.4"
# A wake-up starts every scrape due within this fraction of the interval.
_BATCH_FRACTION = 0.25


class MetricsSink(Protocol):
    """The Scheduler methods the scraper calls."""

    def update_metrics(self, name: str, metrics: EndpointMetrics, now: float) -> None: ...

    def record_scrape_failure(
        self, name: str, error: str, now: float, *, timed_out: bool = False
    ) -> None: ...


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
    skipped_idle: int = 0  # fast ticks with no scrape: nothing routed there


@dataclass(frozen=True, slots=True)
class _ParseFailure:
    error: str
    unexpected: bool  # not a PromMetricsError: logged with its traceback


@dataclass(slots=True, eq=False)
class _Target:
    name: str
    url: str
    phase: float
    stats: ScrapeStats
    client: PageClient | NativePageClient | None = None
    # The native client's last page, interpreted: what an "unchanged" page reads as.
    last_outcome: EndpointMetrics | _ParseFailure | None = None
    started: float = 0.0  # clock() at the scrape's start
    started_loop: float = -math.inf  # loop time of the last scrape's start
    tick: int = 0  # index of the target's next tick (see MetricsScraper._next_tick)
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)
    removed: bool = False
    overdue: bool = False  # the scrape out has passed its timeout and was reported failed


class MetricsScraper:
    """Every endpoint's page on one schedule; ``add``/``remove`` follow discovery."""

    def __init__(
        self,
        sink: MetricsSink,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        idle_interval_s: float | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        spec: MetricsSpec | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        activity: Callable[[str], bool] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        native: bool | None = None,
        max_pages_per_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``native``: scrape plain-HTTP endpoints at numeric addresses on the native thread
        (``native_page_client``); None (the default) does where the module is built, False
        never does (every endpoint on ``PageClient``), True requires it."""
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("scrape interval and timeout must be positive")
        if idle_interval_s is not None and idle_interval_s <= 0:
            raise ValueError("the idle scrape interval must be positive")
        if max_pages_per_s is not None and max_pages_per_s <= 0:
            raise ValueError("the scrape page budget must be positive")
        self.sink = sink
        # ``interval_s`` is the one in force: the configured one, stretched when the pool is
        # too large for ``max_pages_per_s`` (``_rescale``).
        self.base_interval_s = interval_s
        self.max_pages_per_s = max_pages_per_s
        self.interval_s = interval_s
        self.idle_interval_s = idle_interval_s
        self.timeout_s = timeout_s
        self.spec = spec or MetricsSpec()
        self._max_body_bytes = max_body_bytes
        self.activity = activity
        self.ssl_context = ssl_context
        self.clock = clock
        if native and not native_page_client.available():
            raise RuntimeError("the native scraper (scheduler._native.pagescrape) is not built")
        self.native = native_page_client.available() if native is None else native
        self._hub: NativePageHub | None = None
        self._scanned_names = self.spec.scanned_names
        self._targets: dict[str, _Target] = {}
        self._ticks: list[tuple[float, int, _Target]] = []  # (loop time, seq, target)
        # (deadline, seq, target, which of its scrapes), a heap: the timeout, then the limit
        # after which an overdue scrape's connection is given up.
        self._deadlines: list[tuple[float, int, _Target, int]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoch = 0.0
        self._added = 0
        self._stopped = False

    # --- lifecycle -----------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._stopped:
            raise RuntimeError("scraper stopped")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._epoch = self._loop.time()
        return self._loop

    async def start(self) -> None:
        self._ensure_started()

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for target in list(self._targets.values()):
            self._drop(target)
        self._targets.clear()
        self._ticks.clear()
        self._deadlines.clear()
        if self._hub is not None:
            self._hub.close()
            self._hub = None

    async def __aenter__(self) -> MetricsScraper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def max_body_bytes(self) -> int:
        return self._max_body_bytes

    @max_body_bytes.setter
    def max_body_bytes(self, value: int) -> None:
        self._max_body_bytes = value
        for target in self._targets.values():
            if isinstance(target.client, PageClient):
                target.client.max_body_bytes = value
        if self._hub is not None:
            self._hub.set_max_body_bytes(value)

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
        """Start scraping ``url`` for endpoint ``name`` (a changed URL starts afresh)."""
        current = self._targets.get(name)
        if current is not None:
            if current.url == url:
                return
            await self.remove(name)
        loop = self._ensure_started()
        phase = (self._added * _GOLDEN) % 1.0
        self._added += 1
        target = _Target(name, url, phase, ScrapeStats())
        try:
            page = PageTarget(url, accept=_ACCEPT, ssl_context=self.ssl_context)
        except ValueError as exc:
            log.warning("scraping %s: %s; it is reported as failing", name, exc)
            page = None
            error = str(exc)
        self._targets[name] = target
        self._rescale()
        if page is None:
            target.stats.scrapes += 1
            self._failed(target, error, self.clock())
            return
        if self.native and native_page_client.serves(page):
            if self._hub is None:
                self._hub = NativePageHub(
                    loop,
                    tuple(name.encode("ascii") for name in self._scanned_names),
                    marks=self.spec.names is None and self.spec.engine == "auto",
                    max_body_bytes=self.max_body_bytes,
                )
            target.client = NativePageClient(
                self._hub,
                page,
                on_lines=lambda lines, marks, size, current: self._scanned(
                    target, lines, marks, size, current
                ),
                on_error=lambda reason: self._scrape_failed(target, reason),
            )
        else:
            target.client = PageClient(
                page,
                on_page=lambda body: self._scraped(target, body),
                on_error=lambda reason: self._scrape_failed(target, reason),
                max_body_bytes=self.max_body_bytes,
            )
        self._schedule(target, loop.time())

    async def remove(self, name: str) -> None:
        target = self._targets.pop(name, None)
        if target is not None:
            self._drop(target)
            self._rescale()

    def set_interval(self, interval_s: float) -> None:
        """A new configured interval (a reload): in force at once, within the page budget."""
        if interval_s <= 0:
            raise ValueError("scrape interval must be positive")
        self.base_interval_s = interval_s
        self._rescale()

    def _rescale(self) -> None:
        """Keep the scrape rate within the page budget as endpoints come and go."""
        wanted = self.base_interval_s
        if self.max_pages_per_s is not None:
            wanted = max(wanted, len(self._targets) / self.max_pages_per_s)
        if wanted == self.interval_s:
            return
        self.interval_s = wanted
        # Ticks are counted in intervals: on the new grid, each target's next one is the
        # first past now (queued ticks still fire once, then move to it).
        for target in self._targets.values():
            target.tick = -(1 << 62)

    async def set_targets(self, targets: Mapping[str, str]) -> None:
        """Make the scraped set exactly ``targets`` (name -> metrics URL)."""
        for name in [name for name in self._targets if name not in targets]:
            await self.remove(name)
        for name, url in targets.items():
            await self.add(name, url)

    def _drop(self, target: _Target) -> None:
        # Its heap entries and deadline stay until they come up, and are skipped then.
        target.removed = True
        if target.client is not None:
            target.client.close()
        for waiter in target.waiters:
            if not waiter.done():
                waiter.set_result(False)
        target.waiters.clear()

    # --- schedule ------------------------------------------------------------------------

    def _next_tick(self, target: _Target, now: float) -> float:
        """Ticks are at epoch + (phase + k) * interval: the next k past the target's last
        one and past ``now`` (a late wake-up skips the ticks it missed). Counted in k, not
        recomputed from a time: float rounding would give back the same tick."""
        interval = self.interval_s
        offset = self._epoch + target.phase * interval
        target.tick = max(target.tick + 1, math.floor((now - offset) / interval) + 1)
        return offset + target.tick * interval

    def _schedule(self, target: _Target, now: float) -> None:
        target.tick = -(1 << 62)
        heapq.heappush(self._ticks, (self._next_tick(target, now), next(self._seq), target))
        self._arm()

    def _arm(self) -> None:
        at = math.inf
        if self._ticks:
            at = self._ticks[0][0]
        if self._deadlines:
            at = min(at, self._deadlines[0][0])
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        if at < math.inf and self._loop is not None:
            self._timer = self._loop.call_at(at, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self._expire(now)
        horizon = now + self.interval_s * _BATCH_FRACTION
        ticks = self._ticks
        while ticks and ticks[0][0] <= horizon:
            _, _, target = heapq.heappop(ticks)
            if target.removed:
                continue
            self._tick(target, now)
            heapq.heappush(ticks, (self._next_tick(target, now), next(self._seq), target))
        self._arm()

    def _tick(self, target: _Target, now: float) -> None:
        client = target.client
        if client is None or client.busy:
            return  # the last scrape is still out: this tick is skipped
        idle = self.idle_interval_s
        # An idle endpoint is due when the idle interval has passed, to within half a fast tick.
        if (
            idle is not None
            and self.activity is not None
            and not self.activity(target.name)
            and now - target.started_loop < idle - self.interval_s * 0.5
        ):
            target.stats.skipped_idle += 1
            return
        self._start(target, now)

    def _start(self, target: _Target, now: float) -> None:
        assert target.client is not None
        target.stats.scrapes += 1
        target.started = self.clock()
        target.started_loop = now
        target.overdue = False
        heapq.heappush(self._deadlines, (now + self.timeout_s, next(self._seq), target, target.stats.scrapes))
        target.client.fetch()

    def _expire(self, now: float) -> None:
        """A scrape past its timeout is reported failed, but its connection is kept: the
        page may still come (and is used then). Only past OVERDUE_LIMIT timeouts is the
        connection given up. Aborting at the timeout turned a slow fleet into a dead one:
        1,000 endpoints each answering in ~1 s (a busy machine) were all reconnecting on
        every tick, the reconnections made every answer later still, and no scrape
        succeeded again; kept, the same fleet answered every scrape within 0.2 s."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, target, scrape = heapq.heappop(deadlines)
            client = target.client
            # Only if that scrape is the one still out: entries of scrapes that ended stay
            # in the heap until they come up, and are dropped then.
            if scrape != target.stats.scrapes or target.removed or client is None or not client.busy:
                continue
            if target.overdue:
                client.abort("timed out")
                continue
            target.overdue = True
            self._failed(target, "timed out", self.clock(), timed_out=True)
            self._finish(target, False)
            limit = now + self.timeout_s * (OVERDUE_LIMIT - 1)
            heapq.heappush(deadlines, (limit, next(self._seq), target, scrape))

    # --- results -------------------------------------------------------------------------

    async def scrape_once(self, name: str) -> bool:
        """One scrape of ``name``, reported to the sink; True when it produced metrics (a
        scrape already under way is the one waited for)."""
        target = self._targets[name]
        loop = self._ensure_started()
        waiter: asyncio.Future[bool] = loop.create_future()
        target.waiters.append(waiter)
        client = target.client
        if client is None:
            waiter.set_result(False)
        elif not client.busy:
            self._start(target, loop.time())
            self._arm()
        return await waiter

    def _scraped(self, target: _Target, page: bytes) -> None:
        target.stats.last_bytes = len(page)
        try:
            parsing = STAGE_TIMES.start()
            metrics = parse_endpoint_metrics(page, self.spec)
            STAGE_TIMES.stop("scrape_parse", parsing)
        except PromMetricsError as exc:
            self._scrape_failed(target, str(exc))
            return
        except Exception as exc:  # the schedule outlives any surprise; logged once per streak
            if target.stats.consecutive_failures == 0:
                log.exception("scraping %s (%s): unexpected error", target.name, target.url)
            self._finish(target, False)
            self._failed(target, f"{type(exc).__name__}: {exc}", self.clock(), logged=True)
            return
        self._report(target, metrics)

    def _scanned(self, target: _Target, lines: ScannedLines, marks: int, size: int, current: bool) -> None:
        """A page from the native thread, as its sample lines (None: the previous page's)."""
        if lines is None:
            outcome = target.last_outcome
        else:
            try:
                parsing = STAGE_TIMES.start()
                outcome = parse_sample_lines(lines, self._scanned_names, marks, self.spec)
                STAGE_TIMES.stop("scrape_parse", parsing)
            except PromMetricsError as exc:
                outcome = _ParseFailure(str(exc), False)
            except Exception as exc:  # the schedule outlives any surprise; logged once per streak
                if target.stats.consecutive_failures == 0:
                    log.exception("scraping %s (%s): unexpected error", target.name, target.url)
                outcome = _ParseFailure(f"{type(exc).__name__}: {exc}", True)
            target.last_outcome = outcome
        if not current or target.removed:
            return
        target.stats.last_bytes = size
        if isinstance(outcome, EndpointMetrics):
            self._report(target, outcome)
        elif outcome is None:  # an unchanged page with no previous one: the thread's error
            self._scrape_failed(target, "the native scraper lost the previous page's lines")
        else:
            self._finish(target, False)
            self._failed(target, outcome.error, self.clock(), logged=outcome.unexpected)

    def _report(self, target: _Target, metrics: EndpointMetrics) -> None:
        stats = target.stats
        now = self.clock()
        stats.last_duration_s = now - target.started
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
        self._finish(target, True)

    def _scrape_failed(self, target: _Target, reason: str) -> None:
        self._failed(target, reason, self.clock())
        self._finish(target, False)

    def _finish(self, target: _Target, ok: bool) -> None:
        if target.waiters:
            waiters, target.waiters = target.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(ok)

    def _failed(
        self, target: _Target, error: str, now: float, *, logged: bool = False, timed_out: bool = False
    ) -> None:
        stats = target.stats
        stats.last_duration_s = now - target.started
        stats.failures += 1
        stats.last_error = error
        if stats.consecutive_failures == 0 and not logged:
            # Once per failure streak; the count and last error stay visible in kvsched's metrics.
            log.warning("scraping %s (%s) failed: %s", target.name, target.url, error)
        stats.consecutive_failures += 1
        self.sink.record_scrape_failure(target.name, error, now, timed_out=timed_out)
