"""List + watch of one resource type in one namespace, kept as a local store.

The protocol is Kubernetes' "efficient detection of changes" (API concepts):

- LIST (paginated with ``limit``/``continue``) gives the objects and the collection's
  ``metadata.resourceVersion``; a watch from that version misses nothing.
- WATCH (``watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T``) streams
  one JSON event per line: ADDED / MODIFIED / DELETED carry the object, whose
  ``metadata.resourceVersion`` becomes the version to resume from; BOOKMARK carries only a
  newer ``metadata.resourceVersion`` (nothing changed, but a reconnect may start there);
  ERROR carries a ``Status``.
- ``410 Gone``, as the HTTP status of a request or as an ERROR event with ``code`` 410, means
  the version is older than the server keeps: relist. The old store stays in use until the new
  list has arrived, so consumers never see objects vanish and come back.
- Any other failure (connection dropped, 5xx, 429, a resource type not installed yet) is
  retried after an exponential backoff with jitter; a watch resumes from the last version.
  A watch that ends cleanly (the server's ``timeoutSeconds``) is reopened at once.

resourceVersion is opaque: it is stored and sent back, never compared or parsed.

The ``kubernetes`` client is blocking, so each reflector runs in its own thread. The thread
owns the store; a change schedules (at most one pending) delivery onto the asyncio loop with
``call_soon_threadsafe``, and the loop-side callback receives a snapshot of the whole store,
so consumers run on the loop like every other kvsched component and coalesce bursts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.adapters.kubernetes.client import KubeClient, KubeError, ResourceType, iter_lines

log = logging.getLogger(__name__)

Snapshot = Mapping[str, Mapping[str, Any]]

LIST_PAGE_SIZE = 500
# client-go picks each watch's timeout at random in [5, 10) minutes so that a fleet of
# clients does not reconnect in step.
MIN_WATCH_TIMEOUT_S = 300.0
# Past the server-side timeout, how long a silent connection is trusted before it is
# presumed dead (no FIN from a crashed peer) and reopened.
READ_TIMEOUT_GRACE_S = 60.0
# A watch that ends cleanly after less than this counts as a failure (backoff), so a server
# that closes every stream at once is not hammered.
MIN_HEALTHY_WATCH_S = 1.0


class GoneError(Exception):
    """The resourceVersion is too old for the server (410 Gone): the store must be relisted."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential delays, ``initial_s * 2**n`` up to ``max_s``, each jittered into [d/2, d)."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** max(0, failures - 1))
        return base / 2 + rng.random() * base / 2


@dataclass(slots=True)
class ReflectorStats:
    lists: int = 0
    relists_gone: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: int = 0
    last_error: str = ""


def object_key(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


class Reflector:
    """Keeps every object of one resource type in one namespace; reports each change on the loop."""

    def __init__(
        self,
        client: KubeClient,
        resource: ResourceType,
        namespace: str,
        on_change: Callable[[Snapshot], None],
        *,
        label_selector: str | None = None,
        watch_timeout_s: float = MIN_WATCH_TIMEOUT_S,
        backoff: Backoff | None = None,
        seed: int | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.on_change = on_change
        self.label_selector = label_selector
        self.watch_timeout_s = watch_timeout_s
        self.backoff = backoff or Backoff()
        self.stats = ReflectorStats()
        self._rng = random.Random(seed)
        self._store: dict[str, Mapping[str, Any]] = {}
        self._resource_version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response: Any = None
        self._delivery_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Reflector({self.resource} in {self.namespace})"

    @property
    def resource_version(self) -> str | None:
        """The version a reconnect resumes from (the last list, event or bookmark)."""
        return self._resource_version

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch {self.resource}", daemon=True)
        self._thread.start()

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _interrupt(response)
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, timeout_s)

    # --- delivery to the loop -----------------------------------------------------------

    def _changed(self) -> None:
        """Called with the lock held, after the store changed."""
        if self._delivery_pending or self._loop is None:
            return
        self._delivery_pending = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._delivery_pending = False

    def _deliver(self) -> None:
        with self._lock:
            self._delivery_pending = False
            snapshot = dict(self._store)
        if self._stop.is_set():
            return
        try:
            self.on_change(snapshot)
        except Exception:  # a consumer's bug must not end the watch
            log.exception("%r: handling a change failed", self)

    # --- the watch thread -----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self._resource_version is None:
                    self._list()
                    failures = 0
                healthy = self._watch()
                if healthy:
                    failures = 0
                    continue
                failures += 1
            except GoneError:
                # Relist at once, as client-go does: the server answered, it only compacted.
                self.stats.relists_gone += 1
                self._resource_version = None
                continue
            except Exception as exc:
                if self._stop.is_set():
                    break
                failures += 1
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                level = logging.WARNING if failures == 1 else logging.DEBUG
                if isinstance(exc, KubeError) and exc.status == 404:
                    level = logging.INFO if failures == 1 else logging.DEBUG
                    log.log(level, "%r: resource type not served (CRD not installed?); retrying", self)
                else:
                    log.log(level, "%r: %s; retrying", self, exc)
            self._stop.wait(self.backoff.delay(failures, self._rng))

    def _list(self) -> None:
        items: dict[str, Mapping[str, Any]] = {}
        cont = ""
        version: str | None = None
        path = self.resource.collection_path(self.namespace)
        while True:
            query = {"limit": str(LIST_PAGE_SIZE)}
            if cont:
                query["continue"] = cont
            if self.label_selector:
                query["labelSelector"] = self.label_selector
            try:
                page = self.client.request("GET", path, query=query)
            except KubeError as exc:
                if exc.status == 410 and cont:
                    # The continue token expired mid-list: start the list again.
                    items, cont = {}, ""
                    continue
                raise
            for obj in page.get("items") or []:
                items[object_key(obj)] = obj
            metadata = page.get("metadata") or {}
            cont = metadata.get("continue") or ""
            if not cont:
                version = metadata.get("resourceVersion")
                break
        if not version:
            raise KubeError(0, f"list of {self.resource} carries no resourceVersion")
        with self._lock:
            self._store = items
            self._resource_version = str(version)
            self.stats.lists += 1
            self._changed()

    def _watch(self) -> bool:
        """One watch stream until it ends; True when it ended cleanly after doing its job."""
        assert self._resource_version is not None
        timeout = self.watch_timeout_s * (1 + self._rng.random())
        query = [
            ("watch", "1"),
            ("resourceVersion", self._resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(int(timeout))),
        ]
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        started = time.monotonic()
        try:
            response = self.client.open_stream(
                self.resource.collection_path(self.namespace), query, timeout + READ_TIMEOUT_GRACE_S
            )
        except KubeError as exc:
            if exc.status == 410:
                raise GoneError(str(exc)) from exc
            raise
        with self._lock:
            self._response = response
        if self._stop.is_set():
            _interrupt(response)
        self.stats.watches += 1
        received = 0
        try:
            for line in iter_lines(response):
                self._apply(json.loads(line))
                received += 1
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return received > 0 or time.monotonic() - started >= MIN_HEALTHY_WATCH_S

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            raise KubeError(0, f"watch event {kind!r} without an object")
        if kind == "ERROR":
            code = obj.get("code")
            message = str(obj.get("message", ""))
            if code == 410:
                raise GoneError(message)
            raise KubeError(int(code) if isinstance(code, int) else 0, f"watch ERROR event: {message}")
        version = _resource_version(obj)
        if kind == "BOOKMARK":
            if version is not None:
                self._resource_version = version
            self.stats.bookmarks += 1
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise KubeError(0, f"unknown watch event type {kind!r}")
        key = object_key(obj)
        with self._lock:
            if kind == "DELETED":
                self._store.pop(key, None)
            else:
                self._store[key] = obj
            if version is not None:
                self._resource_version = version
            self.stats.events += 1
            self._changed()


def _interrupt(response: Any) -> None:
    """Unblock a thread reading ``response`` (urllib3 >= 2.3 can shut the socket down)."""
    shutdown = getattr(response, "shutdown", None)
    with contextlib.suppress(Exception):
        if shutdown is not None:
            shutdown()
        else:
            response.close()
