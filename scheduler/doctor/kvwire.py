"""The ZMQ side of a diagnosis: listen to a pod's KV-event publisher(s) on every topic, and ask
its replay socket for a replay, recording exactly what comes back.

Unlike the ingest subscriber (``adapters/kv_subscriber.py``), which subscribes to the configured
topic and hands batches to the index, this capture subscribes to everything, so that events
under another topic are seen and named rather than silently filtered. A socket monitor tells a
publisher that answered the ZMQ handshake from an address where nothing (or something that is
not a ZMQ PUB) listens. Wire layout: shared PROTOCOLS.md §1, as in ``codec/kvevents.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from scheduler.codec.kvevents import REPLAY_END_SEQ, decode_batch, encode_seq
from scheduler.core.events import EventBatch, KVEventDecodeError

_MONITORED = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_DELAYED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
_EVENT_WORDS: dict[int, str] = {
    zmq.EVENT_CONNECTED: "TCP connected, no ZMQ handshake yet",
    zmq.EVENT_CONNECT_DELAYED: "connection pending",
    zmq.EVENT_CONNECT_RETRIED: "connection refused, retrying",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "ZMQ handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "ZMQ handshake failed (protocol: not a ZMQ PUB socket)",
}


@dataclass(slots=True)
class Message:
    """One live message as it arrived."""

    address: str
    topic: bytes
    seq: int | None
    received_at: float  # wall clock, to compare with the batch's own timestamp
    batch: EventBatch | None
    error: str = ""


class _Link:
    """One socket's connection state, from its monitor."""

    def __init__(self) -> None:
        self.handshake = asyncio.Event()
        self.last_event = "no connection attempt seen"

    async def follow(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            kind = int(event["event"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake.set()
                self.last_event = "ZMQ handshake succeeded"
            else:
                self.last_event = _EVENT_WORDS.get(kind, f"ZMQ event {kind}")

    async def wait(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.handshake.wait(), timeout_s)
        return self.handshake.is_set()


@dataclass(slots=True)
class _Subscription:
    address: str
    socket: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    link: _Link
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class EventCapture:
    """SUB sockets (every topic) on one pod's KV addresses (one per data-parallel rank)."""

    def __init__(
        self,
        addresses: list[str],
        *,
        context: zmq.asyncio.Context | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.addresses = addresses
        self.messages: list[Message] = []
        self._context = context or zmq.asyncio.Context.instance()
        self._clock = wall_clock
        self._subscriptions: list[_Subscription] = []
        self._arrived = asyncio.Condition()

    async def __aenter__(self) -> EventCapture:
        for address in self.addresses:
            socket = self._context.socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            monitor = socket.get_monitor_socket(_MONITORED)
            link = _Link()
            subscription = _Subscription(address, socket, monitor, link)
            subscription.tasks.append(asyncio.create_task(link.follow(monitor)))
            socket.connect(address)
            subscription.tasks.append(asyncio.create_task(self._receive(subscription)))
            self._subscriptions.append(subscription)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for subscription in self._subscriptions:
            for task in subscription.tasks:
                task.cancel()
            for task in subscription.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(zmq.ZMQError):
                subscription.socket.disable_monitor()
            subscription.monitor.close(linger=0)
            subscription.socket.close(linger=0)

    async def connected(self, timeout_s: float) -> dict[str, str | None]:
        """Per address: None once the publisher completed the ZMQ handshake, else what was seen."""
        results = await asyncio.gather(*(s.link.wait(timeout_s) for s in self._subscriptions))
        return {
            s.address: None if ok else s.link.last_event
            for s, ok in zip(self._subscriptions, results, strict=True)
        }

    async def _receive(self, subscription: _Subscription) -> None:
        while True:
            frames = await subscription.socket.recv_multipart()
            self.messages.append(self._message(subscription.address, frames))
            async with self._arrived:
                self._arrived.notify_all()

    def _message(self, address: str, frames: list[bytes]) -> Message:
        now = self._clock()
        if len(frames) != 3 or len(frames[1]) != 8:
            sizes = [len(frame) for frame in frames]
            return Message(address, frames[0] if frames else b"", None, now, None, f"frames of sizes {sizes}")
        topic, seq_frame, payload = frames
        seq = int.from_bytes(seq_frame, "big")
        try:
            return Message(address, topic, seq, now, decode_batch(payload).batch)
        except KVEventDecodeError as exc:
            return Message(address, topic, seq, now, None, str(exc))

    async def wait_until(self, predicate: Callable[[list[Message]], bool], timeout_s: float) -> bool:
        """Until ``predicate(messages)`` holds (re-checked on every arrival) or the timeout."""

        async def satisfied() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: predicate(self.messages))

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(satisfied(), timeout_s)
        return predicate(self.messages)


@dataclass(frozen=True, slots=True)
class ReplayAnswer:
    """What a replay socket did with one request: ``answered`` (ended by the end marker),
    ``no_connection`` (no ZMQ handshake) or ``no_answer`` (connected, silent)."""

    outcome: str
    batches: int = 0
    detail: str = ""


async def ask_replay(
    address: str, start_seq: int, *, timeout_s: float, context: zmq.asyncio.Context | None = None
) -> ReplayAnswer:
    """Send ``[b"", start_seq]`` from a DEALER and read the reply until the end marker."""
    context = context or zmq.asyncio.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    monitor = dealer.get_monitor_socket(_MONITORED)
    link = _Link()
    follower = asyncio.create_task(link.follow(monitor))
    try:
        dealer.connect(address)
        if not await link.wait(timeout_s):
            return ReplayAnswer("no_connection", detail=link.last_event)
        await dealer.send_multipart([b"", encode_seq(start_seq)])
        batches = 0
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            remaining_ms = max(0.0, deadline - asyncio.get_running_loop().time()) * 1000.0
            if not await dealer.poll(timeout=remaining_ms):
                return ReplayAnswer("no_answer", batches, f"no end marker within {timeout_s:g} s")
            frames = await dealer.recv_multipart()
            # [b"", topic, seq, payload] (vLLM 0.33.0) or [b"", seq, payload] (older).
            seq_frame = frames[-2] if len(frames) in (3, 4) else b""
            if len(seq_frame) == 8 and int.from_bytes(seq_frame, "big") == REPLAY_END_SEQ:
                return ReplayAnswer("answered", batches)
            batches += 1
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        with contextlib.suppress(zmq.ZMQError):
            dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
