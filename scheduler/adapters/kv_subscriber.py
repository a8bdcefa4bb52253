"""ZMQ adapter for vLLM KV events: SUB for the live stream, DEALER for replays.

Moves bytes only; every decision (apply, replay, reset) is ``scheduler.core.kvingest``'s.
One ``KVEventSubscriber`` per pod, with one SUB (and replay DEALER) per data-parallel
rank: rank r publishes on the live port + r and replays on the replay port + r (vLLM
0.33.0 ``ZmqEventPublisher``). In the index, rank 0 is the endpoint's name and rank r>0
is ``<name>#dp<r>``; the Scheduler scores an endpoint by its best rank.

All subscribers share one asyncio loop (zmq.asyncio): no thread per pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from scheduler.codec.kvevents import REPLAY_END_SEQ, KVEventDecodeError, decode_seq, encode_seq
from scheduler.core.index import PrefixIndex
from scheduler.core.kvingest import IngestStats, PublisherIngest

log = logging.getLogger(__name__)


def _with_port_offset(endpoint: str, offset: int) -> str:
    if offset == 0:
        return endpoint
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + offset}"


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    name: str  # endpoint name (normally ip:port of the model server)
    endpoint: str  # tcp://ip:5557
    replay_endpoint: str | None = None  # tcp://ip:5558
    topic: str = ""  # subscription prefix; "" = everything the publisher sends
    data_parallel_size: int = 1
    replay_timeout_s: float = 5.0

    def worker_name(self, rank: int) -> str:
        return self.name if rank == 0 else f"{self.name}#dp{rank}"


class _Rank:
    def __init__(self, config: SubscriberConfig, rank: int, index: PrefixIndex, clock: Callable[[], float]):
        self.rank = rank
        self.endpoint = _with_port_offset(config.endpoint, rank)
        self.replay_endpoint = (
            None if config.replay_endpoint is None else _with_port_offset(config.replay_endpoint, rank)
        )
        self.topic = config.topic.encode()
        self.clock = clock
        self.ingest = PublisherIngest(
            index,
            config.worker_name(rank),
            has_replay=self.replay_endpoint is not None,
            replay_timeout_s=config.replay_timeout_s,
            context=f"kv events {self.endpoint}",
        )
        self.replay_task: asyncio.Task[None] | None = None


class KVEventSubscriber:
    """Live stream plus replay for one pod, feeding the shared prefix index."""

    def __init__(
        self,
        config: SubscriberConfig,
        index: PrefixIndex,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.index = index
        self._context = context or zmq.asyncio.Context.instance()
        self._ranks = [_Rank(config, rank, index, clock) for rank in range(config.data_parallel_size)]
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: list[zmq.asyncio.Socket] = []

    @property
    def stats(self) -> IngestStats:
        """Totals over the ranks."""
        total = IngestStats()
        for rank in self._ranks:
            for name in IngestStats.__slots__:
                setattr(total, name, getattr(total, name) + getattr(rank.ingest.stats, name))
        return total

    def rank_stats(self, rank: int) -> IngestStats:
        return self._ranks[rank].ingest.stats

    async def start(self) -> None:
        for rank in self._ranks:
            sub = self._context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, rank.topic)
            sub.connect(rank.endpoint)
            self._sockets.append(sub)
            self._tasks.append(asyncio.create_task(self._live(rank, sub), name=f"kv-sub-{rank.endpoint}"))

    async def stop(self) -> None:
        tasks = self._tasks + [r.replay_task for r in self._ranks if r.replay_task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for socket in self._sockets:
            socket.close(linger=0)
        self._sockets.clear()

    async def __aenter__(self) -> KVEventSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _live(self, rank: _Rank, sub: zmq.asyncio.Socket) -> None:
        ingest = rank.ingest
        while True:
            frames = await sub.recv_multipart()
            try:
                if len(frames) != 3:
                    ingest.malformed_frame(f"{len(frames)} frames, expected [topic, seq, payload]")
                    continue
                try:
                    seq = decode_seq(frames[1])
                except KVEventDecodeError as exc:
                    ingest.malformed_frame(str(exc))
                    continue
                order = ingest.on_live(seq, frames[2], rank.clock())
                if order is not None:
                    self._begin_replay(rank, order.start_seq)
            except Exception:  # input must never kill the subscriber
                log.exception("%s: unexpected error handling a KV-event message", rank.endpoint)

    def _begin_replay(self, rank: _Rank, start_seq: int) -> None:
        if rank.replay_task is not None and not rank.replay_task.done():
            return
        rank.replay_task = asyncio.create_task(
            self._replay(rank, start_seq), name=f"kv-replay-{rank.endpoint}"
        )

    async def _replay(self, rank: _Rank, start_seq: int) -> None:
        """DEALER [b"", start] -> [b"", topic, seq, payload]* (older: no topic) -> end marker."""
        ingest = rank.ingest
        assert rank.replay_endpoint is not None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(rank.replay_endpoint)
        try:
            await dealer.send_multipart([b"", encode_seq(start_seq)])
            deadline = rank.clock() + self.config.replay_timeout_s
            while True:
                remaining = deadline - rank.clock()
                if remaining <= 0 or not await dealer.poll(timeout=remaining * 1000):
                    ingest.on_replay_failed(f"no end of replay within {self.config.replay_timeout_s:.1f}s")
                    return
                frames = await dealer.recv_multipart()
                if len(frames) == 4 and frames[0] == b"":
                    seq_frame, payload = frames[2], frames[3]
                elif len(frames) == 3 and frames[0] == b"":
                    seq_frame, payload = frames[1], frames[2]
                else:
                    ingest.malformed_frame(f"replay reply of {len(frames)} frames")
                    continue
                try:
                    seq = decode_seq(seq_frame)
                except KVEventDecodeError as exc:
                    ingest.malformed_frame(f"replay: {exc}")
                    continue
                if seq == REPLAY_END_SEQ:
                    ingest.on_replay_end()
                    return
                if not ingest.on_replay_batch(seq, payload):
                    ingest.on_replay_failed(f"replay starts at {seq}, after the missing batches")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: replay failed", rank.replay_endpoint)
            ingest.on_replay_failed(str(exc))
        finally:
            dealer.close(linger=0)


class KVEventIngestService:
    """All pods' subscribers; discovery adds and removes endpoints."""

    def __init__(self, index: PrefixIndex, *, context: zmq.asyncio.Context | None = None) -> None:
        self.index = index
        self._context = context or zmq.asyncio.Context.instance()
        self._subscribers: dict[str, KVEventSubscriber] = {}

    @property
    def subscribers(self) -> dict[str, KVEventSubscriber]:
        return dict(self._subscribers)

    async def add_endpoint(self, config: SubscriberConfig) -> None:
        current = self._subscribers.get(config.name)
        if current is not None:
            if current.config == config:
                return
            await self.remove_endpoint(config.name, purge=True)
        subscriber = KVEventSubscriber(config, self.index, context=self._context)
        await subscriber.start()
        self._subscribers[config.name] = subscriber

    async def remove_endpoint(self, name: str, *, purge: bool = True) -> None:
        subscriber = self._subscribers.pop(name, None)
        if subscriber is None:
            return
        await subscriber.stop()
        if purge:
            for rank in range(subscriber.config.data_parallel_size):
                self.index.remove_worker(subscriber.config.worker_name(rank))

    async def stop(self) -> None:
        for name in list(self._subscribers):
            await self.remove_endpoint(name, purge=False)
