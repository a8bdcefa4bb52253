"""The native scraper thread (kernels/pagescrape.pyx, scrapeloop.h) against real sockets.

A raw asyncio server on 127.0.0.1 writes the exact bytes each test gives (a whole page with
Content-Length, the same page chunked, or a broken answer); the thread fetches them over
TCP like any endpoint. What it hands back must be what ``promlines.sample_lines`` finds in
the same page (the scan is one C function for both; this holds the framing and the hand-over
to it) and what ``MetricsSpec.resolve`` decides about the engine.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.adapters.native_page_client import NativePageClient, NativePageHub, ScannedLines
from scheduler.adapters.page_client import PageTarget
from scheduler.adapters.scraper import MetricsScraper
from scheduler.codec.prom import (
    MARK_SGLANG,
    MARK_VLLM,
    MetricsSpec,
    PromMetricsError,
    _sample_lines_twin,
    parse_endpoint_metrics,
)
from scheduler.core.scheduler import Endpoint, Scheduler
from scheduler.sim.vllm_metrics import busy_page
from tests.test_scraper import RawServer

promlines = pytest.importorskip("scheduler._native.promlines")
pytest.importorskip("scheduler._native.pagescrape")

SCANNED = MetricsSpec().scanned_names
NAMES = tuple(name.encode() for name in SCANNED)


def content_length(page: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page)


def chunked(page: bytes, size: int = 1000) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for start in range(0, len(page), size):
        piece = page[start : start + size]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., RawServer]]:
    started: list[asyncio.Server] = []

    async def start(responses: list[bytes], close_after: bool = False) -> RawServer:
        raw = RawServer(responses, close_after)
        started.append(await raw.start())
        return raw

    yield start  # type: ignore[misc]
    for listener in started:
        listener.close()


@dataclass
class Outcome:
    lines: ScannedLines = None
    marks: int = 0
    size: int = 0
    error: str | None = None


class Fetcher:
    """A hub with one client per server, and a way to wait for each answer."""

    def __init__(self, *, marks: bool = True, max_body_bytes: int = 8 << 20) -> None:
        self.hub = NativePageHub(
            asyncio.get_running_loop(), NAMES, marks=marks, max_body_bytes=max_body_bytes
        )

    def client(self, raw: RawServer) -> tuple[NativePageClient, list[Outcome]]:
        outcomes: list[Outcome] = []
        target = PageTarget(raw.url, accept="text/plain")
        client = NativePageClient(
            self.hub,
            target,
            on_lines=lambda lines, marks, size, current: (
                outcomes.append(Outcome(lines, marks, size)) if current else None
            ),
            on_error=lambda reason: outcomes.append(Outcome(error=reason)),
        )
        return client, outcomes

    async def fetch(self, client: NativePageClient, outcomes: list[Outcome]) -> Outcome:
        count = len(outcomes)
        client.fetch()
        deadline = time.monotonic() + 10.0
        while len(outcomes) == count:
            assert time.monotonic() < deadline, "no answer from the native scraper"
            await asyncio.sleep(0.002)
        return outcomes[-1]


def expected_marks(page: bytes) -> int:
    if b"vllm:" in page:
        return MARK_VLLM
    return MARK_SGLANG if b"sglang:" in page else 0


def garbage_pages(count: int) -> list[bytes]:
    """Pages of pieces that sit on the scan's edges: names, prefixes of names, blanks, braces,
    line ends, comments."""
    rng = random.Random(7)
    pieces = [
        *NAMES,
        b"vllm:num_requests",
        b"sglang:",
        b"{",
        b"}",
        b" ",
        b"\t",
        b"\n",
        b"\r\n",
        b"#",
        b"1.5",
        b'model_name="m"',
        b"\x00\xff",
    ]
    return [b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60))) for _ in range(count)]


LABEL_VARIANTS = b"".join(
    line + b"\n"
    for line in (
        b'vllm:num_requests_waiting { model_name = "m" } 5',
        b'vllm:num_requests_waiting{model_name="m",} 5',
        b'vllm:num_requests_waiting{model_name="m"}5',
        b"vllm:num_requests_waiting\t5",
        b"  vllm:num_requests_running  5  1712345678000",
        b'vllm:kv_cache_usage_perc{engine="1"} 0.5\r',
        b'vllm:kv_cache_usage_percent{engine="1"} 0.9',
        b'# HELP vllm:kv_cache_usage_perc{engine="1"} 0.9',
        b"sglang:token_usage 0.25",
    )
)


async def test_the_thread_finds_the_lines_promlines_finds(server: Callable[..., RawServer]) -> None:
    realistic = busy_page()
    pages = [
        realistic,
        realistic.replace(b"vllm:num_requests_waiting", b"vllm:num_requests_queued"),  # one missing
        b"# nothing kvsched reads\nprocess_cpu_seconds_total 1.0\n",
        b"",
        LABEL_VARIANTS,
        b"sglang:num_queue_reqs 3\nsglang:num_running_reqs 4\nsglang:token_usage 0.5",
        *garbage_pages(60),
    ]
    # Every page twice: framed by Content-Length and chunked (in pieces that split lines).
    responses = [framing(page) for page in pages for framing in (content_length, chunked)]
    raw = await server(responses)  # type: ignore[misc]
    fetcher = Fetcher()
    client, outcomes = fetcher.client(raw)
    try:
        previous: list[list[bytes]] | None = None
        for page in pages:
            expected = promlines.sample_lines(page, NAMES)
            for _ in range(2):
                outcome = await fetcher.fetch(client, outcomes)
                assert outcome.error is None, outcome.error
                assert outcome.size == len(page)
                assert outcome.marks == expected_marks(page)
                if outcome.lines is None:  # the same lines as the page before: said, not sent
                    assert previous == expected
                else:
                    assert outcome.lines == expected
                previous = expected
        assert raw.connections == 1  # one kept-alive connection for all of them
    finally:
        fetcher.hub.close()


async def test_an_unchanged_page_is_not_handed_over_again(server: Callable[..., RawServer]) -> None:
    page = busy_page()
    other = page.replace(b"vllm:num_requests_waiting{", b'vllm:num_requests_waiting{x="1",', 1)
    raw = await server([content_length(page), content_length(page), content_length(other)])  # type: ignore[misc]
    fetcher = Fetcher()
    client, outcomes = fetcher.client(raw)
    try:
        first = await fetcher.fetch(client, outcomes)
        second = await fetcher.fetch(client, outcomes)
        third = await fetcher.fetch(client, outcomes)
        assert first.lines == promlines.sample_lines(page, NAMES)
        assert second.lines is None
        assert third.lines == promlines.sample_lines(other, NAMES)
    finally:
        fetcher.hub.close()


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy", "HTTP 503"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "connection closed before the page ended"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc", "connection closed before"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc", "bytes past the end of the page"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
            "unexpected Content-Encoding 'gzip'",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nBroken header\r\n\r\n", "malformed header line 'Broken header'"),
    ],
)
async def test_a_broken_answer_is_an_error_and_the_connection_is_made_again(
    server: Callable[..., RawServer], response: bytes, error: str
) -> None:
    page = b"vllm:num_requests_waiting 1\n"
    # A short page is followed by the server closing: that is what makes it short.
    short = b"short" in response or (response.endswith(b"abc") and b"chunked" in response)
    raw = await server([response, content_length(page)], close_after=short)  # type: ignore[misc]
    fetcher = Fetcher()
    client, outcomes = fetcher.client(raw)
    try:
        failed = await fetcher.fetch(client, outcomes)
        assert failed.error is not None and error in failed.error
        good = await fetcher.fetch(client, outcomes)
        assert good.error is None and good.lines == promlines.sample_lines(page, NAMES)
        assert raw.connections == 2
    finally:
        fetcher.hub.close()


async def test_an_aborted_request_gives_no_answer_and_the_next_one_reconnects(
    server: Callable[..., RawServer],
) -> None:
    page = b"vllm:num_requests_waiting 1\n"
    raw = await server([b"", content_length(page)])  # type: ignore[misc]  # the first GET hangs
    fetcher = Fetcher()
    client, outcomes = fetcher.client(raw)
    try:
        client.fetch()
        deadline = time.monotonic() + 10.0
        while raw.requests == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.002)
        client.abort("timed out")
        assert [outcome.error for outcome in outcomes] == ["timed out"]
        assert not client.busy
        good = await fetcher.fetch(client, outcomes)
        assert good.lines == promlines.sample_lines(page, NAMES)
        assert raw.connections == 2
        assert len(outcomes) == 2
    finally:
        fetcher.hub.close()


async def test_a_page_over_the_limit_is_an_error(server: Callable[..., RawServer]) -> None:
    page = b"vllm:num_requests_waiting 1\n" + b"# padding\n" * 500
    raw = await server([content_length(page), chunked(page)])  # type: ignore[misc]
    fetcher = Fetcher(max_body_bytes=2048)
    client, outcomes = fetcher.client(raw)
    try:
        assert "exceeds 2048" in str((await fetcher.fetch(client, outcomes)).error)
        assert "exceeds 2048" in str((await fetcher.fetch(client, outcomes)).error)
    finally:
        fetcher.hub.close()


@pytest.mark.parametrize("engine", ["auto", "vllm"])
async def test_the_scraper_reads_the_same_figures_natively_and_in_python(
    server: Callable[..., RawServer], engine: str
) -> None:
    page = busy_page()
    raw = await server([content_length(page)])  # type: ignore[misc]
    spec = MetricsSpec(engine=engine)  # type: ignore[arg-type]
    expected = parse_endpoint_metrics(page, spec)
    for native in (True, False):
        scheduler = Scheduler()
        scheduler.set_endpoints([Endpoint(name="a", address="a")], time.monotonic())
        seen: list[object] = []
        original = scheduler.update_metrics

        def record(
            name: str, metrics: object, now: float, original: object = original, seen: list[object] = seen
        ) -> None:
            seen.append(metrics)
            original(name, metrics, now)  # type: ignore[operator]

        scheduler.update_metrics = record  # type: ignore[method-assign]
        async with MetricsScraper(scheduler, interval_s=60, spec=spec, native=native) as scraper:
            await scraper.add("a", raw.url)
            for _ in range(3):  # the second and third pages are "unchanged" on the native path
                assert await scraper.scrape_once("a"), scraper.stats("a").last_error
            assert (scraper._hub is not None) is native
            assert scraper.stats("a").last_bytes == len(page)
        assert seen == [expected] * 3


async def test_an_unchanged_page_repeats_its_parse_error(server: Callable[..., RawServer]) -> None:
    page = b"vllm:num_requests_running 1\n"
    raw = await server([content_length(page)])  # type: ignore[misc]
    with pytest.raises(PromMetricsError) as expected:
        parse_endpoint_metrics(page)
    scheduler = Scheduler()
    async with MetricsScraper(scheduler, interval_s=60, native=True) as scraper:
        await scraper.add("a", raw.url)
        for _ in range(3):
            assert not await scraper.scrape_once("a")
            assert scraper.stats("a").last_error == str(expected.value)
        assert scraper.stats("a").failures == 3


async def test_names_and_tls_stay_on_the_python_client() -> None:
    scheduler = Scheduler()
    async with MetricsScraper(scheduler, interval_s=60, native=True) as scraper:
        await scraper.add("a", "http://localhost:9/metrics")
        await scraper.add("b", "https://10.0.0.1:9/metrics")
        assert scraper._hub is None
        await scraper.add("c", "http://[::1]:9/metrics")
        assert scraper._hub is not None


# The scan walks newlines 64 bytes at a time: pages long enough to cross many blocks, with
# lines ending at, before and after every block boundary.
_long_piece = st.sampled_from([*NAMES, b"vllm:num", b"{", b"}", b" ", b"\t", b"\n", b"#", b"1", b"x" * 61])


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(_long_piece, max_size=400))
def test_the_scan_agrees_with_its_python_twin_on_long_pages(pieces: list[bytes]) -> None:
    page = b"".join(pieces)
    assert promlines.sample_lines(page, NAMES) == _sample_lines_twin(page, NAMES)


async def test_targets_removed_and_stopped_with_scrapes_in_flight(server: Callable[..., RawServer]) -> None:
    page = b"vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n"
    raws = [await server([content_length(page)]) for _ in range(40)]  # type: ignore[misc]
    names = [f"e{i}" for i in range(len(raws))]
    scheduler = Scheduler()
    scheduler.set_endpoints([Endpoint(name=name, address=name) for name in names], time.monotonic())
    scraper = MetricsScraper(scheduler, interval_s=0.005, native=True)
    await scraper.start()
    await scraper.set_targets({name: raw.url for name, raw in zip(names, raws, strict=True)})
    deadline = time.monotonic() + 10.0
    while not all(scraper.stats(name).scrapes > 3 for name in names):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    # Half go while their scrapes are out; the same names come back at new addresses.
    await scraper.set_targets({name: raw.url for name, raw in zip(names[::2], raws[::2], strict=True)})
    for name, raw in zip(names[1::2], raws[::-2], strict=True):
        await scraper.add(name, raw.url)
    before = {name: scraper.stats(name).scrapes - scraper.stats(name).failures for name in names}
    while not all(
        scraper.stats(name).scrapes - scraper.stats(name).failures > before[name] + 3 for name in names
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert sum(stats.failures for stats in scraper.all_stats().values()) == 0
    await scraper.stop()  # with scrapes in flight: the thread is joined, nothing comes after

    def ages() -> list[float]:
        now = time.monotonic()
        return [scheduler.endpoint_state(name, now).metrics_age_s or 0.0 for name in names]

    stopped = ages()
    await asyncio.sleep(0.05)
    # No figure was reported after stop(): every one is older by the time slept.
    assert all(after >= before + 0.04 for before, after in zip(stopped, ages(), strict=True))
