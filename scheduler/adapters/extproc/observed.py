"""Routed requests whose response phase arrives on another ext_proc stream (observation).

In the two-filter layout (``scheduler/demo/envoy.py``, ``EnvoySettings.observation``) the
decision filter's stream carries the request only: Envoy resets it as soon as the request
phase is done, before the upstream answers (Envoy 1.40, measured). A second ext_proc filter in
``observability_mode`` sends copies of the request headers and the whole response phase on a
stream of its own and waits for no answer. The decision answer adds ``ROUTED_HEADER`` to the
request, which the observation filter, sitting after the decision filter, sees among the
request headers it sends: that names the routed request.

Why not ``x-request-id``: Envoy keeps a client-supplied one, so two requests may carry the same
value (and a client may copy another's); kvsched already renames a repeated one internally.
The routed id is ``{counter:x}.{nonce}.{replica}``: the counter makes it unique per request on
this replica, the replica name (``peer_sync.replica``, the pod's or host's name) unique across
replicas, and a nonce drawn at start makes a restarted replica's ids differ from the ids of its
previous run, and makes them unguessable for a client that sends the header itself.

Each transport keeps its own per-request state (``servicer._Exchange``, ``native._NativeRequest``);
this registry only maps routed ids to them and bounds how long one waits. A routed request
whose decision stream ended without a response on it is released by ``expire`` once
``ttl_bounds`` (``core/peerload.py``: 4x the predicted end-to-end latency, at least 5 s; 60 s
without a prediction, the same bound a peer's entry gets) has passed with no observation
attached. One with an observation attached is released when the observation stream ends,
completed or not.
"""

from __future__ import annotations

import heapq
import os
import secrets
import socket
from collections.abc import Callable
from typing import Protocol

from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.core.peerload import PeerSyncConfig, ttl_bounds

ROUTED_HEADER = "x-kvsched-routed"


class ObservedRequest(Protocol):
    """What a transport's request state does with an observed response phase."""

    def observation_ended(self, now: float) -> None:
        """The observation stream ended; an incomplete response is released as failed."""

    def expire(self, now: float) -> None:
        """No observation came in time: release the request as failed."""


class Observations:
    """Routed requests awaiting their observation stream, by routed id."""

    def __init__(
        self,
        stats: ExtProcStats,
        replica: Callable[[], str] | None = None,
        bounds: PeerSyncConfig | None = None,
    ) -> None:
        self._stats = stats
        self._replica = replica
        self._suffix = ""
        self._counter = 0
        self._bounds = bounds if bounds is not None else PeerSyncConfig()
        self._awaiting: dict[str, ObservedRequest] = {}
        self._observed: set[str] = set()
        self._deadlines: list[tuple[float, str]] = []

    @property
    def suffix(self) -> str:
        """``.{nonce}.{replica}``: what every id this replica makes ends with."""
        if not self._suffix:
            name = self._replica() if self._replica is not None else ""
            if not name:
                name = f"{socket.gethostname()}-{os.getpid()}"
            self._suffix = f".{secrets.token_hex(4)}.{name}"
        return self._suffix

    def new_id(self) -> str:
        self._counter += 1
        return f"{self._counter:x}{self.suffix}"

    def __len__(self) -> int:
        return len(self._awaiting)

    def routed(
        self,
        routed_id: str,
        request: ObservedRequest,
        now: float,
        predicted: tuple[float, float, str] | None,
        max_tokens: int | None,
    ) -> None:
        """A request was routed under ``routed_id``; it waits for its observation until the bound."""
        ttft_ms = e2e_ms = None
        if predicted is not None:
            ttft_ms = predicted[0]
            e2e_ms = ttft_ms + predicted[1] * max_tokens if max_tokens else None
        ttl_s, _ = ttl_bounds(self._bounds, ttft_ms, e2e_ms)
        self._awaiting[routed_id] = request
        heapq.heappush(self._deadlines, (now + ttl_s, routed_id))

    def claim(self, routed_id: str) -> ObservedRequest | None:
        """The observation stream of ``routed_id`` started: its request, or None (counted) when
        this replica does not know it (routed elsewhere, or before a restart)."""
        request = self._awaiting.get(routed_id)
        if request is None or routed_id in self._observed:
            self._stats.count(
                "observation_foreign" if not routed_id.endswith(self.suffix) else "observation_unknown"
            )
            return None
        self._observed.add(routed_id)
        self._stats.count("observation")
        return request

    def done(self, routed_id: str) -> None:
        """The request is released (completed, failed, or its stream carried the response)."""
        if self._awaiting.pop(routed_id, None) is not None:
            self._observed.discard(routed_id)

    def expire(self, now: float) -> int:
        """Release every request past its bound with no observation attached; how many."""
        expired = 0
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, routed_id = heapq.heappop(deadlines)
            request = self._awaiting.get(routed_id)
            if request is None or routed_id in self._observed:
                continue
            del self._awaiting[routed_id]
            expired += 1
            request.expire(now)
        if len(deadlines) > 2 * len(self._awaiting) + 64:
            # Entries released long before their bound: drop them so the heap stays small.
            self._deadlines = [item for item in deadlines if item[1] in self._awaiting]
            heapq.heapify(self._deadlines)
        return expired
