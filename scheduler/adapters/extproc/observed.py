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
this registry only maps routed ids to them and bounds how long one waits.

Envoy balances the observation filter's streams over the ext_proc cluster independently of the
decision filter's, so with several replicas the observation often lands on a replica that did
not route the request. That replica reads the response as it would its own (first byte, status,
usage) and sends what it saw to the routing replica over the peer sync channel
(``ForwardedObservation``; ``adapters/peersync.py``); the routing replica applies it as if the
stream had reached it (``receive``). Without peer sync the observation is counted
(``observation_foreign``) and dropped, and the bound releases the request. A routed request
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
from typing import TYPE_CHECKING, Protocol

from scheduler.adapters.extproc.headers import RequestHints, routing_headers
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.extproc.usage import Usage
from scheduler.codec.peersync import BROKEN, COMPLETED, FIRST_BYTE, ObservedResponse
from scheduler.core.peerload import PeerSyncConfig, ttl_bounds

if TYPE_CHECKING:
    from scheduler.adapters.extproc.decide import RoutingAnswer

ROUTED_HEADER = "x-kvsched-routed"


class ObservedRequest(Protocol):
    """What a transport's request state does with an observed response phase."""

    def first_byte(self, now: float) -> None:
        """The response's first body byte."""

    def complete_with(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        """The response ended: completed, or failed by the model server (status >= 500)."""

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
        self._ttl: dict[str, float] = {}
        # The deadline in force per request: the heap may hold an earlier, superseded one.
        self._deadline: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        # Sends an observation of a request another replica routed to it (peer sync); None:
        # such observations are counted and dropped.
        self.forward: Callable[[ObservedResponse], None] | None = None

    @property
    def suffix(self) -> str:
        """``.{nonce}.{replica}``: what every id this replica makes ends with."""
        if not self._suffix:
            name = self._replica() if self._replica is not None else ""
            if not name:
                name = f"{socket.gethostname()}-{os.getpid()}"
            self._suffix = f".{secrets.token_hex(4)}.{name}"
        return self._suffix

    @property
    def replica_name(self) -> str:
        # The suffix is "." + 8 hex digits + "." + the name (which may hold dots itself).
        return self.suffix[10:]

    def new_id(self) -> str:
        self._counter += 1
        return f"{self._counter:x}{self.suffix}"

    def __len__(self) -> int:
        return len(self._awaiting)

    def announce(
        self,
        request: ObservedRequest,
        decision: RoutingAnswer,
        hints: RequestHints,
        decided_from: float,
        *,
        destination_list: bool,
    ) -> tuple[str, list[tuple[str, str]], str]:
        """A routed decision's answer, the same in both transports: (destination, the headers
        added to the request, ``x-kvsched-routed`` last, and the routed id under which
        ``request`` now waits for its observation)."""
        destination, extra, routed_id = self.address(decision, hints, destination_list=destination_list)
        self.await_observation(routed_id, request, decision, decided_from)
        return destination, extra, routed_id

    def address(
        self, decision: RoutingAnswer, hints: RequestHints, *, destination_list: bool
    ) -> tuple[str, list[tuple[str, str]], str]:
        """``announce``'s answer alone: for a transport that sends it before the pick's
        bookkeeping (whose prediction bounds the wait), then calls ``await_observation``."""
        destination = ",".join(decision.endpoints) if destination_list else decision.endpoints[0]
        extra = routing_headers(hints, decision.prefill_endpoint)
        routed_id = self.new_id()
        extra.append((ROUTED_HEADER, routed_id))
        return destination, extra, routed_id

    def await_observation(
        self, routed_id: str, request: ObservedRequest, decision: RoutingAnswer, decided_from: float
    ) -> None:
        scheduling = decision.request
        self.routed(
            routed_id,
            request,
            decided_from,
            decision.predicted,
            scheduling.max_tokens if scheduling is not None else None,
        )

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
        self._ttl[routed_id] = ttl_s
        self._push_deadline(routed_id, now + ttl_s)

    def _push_deadline(self, routed_id: str, deadline: float) -> None:
        self._deadline[routed_id] = deadline
        heapq.heappush(self._deadlines, (deadline, routed_id))

    def claim(self, routed_id: str) -> ObservedRequest | None:
        """The observation stream of ``routed_id`` started: its request (here, or a forwarder to
        the replica that routed it), or None (counted) when nobody it can reach knows it."""
        if not routed_id.endswith(self.suffix):
            forward = self.forward
            if forward is None:
                self._stats.count("observation_foreign")
                return None
            self._stats.count("observation_forwarded")
            return ForwardedObservation(routed_id, self.replica_name, forward)
        request = self._awaiting.get(routed_id)
        if request is None or routed_id in self._observed:
            # Routed here before a restart, or released already (its bound passed).
            self._stats.count("observation_unknown")
            return None
        self._observed.add(routed_id)
        self._stats.count("observation")
        return request

    def receive(self, observed: ObservedResponse, at: float) -> None:
        """A peer observed a response; applied when this replica routed it."""
        routed_id = observed.routed_id
        if not routed_id.endswith(self.suffix):
            return  # another peer's: every peer receives every observation
        request = self._awaiting.get(routed_id)
        if request is None:
            self._stats.count("observation_unknown")
            return
        if observed.phase == FIRST_BYTE or observed.first_byte:
            if observed.phase == FIRST_BYTE:
                self._stats.count("observation_remote")
                # The response is under way: its bound starts again from its first byte, as the
                # rest of it is the decode part of the prediction.
                self._push_deadline(routed_id, at + self._ttl.get(routed_id, 0.0))
            request.first_byte(at)
        if observed.phase == COMPLETED:
            usage = Usage(None, observed.completion_tokens, observed.cached_tokens)
            request.complete_with(at, observed.status, observed.served, usage)
        elif observed.phase == BROKEN:
            request.observation_ended(at)

    def done(self, routed_id: str) -> None:
        """The request is released (completed, failed, or its stream carried the response)."""
        if self._awaiting.pop(routed_id, None) is not None:
            self._observed.discard(routed_id)
            self._ttl.pop(routed_id, None)
            self._deadline.pop(routed_id, None)

    def expire(self, now: float) -> int:
        """Release every request past its bound with no observation attached; how many."""
        expired = 0
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, routed_id = heapq.heappop(deadlines)
            request = self._awaiting.get(routed_id)
            if request is None or routed_id in self._observed or self._deadline.get(routed_id) != deadline:
                continue  # released, observed here, or its bound was extended
            del self._awaiting[routed_id]
            self._ttl.pop(routed_id, None)
            del self._deadline[routed_id]
            expired += 1
            request.expire(now)
        if len(deadlines) > 2 * len(self._awaiting) + 64:
            # Entries released long before their bound: drop them so the heap stays small.
            self._deadlines = [item for item in deadlines if item[1] in self._awaiting]
            heapq.heapify(self._deadlines)
        return expired


class ForwardedObservation:
    """The observation, on this replica, of a request another replica routed: what it sees goes
    to that replica (``Observations.forward``)."""

    def __init__(self, routed_id: str, replica: str, send: Callable[[ObservedResponse], None]) -> None:
        self.routed_id = routed_id
        self._replica = replica
        self._send = send
        self._first_byte_sent = False
        self.finished = False
        # The observation stream (native transport's bookkeeping).
        self.observed_on: int | None = None

    def first_byte(self, now: float) -> None:
        if self._first_byte_sent or self.finished:
            return
        self._first_byte_sent = True
        self._send(ObservedResponse(self._replica, self.routed_id, FIRST_BYTE, True))

    def complete_with(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._send(
            ObservedResponse(
                self._replica,
                self.routed_id,
                COMPLETED,
                # The first byte, when it came with the end, went out just before.
                False,
                status,
                served,
                usage.cached_tokens if usage is not None else None,
                usage.completion_tokens if usage is not None else None,
            )
        )

    def observation_ended(self, now: float) -> None:
        if not self.finished:
            self.finished = True
            self._send(ObservedResponse(self._replica, self.routed_id, BROKEN))

    def expire(self, now: float) -> None:
        """Never registered for expiry: the routing replica bounds the request."""
