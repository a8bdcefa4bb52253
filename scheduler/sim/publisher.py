"""vLLM's KV-event publisher over ZMQ, as a simulated worker runs it.

Mirrors ``ZmqEventPublisher`` of vLLM 0.33.0 (``vllm/distributed/kv_events.py``; shared
PROTOCOLS.md §1):

* live: PUB socket, multipart ``[topic, seq (8-byte big-endian, from 0), msgpack(batch)]``;
* replay: ROUTER socket; a DEALER sends ``[b"", start_seq]`` and gets
  ``[b"", topic, seq, payload]`` for every buffered batch with ``seq >= start_seq``
  (the last ``buffer_steps`` batches), then ``[b"", topic, 0xFF*8, b""]``.

``legacy=True`` speaks the older dialect: events as positional arrays and replay
frames without the topic (``[b"", seq, payload]``, end ``[b"", 0xFF*8, b""]``).

Fault-injection hooks: ``drop_seq`` buffers the batch with that sequence number for replay
but never sends it live, which is exactly what a PUB high-water-mark overflow looks like to a
subscriber (a gap in the sequence numbers); ``publish_payload`` numbers and sends any bytes as
a batch (a malformed one, an enormous one); ``send_frames`` sends a message that is not a
vLLM frame set at all; ``restart`` is a new engine process: new sockets on the same ports,
``seq`` from 0 again and nothing to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from scheduler.codec.kvevents import REPLAY_END_FRAME, encode_batch, encode_seq
from scheduler.core.events import EventBatch, KVEvent

log = logging.getLogger(__name__)

# vLLM's defaults (KVEventsConfig).
DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_HWM = 100_000


def _bound_port(socket: zmq.asyncio.Socket) -> int:
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    text = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    return int(text.rsplit(":", 1)[1])


class KVEventPublisher:
    def __init__(
        self,
        *,
        topic: str,
        host: str = "127.0.0.1",
        port: int = 0,
        replay_port: int | None = 0,
        legacy: bool = False,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        hwm: int = DEFAULT_HWM,
        data_parallel_rank: int | None = 0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if buffer_steps <= 0:
            raise ValueError("buffer_steps must be positive")
        self.topic = topic
        self.host = host
        self.legacy = legacy
        self.data_parallel_rank = data_parallel_rank
        self._topic_bytes = topic.encode("utf-8")
        self._requested_port = port
        self._requested_replay_port = replay_port
        self._hwm = hwm
        self._context = context or zmq.asyncio.Context.instance()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._drop: set[int] = set()
        self._muted = False
        self._pub: zmq.asyncio.Socket | None = None
        self._pub_now: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.port = 0
        self.replay_port: int | None = None
        self.bad_replay_requests = 0
        self.replays_served = 0

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}"

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def _bind(self, socket: zmq.asyncio.Socket, port: int) -> int:
        try:
            socket.bind(f"tcp://{self.host}:{port if port else '*'}")
        except zmq.ZMQError:
            socket.close(linger=0)
            raise
        return _bound_port(socket)

    async def start(self) -> None:
        pub = self._context.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self._hwm)
        pub.setsockopt(zmq.LINGER, 0)
        self.port = self._bind(pub, self._requested_port)
        self._pub = pub
        # The same socket without asyncio's wrapper, to send on: a PUB socket never blocks (at
        # its high-water mark it drops), so the future zmq.asyncio makes for each send is
        # overhead, ~9% of the simulated pool's busy time under `kvsched demo` (py-spy).
        self._pub_now = zmq.Socket.shadow(pub.underlying)
        if self._requested_replay_port is not None:
            router = self._context.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            self.replay_port = self._bind(router, self._requested_replay_port)
            self._router = router
            self._replay_task = asyncio.create_task(self._serve_replay(), name=f"kv-replay-{self.topic}")

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        for socket in (self._pub, self._router):
            if socket is not None:
                socket.close(linger=0)
        self._pub = self._router = None
        self._pub_now = None

    def mute(self) -> None:
        """Send no more batches live, the socket left open (an engine hung with its publisher
        still connected): they are numbered and kept for replay, as ``drop_seq`` keeps one."""
        self._muted = True

    def drop_seq(self, seq: int) -> None:
        """Do not send batch ``seq`` live (it stays replayable), as if the PUB HWM had dropped it."""
        self._drop.add(seq)

    async def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int:
        """Send one batch; returns its sequence number."""
        batch = EventBatch(
            ts=time.time() if ts is None else ts,
            events=list(events),
            data_parallel_rank=self.data_parallel_rank,
        )
        return await self.publish_payload(encode_batch(batch, legacy=self.legacy))

    async def publish_payload(self, payload: bytes) -> int:
        """Send ``payload`` as the next batch, whatever it holds; returns its sequence number."""
        if self._pub_now is None:
            raise RuntimeError("publisher is not started")
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        if seq in self._drop or self._muted:
            self._drop.discard(seq)
            return seq
        self._pub_now.send_multipart((self._topic_bytes, encode_seq(seq), payload), flags=zmq.NOBLOCK)
        return seq

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send one live message of exactly these frames (no sequence number is used up)."""
        if self._pub_now is None:
            raise RuntimeError("publisher is not started")
        self._pub_now.send_multipart(list(frames), flags=zmq.NOBLOCK)

    async def restart(self, bind_timeout_s: float = 5.0) -> None:
        """A new publisher process on the same ports: ``seq`` from 0, an empty replay buffer."""
        ports = (self.port, self.replay_port)
        await self.close()
        self._requested_port, self._requested_replay_port = ports
        self._next_seq = 0
        self._buffer.clear()
        self._drop.clear()
        self._muted = False
        deadline = asyncio.get_running_loop().time() + bind_timeout_s
        while True:
            try:
                await self.start()
                return
            except zmq.ZMQError as exc:
                # ZMQ's I/O thread closes the old listeners asynchronously: the ports come
                # free within milliseconds of close().
                await self.close()
                if exc.errno != zmq.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            try:
                await self._answer(router, frames)
            except zmq.ZMQError as exc:
                log.warning("replay reply to a client failed: %s", exc)

    async def _answer(self, router: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            self.bad_replay_requests += 1
            if self.bad_replay_requests == 1:
                log.warning(
                    "malformed replay request on %s (%d frames); further ones only counted",
                    self.replay_endpoint,
                    len(frames),
                )
            return
        identity, _, start_frame = frames
        start = int.from_bytes(start_frame, "big")
        head: tuple[bytes, ...] = (identity, b"") if self.legacy else (identity, b"", self._topic_bytes)
        for seq, payload in list(self._buffer):
            if seq >= start:
                await router.send_multipart((*head, encode_seq(seq), payload))
        await router.send_multipart((*head, REPLAY_END_FRAME, b""))
        self.replays_served += 1
