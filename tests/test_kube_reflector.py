"""The list/watch reflector against tests/fake_kube_apiserver.py (why a fake: see its docstring).

Every wait here is on a condition (a delivered snapshot, the server's recorded state) with a
timeout as a safety net, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fake_kube_apiserver import FakeKubeAPIServer

from scheduler.adapters.kubernetes.client import PODS, KubeClient
from scheduler.adapters.kubernetes.reflector import Backoff, Reflector, Snapshot

POD_KEY = ("", "v1", "pods")
NS = "llm"
FAST = Backoff(initial_s=0.01, max_s=0.05)


def pod(name: str, namespace: str = NS, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": {}}


class Watched:
    """A reflector whose deliveries land in a queue the test awaits."""

    def __init__(self, server: FakeKubeAPIServer, gone_as: str = "event") -> None:
        self.server = server
        self.snapshots: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.history: list[Snapshot] = []
        self.reflector = Reflector(
            KubeClient.connect(api_server=server.url), PODS, NS, self._on_change, backoff=FAST, seed=1
        )

    def _on_change(self, snapshot: Snapshot) -> None:
        self.history.append(snapshot)
        self.snapshots.put_nowait(snapshot)

    async def until(self, predicate: Callable[[Snapshot], bool], timeout: float = 10.0) -> Snapshot:
        """The first delivered snapshot (already delivered or to come) that satisfies ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                snapshot = await self.snapshots.get()
                if predicate(snapshot):
                    return snapshot


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll state another thread changes (the reflector's own counters)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture(params=["event", "status"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeKubeAPIServer]:
    with FakeKubeAPIServer(gone_as=request.param) as fake:
        fake.install("", "v1", "pods", "Pod")
        yield fake


@pytest.fixture
async def watched(server: FakeKubeAPIServer) -> AsyncIterator[Watched]:
    w = Watched(server)
    yield w
    await w.reflector.stop()


def names(snapshot: Snapshot) -> set[str]:
    return set(snapshot)


async def test_list_then_watch_sees_every_change(server: FakeKubeAPIServer, watched: Watched) -> None:
    server.create(POD_KEY, pod("a"))
    server.create(POD_KEY, pod("other", namespace="elsewhere"))
    watched.reflector.start()
    first = await watched.until(lambda s: True)
    assert names(first) == {"llm/a"}
    server.create(POD_KEY, pod("b"))
    await watched.until(lambda s: names(s) == {"llm/a", "llm/b"})
    changed = pod("a", app="x")
    server.replace(POD_KEY, changed)
    snapshot = await watched.until(lambda s: s["llm/a"]["metadata"]["labels"] == {"app": "x"})
    assert names(snapshot) == {"llm/a", "llm/b"}
    server.delete(POD_KEY, NS, "b")
    await watched.until(lambda s: names(s) == {"llm/a"})
    assert watched.reflector.resource_version == server.resource_version
    (watch,) = server.watch_requests("pods")
    assert watch.query["allowWatchBookmarks"] == "true"
    assert int(watch.query["timeoutSeconds"]) >= 300
    assert watched.reflector.stats.lists == 1


async def test_paginated_list(server: FakeKubeAPIServer, watched: Watched) -> None:
    import scheduler.adapters.kubernetes.reflector as reflector_module

    for i in range(7):
        server.create(POD_KEY, pod(f"p{i}"))
    page_size = reflector_module.LIST_PAGE_SIZE
    reflector_module.LIST_PAGE_SIZE = 3
    try:
        watched.reflector.start()
        first = await watched.until(lambda s: True)
    finally:
        reflector_module.LIST_PAGE_SIZE = page_size
    assert len(first) == 7
    lists = [r for r in server.requests_to("GET", "/pods") if "watch" not in r.query]
    assert len(lists) == 3 and lists[1].query["continue"]


async def test_gone_relists_and_keeps_state_meanwhile(server: FakeKubeAPIServer, watched: Watched) -> None:
    server.create(POD_KEY, pod("a"))
    server.create(POD_KEY, pod("b"))
    watched.reflector.start()
    await watched.until(lambda s: names(s) == {"llm/a", "llm/b"})
    # Changes the watch cannot see, then history it would need is compacted away: its
    # resourceVersion is now too old, so only a relist can catch up.
    server.pause_watches()
    server.delete(POD_KEY, NS, "a")
    server.create(POD_KEY, pod("c"))
    server.compact()
    server.resume_watches()
    snapshot = await watched.until(lambda s: "llm/c" in s)
    assert names(snapshot) == {"llm/b", "llm/c"}
    stats = watched.reflector.stats
    assert stats.relists_gone == 1 and stats.lists == 2
    # No snapshot ever lost pod b, which existed throughout.
    assert all("llm/b" in s for s in watched.history)
    server.create(POD_KEY, pod("d"))
    await watched.until(lambda s: "llm/d" in s)


async def test_gone_error_event_on_an_open_watch(server: FakeKubeAPIServer, watched: Watched) -> None:
    server.create(POD_KEY, pod("a"))
    watched.reflector.start()
    await watched.until(lambda s: "llm/a" in s)
    await until(lambda: server.open_watches("pods") == 1)
    server.expire_watches()
    await until(lambda: watched.reflector.stats.relists_gone == 1)
    await until(lambda: watched.reflector.stats.lists == 2)
    server.create(POD_KEY, pod("b"))
    await watched.until(lambda s: names(s) == {"llm/a", "llm/b"})


async def test_bookmark_advances_the_resource_version(server: FakeKubeAPIServer, watched: Watched) -> None:
    server.create(POD_KEY, pod("a"))
    watched.reflector.start()
    await watched.until(lambda s: True)
    await until(lambda: server.open_watches("pods") == 1)
    listed_at = watched.reflector.resource_version
    server.touch()
    server.touch()
    bookmarked = server.bookmark()
    await until(lambda: watched.reflector.stats.bookmarks == 1)
    assert watched.reflector.resource_version == bookmarked != listed_at
    # History up to the bookmark is gone, yet the reconnect resumes from the bookmark: no 410.
    server.compact()
    server.drop_watches()
    await until(lambda: watched.reflector.stats.watches == 2)
    rewatch = list(server.watch_requests("pods"))[-1]
    assert rewatch.query["resourceVersion"] == bookmarked
    server.create(POD_KEY, pod("b"))
    await watched.until(lambda s: "llm/b" in s)
    assert watched.reflector.stats.relists_gone == 0 and watched.reflector.stats.lists == 1


async def test_reconnects_after_the_stream_drops(server: FakeKubeAPIServer, watched: Watched) -> None:
    server.create(POD_KEY, pod("a"))
    watched.reflector.start()
    await watched.until(lambda s: True)
    await until(lambda: server.open_watches("pods") == 1)
    server.pause_watches()
    # Made while no watch is open: the resumed watch replays it from its resourceVersion.
    server.create(POD_KEY, pod("b"))
    server.resume_watches()
    await watched.until(lambda s: names(s) == {"llm/a", "llm/b"})
    await until(lambda: server.open_watches("pods") == 1)
    opened = watched.reflector.stats.watches
    server.drop_watches()
    await until(lambda: watched.reflector.stats.watches > opened and server.open_watches("pods") == 1)
    server.create(POD_KEY, pod("c"))
    await watched.until(lambda s: "llm/c" in s)
    stats = watched.reflector.stats
    assert stats.lists == 1 and stats.relists_gone == 0 and stats.errors >= 1


async def test_missing_resource_type_is_retried_until_installed() -> None:
    with FakeKubeAPIServer() as server:
        w = Watched(server)
        w.reflector.start()
        try:
            await until(lambda: w.reflector.stats.errors >= 2)
            server.install("", "v1", "pods", "Pod")
            server.create(POD_KEY, pod("a"))
            await w.until(lambda s: "llm/a" in s)
        finally:
            await w.reflector.stop()


async def test_stop_interrupts_an_open_watch(server: FakeKubeAPIServer) -> None:
    w = Watched(server)
    w.reflector.start()
    await w.until(lambda s: True)
    await until(lambda: server.open_watches("pods") == 1)
    async with asyncio.timeout(3):
        await w.reflector.stop()
    thread = w.reflector._thread
    assert thread is not None and not thread.is_alive()


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    import random

    backoff = Backoff(initial_s=0.5, max_s=30.0)
    rng = random.Random(3)
    for failures, base in [(1, 0.5), (2, 1.0), (3, 2.0), (8, 30.0), (30, 30.0)]:
        delays = [backoff.delay(failures, rng) for _ in range(50)]
        assert all(base / 2 <= d < base for d in delays)
        assert len(set(delays)) > 1
