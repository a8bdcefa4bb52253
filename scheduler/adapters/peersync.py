"""The transport of the in-flight load replicas share: a ZMQ PUB socket per replica, and a
SUB socket connected to every peer's.

What is shared and how it is merged is decided in ``core/peerload.py``; this module only
carries ``Scheduler.take_sync_messages()`` out and hands peers' messages to
``Scheduler.receive_sync``. PUB/SUB fits the loss model there: a message is delivered once
or not at all, in order per peer, and a slow or absent peer never blocks the sender (PUB
drops at its high-water mark; the snapshots repair what was dropped). The PUB socket is an
XPUB: a peer's subscription arriving (a replica starting or reconnecting) is answered with a
snapshot at once, so a starting replica, whose readiness waits for its peers' snapshots
(``core/warmup.py``), need not wait for the next interval.

Peers come from a static list of ``tcp://host:port`` addresses, or from the EndpointSlices
of the kvsched Service (``kubernetes.io/service-name`` label), polled; this replica's own
address (``$POD_IP``) is left out. Messages are sent as soon as the event loop is done with
what made them (the Scheduler's ``on_sync_outbox`` schedules a send: a decision's routing goes
out after the decision's answer, together with whatever else that turn of the loop produced),
and the whole in-flight list every ``snapshot_interval_s``. They used to wait for a flush
every 5 ms: a live mean lag of 3.3 ms between two replicas (``kvsched_sync_lag_seconds``), in
which a peer routes blind to them.

The same channel carries observed responses (``codec/peersync.py`` ObservedResponse): Envoy
balances an ext_proc observation stream independently of the decision stream, so the response
phase of a request this replica routed may be observed on a peer, which sends what it saw
here (``send_observed``, at once rather than with the next batch: a first token is a latency
sample). Every peer receives it (PUB/SUB); the one whose routed id it is applies it
(``on_observed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from scheduler.codec.peersync import (
    ObservedResponse,
    PeerSyncDecodeError,
    decode_any,
    encode,
    encode_observed,
)
from scheduler.core.peerload import SyncMessage
from scheduler.core.scheduler import Scheduler

log = logging.getLogger(__name__)

# What the periodic flush still sends is only what a send scheduled by ``on_sync_outbox`` did
# not (none, normally); it mostly waits for the next snapshot.
DEFAULT_FLUSH_INTERVAL_S = 0.1
DEFAULT_REFRESH_S = 10.0
# A PUB socket keeps this many messages per slow peer before dropping (ZMQ's default is 1,000).
SNDHWM = 10_000
ENDPOINTSLICES = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


@dataclass(slots=True)
class TransportStats:
    sent_messages: int = 0
    sent_bytes: int = 0
    received_messages: int = 0
    received_bytes: int = 0
    malformed: int = 0
    # Snapshots sent at once because a peer subscribed.
    snapshots_on_subscribe: int = 0
    observed_sent: int = 0
    observed_received: int = 0


def endpointslice_peers(document: Any, port: int, own_ip: str | None) -> list[str]:
    """``tcp://ip:port`` of every ready address in an EndpointSliceList, but ``own_ip``."""
    peers = set()
    for item in (document or {}).get("items") or []:
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                if address != own_ip:
                    host = f"[{address}]" if ":" in address else address
                    peers.add(f"tcp://{host}:{port}")
    return sorted(peers)


class PeerSyncTransport:
    """Publishes this replica's sync messages and applies its peers'."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        bind: str,
        peers: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.bind = bind
        self.clock, self.wall_clock = clock, wall_clock
        self.flush_interval_s = flush_interval_s
        self.stats = TransportStats()
        self._context = context or zmq.asyncio.Context.instance()
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._peers: set[str] = set()
        self._wanted: set[str] = set(peers)
        self._tasks: list[asyncio.Task[None]] = []
        self._malformed_logged = False
        self._send_soon: asyncio.Handle | None = None
        self.bound_address = ""
        # Observed responses from peers, with the time they were sent on this replica's clock.
        self.on_observed: Callable[[ObservedResponse, float], None] | None = None

    @property
    def peers(self) -> list[str]:
        return sorted(self._peers)

    async def start(self) -> None:
        pub = self._context.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, SNDHWM)
        # Every subscription reaches this side, a repeated one too (a peer that restarted).
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        pub.bind(self.bind)
        self.bound_address = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._pub, self._sub = pub, sub
        self.scheduler.on_sync_outbox = self._outbox_filled
        self.set_peers(self._wanted)
        self._tasks = [
            asyncio.create_task(self._receive(), name="peer sync receive"),
            asyncio.create_task(self._flush(), name="peer sync send"),
            asyncio.create_task(self._subscriptions(), name="peer sync subscriptions"),
        ]

    def set_peers(self, addresses: Iterable[str]) -> None:
        """Connect to new peers, disconnect from those gone (their entries time out)."""
        wanted = set(addresses) - {self.bound_address}
        self._wanted = wanted
        if self._sub is None:
            return
        for address in sorted(wanted - self._peers):
            self._sub.connect(address)
        for address in sorted(self._peers - wanted):
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(address)
        if wanted != self._peers:
            log.info("peer sync: %d peers %s", len(wanted), sorted(wanted))
        self._peers = wanted

    def publish(self, messages: Sequence[SyncMessage]) -> None:
        if self._pub is None or not messages:
            return
        # Map the scheduler's clock to wall time: peers' monotonic clocks are not ours.
        offset = self.wall_clock() - self.clock()
        for message in messages:
            frame = encode(message, message.sent_at + offset)
            try:
                self._pub.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                continue  # at the high-water mark: a snapshot repairs it
            self.stats.sent_messages += 1
            self.stats.sent_bytes += len(frame)

    def send_observed(self, observed: ObservedResponse) -> None:
        if self._pub is None:
            return
        frame = encode_observed(observed, self.wall_clock())
        try:
            self._pub.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return  # at the high-water mark: the routing replica's bound releases the request
        self.stats.observed_sent += 1
        self.stats.sent_bytes += len(frame)

    def deliver(self, frame: bytes) -> None:
        """Apply one received frame; malformed ones are counted, logged once, skipped."""
        self.stats.received_bytes += len(frame)
        try:
            message, sent_at_wall = decode_any(frame)
        except PeerSyncDecodeError as exc:
            self.stats.malformed += 1
            if not self._malformed_logged:
                self._malformed_logged = True
                log.warning(
                    "peer sync: skipping a malformed message (further ones are only counted): %s", exc
                )
            return
        self.stats.received_messages += 1
        now = self.clock()
        sent_at = sent_at_wall - (self.wall_clock() - now)
        if isinstance(message, ObservedResponse):
            self.stats.observed_received += 1
            if self.on_observed is not None:
                # Not later than now: wall clocks of two hosts may disagree by a little.
                self.on_observed(message, min(sent_at, now))
            return
        message = SyncMessage(message.replica, message.incarnation, message.seq, sent_at, message.body)
        self.scheduler.receive_sync(message, now)

    async def _receive(self) -> None:
        assert self._sub is not None
        while True:
            frame = await self._sub.recv()
            try:
                self.deliver(frame)
            except Exception:  # a bug here must not stop the sync
                log.exception("peer sync: applying a message failed")

    async def _subscriptions(self) -> None:
        """A peer subscribed (it started, or its connection came back): send it a snapshot now.
        Measured with ``kvsched bench chaos``: a restarted replica waited 0.2-0.9 s for the
        next interval's snapshot before its view was warm."""
        assert self._pub is not None
        while True:
            frame = await self._pub.recv()
            if frame[:1] == b"\x01":
                self.scheduler.send_snapshot(self.clock())
                self.stats.snapshots_on_subscribe += 1

    def _outbox_filled(self) -> None:
        if self._send_soon is None:
            self._send_soon = asyncio.get_running_loop().call_soon(self._send_now)

    def _send_now(self) -> None:
        self._send_soon = None
        self.publish(self.scheduler.take_sync_messages())

    async def _flush(self) -> None:
        next_snapshot = self.clock()
        while True:
            now = self.clock()
            if now >= next_snapshot:
                self.scheduler.send_snapshot(now)
                next_snapshot = now + self.scheduler.config.sync.snapshot_interval_s
            self.publish(self.scheduler.take_sync_messages())
            await asyncio.sleep(max(0.0, min(self.flush_interval_s, next_snapshot - self.clock())))

    async def stop(self) -> None:
        if self.scheduler.on_sync_outbox == self._outbox_filled:
            self.scheduler.on_sync_outbox = None
        if self._send_soon is not None:
            self._send_soon.cancel()
            self._send_soon = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for socket in (self._pub, self._sub):
            if socket is not None:
                socket.close(0)
        self._pub = self._sub = None


class EndpointSlicePeers:
    """Polls the kvsched Service's EndpointSlices and keeps the transport's peers current."""

    def __init__(
        self,
        transport: PeerSyncTransport,
        client: Any,
        *,
        namespace: str,
        service: str,
        port: int,
        refresh_s: float = DEFAULT_REFRESH_S,
        own_ip: str | None = None,
    ) -> None:
        self.transport, self.client = transport, client
        self.namespace, self.service, self.port = namespace, service, port
        self.refresh_s = refresh_s
        self.own_ip = own_ip if own_ip is not None else os.environ.get("POD_IP")
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> list[str]:
        document = await asyncio.to_thread(
            self.client.request,
            "GET",
            ENDPOINTSLICES.format(namespace=self.namespace),
            query={"labelSelector": f"kubernetes.io/service-name={self.service}"},
        )
        peers = endpointslice_peers(document, self.port, self.own_ip)
        self.transport.set_peers(peers)
        return peers

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # keep the last peers and try again
                self.errors += 1
                log.warning(
                    "peer sync: listing EndpointSlices of %s/%s failed: %s", self.namespace, self.service, exc
                )
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="peer sync discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
