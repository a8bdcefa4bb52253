"""ZMQ adapter for vLLM KV events: SUB for the live stream, DEALER for replays.

Moves bytes only; every decision (apply, replay, reset) is ``scheduler.core.kvingest``'s.
One ``KVEventSubscriber`` per endpoint (pod), with one SUB (and, while replaying, one
DEALER) per data-parallel rank: rank r publishes on the live port + r and replays on the
replay port + r (vLLM 0.33.0 ``ZmqEventPublisher``). In the index, rank 0 is the
endpoint's name and rank r > 0 is ``<name>#dp<r>``: each rank has its own KV cache, and the
scorer takes the best rank of an endpoint.

Wire (shared PROTOCOLS.md §1): live messages are exactly ``[topic, seq, payload]``;
replay requests ``[b"", start_seq]`` are answered by ``[b"", topic, seq, payload]``
(0.33.0) or ``[b"", seq, payload]`` (older), ended by seq ``0xFF * 8`` with an empty
payload. A publisher that restarts is reconnected to by ZMQ on its own; the dropped
connection resets that worker, and once the connection is back its history is replayed
from 0 (or, without a replay endpoint, its seq going back shows the restart).

All subscribers share one asyncio loop: no thread per pod. Under ``KVEventIngestService``
the live SUB sockets are received on one native thread where the native module is built
(``kv_receive_thread``); replays, monitors and every decision stay on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from scheduler.adapters.kv_receive_thread import (
    DEFAULT_MAX_PENDING_BYTES,
    NativeLiveReceiver,
    native_receiver_available,
)
from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.codec.kvevents import REPLAY_END_SEQ, decode_batch, encode_seq
from scheduler.core.index import PrefixIndex
from scheduler.core.kvingest import (
    Action,
    DropReason,
    IngestConfig,
    IngestStats,
    PublisherView,
    Step,
    WorkerIngest,
)
from scheduler.core.scheduler import Endpoint

log = logging.getLogger(__name__)

# Messages ZMQ may queue per publisher before it drops (silently: a seq gap). Every turn of
# the event loop moves what ZMQ holds into the receive queue, which is bounded in bytes
# (IngestConfig.max_queued_bytes), so ZMQ's queue only holds what arrives within one turn: a
# flood of 12,500 batches/s and turns of up to 20 ms is 250 messages. 1,000 (ZMQ's default)
# leaves 4x that and caps what ZMQ holds at 1,000 messages; vLLM's own 100,000
# (KVEventsConfig.hwm), which this matched before, let a flood park 230 MB here.
DEFAULT_RCVHWM = 1_000
# libzmq's default cap is 1,023 sockets per context, and a context keeps the cap it had when
# its first socket was made ("Too many open files" at the 1,024th, measured): a pool of
# 1,000 pods, each a SUB and, while replaying, a DEALER, would pass it.
MAX_ZMQ_SOCKETS = 65_536
# Back off reconnects to a dead pod up to this (ZMQ's default retries every 100 ms forever).
RECONNECT_IVL_MAX_MS = 5_000
_SEQ_FRAME_BYTES = 8
# Live messages handled per loop wake-up at most, and the CPU time after which the rest
# waits for the loop's next turn. A BlockStored batch of a 220 KB prompt (~55k token ids,
# 180 KB of msgpack) takes ~4 ms to decode and apply, so 64 of them in one turn held every
# ext_proc stream for a quarter of a second; with the budget a turn ends after ~1 ms, or
# after the one message that passed it.
LIVE_BURST = 64
LIVE_BUDGET_NS = 1_000_000
# Messages moved from ZMQ's queue to the receive queue per turn at most: a receive of a
# few-KB message takes a few microseconds, so a turn spends at most a few ms on it.
DRAIN_SLICE = 1024
# Python's objects around one waiting message (its list of three frames, their bytes headers,
# the queue's tuple): 251 bytes measured with tracemalloc; with malloc's chunk headers, 320.
QUEUED_MESSAGE_OVERHEAD = 320
# Free chunks malloc keeps among the waiting messages while a flood churns through the queue,
# as a share of what waits: a lone subscriber flooded with 100,000 batches of 2.3 KB peaked at
# 25.4 MB above its start against 22.7 MB of waiting messages and ZMQ queues (12% more); 25%
# leaves room for the machine's noise. Measured, not derived.
ALLOCATOR_SLACK = 0.25
# A receive queue this deep (or one that dropped), or a replay, returns the allocator's free
# pages to the system TRIM_INTERVAL_S after the last of them: glibc keeps freed chunks of many
# small messages in its arenas. Measured: 100,000 freed 2.3 KB messages with every 50th kept
# left 238 MB resident; malloc_trim(0) brought it to 26 MB in 17 ms (run off the event loop).
# After a 100,000-batch flood a lone subscriber stayed 26 MB above where it started until it
# was trimmed.
TRIM_AFTER_BYTES = 4 * 1024 * 1024
TRIM_INTERVAL_S = 1.0


def _glibc_malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``; None elsewhere (musl, macOS: nothing to call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_MALLOC_TRIM = _glibc_malloc_trim()


class _Trimmer:
    """Gives freed memory back to the system once KV-event traffic that left some behind (a
    deep receive queue, a replay) has been quiet for TRIM_INTERVAL_S: a flood drains its
    queue and runs replays many times, and only the end of it matters."""

    def __init__(self) -> None:
        self.pending: asyncio.TimerHandle | None = None
        self.trims = 0

    def touch(self) -> None:
        if _MALLOC_TRIM is None:
            return
        if self.pending is not None:
            self.pending.cancel()
        self.pending = asyncio.get_running_loop().call_later(TRIM_INTERVAL_S, self._trim)

    def _trim(self) -> None:
        assert _MALLOC_TRIM is not None
        self.pending = None
        self.trims += 1
        # ctypes lets go of the GIL for the call: the loop goes on while the arenas are walked.
        threading.Thread(target=_MALLOC_TRIM, name="malloc-trim", daemon=True).start()


TRIMMER = _Trimmer()


def shared_context() -> zmq.asyncio.Context:
    """The process's ZMQ context, with room for a socket per rank of a 1,000-pod pool. The
    cap takes effect only if no socket has been made on it yet: make this the first use."""
    context = zmq.asyncio.Context.instance()
    if context.get(zmq.MAX_SOCKETS) < MAX_ZMQ_SOCKETS:
        context.set(zmq.MAX_SOCKETS, MAX_ZMQ_SOCKETS)
    return context


def with_port_offset(endpoint: str, offset: int) -> str:
    """``tcp://host:5557`` -> ``tcp://host:<5557 + offset>`` (IPv6 hosts keep their brackets)."""
    if offset == 0:
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} has no numeric port to offset by data-parallel rank")
    return f"{head}:{int(port) + offset}"


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    name: str  # endpoint name, normally the model server's ip:port; the index's worker name
    endpoint: str  # live PUB address of rank 0, e.g. tcp://10.0.0.5:5557
    replay_endpoint: str | None = None  # replay ROUTER of rank 0, e.g. tcp://10.0.0.5:5558
    topic: str = ""  # subscription prefix; "" = everything the publisher sends
    data_parallel_size: int = 1
    ingest: IngestConfig = field(default_factory=IngestConfig)
    rcvhwm: int = DEFAULT_RCVHWM

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError("data_parallel_size must be at least 1")
        for rank in range(1, self.data_parallel_size):
            with_port_offset(self.endpoint, rank)
            if self.replay_endpoint is not None:
                with_port_offset(self.replay_endpoint, rank)

    def worker_name(self, rank: int) -> str:
        return self.name if rank == 0 else f"{self.name}#dp{rank}"

    @property
    def worker_names(self) -> list[str]:
        return [self.worker_name(rank) for rank in range(self.data_parallel_size)]


class ReceiveBudget:
    """Bytes of received messages waiting for ingest (queued, or held by ingest while a replay
    runs), over every publisher of a process."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0


class _Rank:
    """One publisher: its sockets, tasks and ingest state."""

    def __init__(self, config: SubscriberConfig, rank: int, index: PrefixIndex) -> None:
        self.rank = rank
        self.endpoint = with_port_offset(config.endpoint, rank)
        self.replay_endpoint = (
            None if config.replay_endpoint is None else with_port_offset(config.replay_endpoint, rank)
        )
        self.ingest = WorkerIngest(
            config.worker_name(rank),
            index,
            decode=decode_batch,
            replay_available=self.replay_endpoint is not None,
            config=config.ingest,
            context=f"kv events {self.endpoint} ({config.worker_name(rank)})",
        )
        self.sub: zmq.asyncio.Socket | None = None
        # The live SUB through pyzmq's blocking API (NOBLOCK only): read from a reader
        # callback on its file descriptor, not by an awaiting task (see ``_live_turn``).
        self.waiting: zmq.Socket[bytes] | None = None
        self.watched_fd: int | None = None
        self.next_turn: asyncio.Handle | None = None
        # The live SUB handed to the native receive thread instead (its target number).
        self.native_target: int | None = None
        self.replay_task: asyncio.Task[None] | None = None
        # ZMQ's reports of the live connection dropping (a monitor socket, PAIR).
        self.monitor: zmq.asyncio.Socket | None = None
        self.monitor_task: asyncio.Task[None] | None = None
        # Received messages waiting for ingest, and their bytes (bounded: see ``_enqueue``).
        self.queue: deque[tuple[list[bytes], int]] = deque()
        self.queued_bytes = 0
        self.peak_queued_bytes = 0
        # The queue grew past TRIM_AFTER_BYTES or dropped since it was last empty.
        self.deep = False
        # Live batches ingest holds while a replay runs, as last counted in the budget.
        self.held_bytes = 0


def receive_memory_bound(
    ingest: IngestConfig, *, publishers: int, message_bytes: int, rcvhwm: int = DEFAULT_RCVHWM
) -> int:
    """The most memory KV-event messages waiting for ingest hold, for ``publishers``
    publishers whose largest message is ``message_bytes``.

    Waiting: each publisher's receive queue and the live batches ingest holds while a replay
    runs, together at most ``max_queued_bytes`` (ingest's own ``max_buffered_bytes`` caps the
    latter alone), and over every publisher ``max_queued_bytes_total``, which only the replay
    buffers can pass (they are trimmed by their own bound, not by dropping). On top, per
    publisher: the one message a queue keeps whatever its size, and ZMQ's queues of the live
    SUB and the replay DEALER, ``rcvhwm`` messages each; and once, what the native receive
    thread holds between two wake-ups of the loop (``DEFAULT_MAX_PENDING_BYTES``).
    """
    own = max(ingest.max_queued_bytes, ingest.max_buffered_bytes)
    # What the native receive thread may hold for the loop between two wake-ups, over all.
    received = DEFAULT_MAX_PENDING_BYTES
    waiting = min(
        publishers * own, max(ingest.max_queued_bytes_total, publishers * ingest.max_buffered_bytes)
    )
    # The bounds count payload bytes; each waiting message also has its Python objects, and
    # malloc keeps freed chunks among the live ones while messages come and go.
    waiting += waiting // max(message_bytes, 1) * QUEUED_MESSAGE_OVERHEAD
    waiting = int(waiting * (1.0 + ALLOCATOR_SLACK))
    return received + waiting + publishers * (message_bytes + 2 * rcvhwm * message_bytes)


def subscriber_config(endpoint: Endpoint, *, ingest: IngestConfig | None = None) -> SubscriberConfig | None:
    """The subscription for a discovered endpoint; None when its pool publishes no KV events."""
    if endpoint.kv_events is None:
        return None
    return SubscriberConfig(
        name=endpoint.name,
        endpoint=endpoint.kv_events,
        replay_endpoint=endpoint.kv_replay,
        topic=endpoint.kv_topic,
        data_parallel_size=endpoint.data_parallel_size,
        ingest=ingest or IngestConfig(),
    )


# pyzmq's constants are enum members; combining an int with one builds a new member through
# the enum machinery each time (EnumType.__call__, Flag.__and__: 6% of the live path's samples
# at 1,000 subscriptions, py-spy over ``kvsched bench scrape``). Plain ints cost nothing.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


def _readable(socket: zmq.Socket[bytes]) -> bool:
    """A message waits in ZMQ's queue (asked without receiving: no zmq.Again to raise)."""
    return bool(cast(int, socket.getsockopt(_EVENTS)) & _POLLIN)


def _sizes(frames: list[bytes]) -> str:
    return "[" + ", ".join(str(len(frame)) for frame in frames[:8]) + (", ...]" if len(frames) > 8 else "]")


# Told (index worker, now) after a live batch moved that worker's slice of the index forward
# (``Scheduler.on_kv_batch``: speculative placements are confirmed or contradicted there).
BatchApplied = Callable[[str, float], None]
_INDEX_MOVED = frozenset({Action.APPLIED, Action.REPLAY_FINISHED})


class KVEventSubscriber:
    """Live stream plus replays for one endpoint, feeding the shared prefix index."""

    def __init__(
        self,
        config: SubscriberConfig,
        index: PrefixIndex,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_applied: BatchApplied | None = None,
        budget: ReceiveBudget | None = None,
        receiver: NativeLiveReceiver | None = None,
    ) -> None:
        self.config = config
        self.index = index
        # Receives the live sockets on its native thread; None: pyzmq on the event loop.
        self._receiver = receiver
        # Shared by the subscribers of one ingest service; a lone subscriber has its own.
        self.budget = budget or ReceiveBudget(config.ingest.max_queued_bytes_total)
        self._context = context or shared_context()
        self._clock = clock
        self._on_applied = on_applied
        self._ranks = [_Rank(config, rank, index) for rank in range(config.data_parallel_size)]
        self._started = False

    # --- stats ---------------------------------------------------------------------------

    @property
    def stats(self) -> IngestStats:
        """Totals over the ranks."""
        total = IngestStats()
        for rank in self._ranks:
            total.add(rank.ingest.stats)
        return total

    def rank_stats(self, rank: int) -> IngestStats:
        return self._ranks[rank].ingest.stats

    def snapshot(self) -> dict[str, Any]:
        """Plain data for a stats endpoint or metrics collector."""
        return {
            "name": self.config.name,
            "ranks": [
                {
                    "worker": rank.ingest.worker,
                    "endpoint": rank.endpoint,
                    "replay_endpoint": rank.replay_endpoint,
                    "next_seq": rank.ingest.next_seq,
                    "view_complete": rank.ingest.view_complete,
                    "replay_in_flight": rank.ingest.replay_in_flight,
                    "buffered": rank.ingest.buffered,
                    "queued_bytes": rank.queued_bytes,
                    "peak_queued_bytes": rank.peak_queued_bytes,
                    **rank.ingest.stats.as_dict(),
                }
                for rank in self._ranks
            ],
        }

    def views(self) -> list[PublisherView]:
        """Each rank's view (``WorkerIngest.view``) as of now."""
        now = self._clock()
        return [rank.ingest.view(now, endpoint=self.config.name, rank=rank.rank) for rank in self._ranks]

    def addresses(self) -> list[tuple[str, str | None]]:
        """Per rank, the live and replay addresses subscribed to."""
        return [(rank.endpoint, rank.replay_endpoint) for rank in self._ranks]

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        topic = self.config.topic.encode("utf-8")
        for rank in self._ranks:
            sub = self._context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            rank.monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sub.connect(rank.endpoint)
            rank.sub = sub
            rank.monitor_task = asyncio.create_task(
                self._watch_connection(rank, rank.monitor), name=f"kv-monitor {rank.endpoint}"
            )
            if self._receiver is not None:
                try:
                    rank.native_target = self._receiver.add(
                        sub,
                        partial(self._enqueue, rank),
                        partial(self._apply_queued, rank),
                        partial(self._apply_now, rank),
                    )
                    continue
                except OSError as exc:
                    # The socket is still Python's: this rank is received on the loop instead.
                    log.warning("%s: %s; received on the event loop instead", rank.endpoint, exc)
            rank.waiting = zmq.Socket.shadow(sub.underlying)
            rank.watched_fd = cast(int, rank.waiting.getsockopt(zmq.FD))
            loop = asyncio.get_running_loop()
            loop.add_reader(rank.watched_fd, self._live_ready, rank)
            # ZMQ's descriptor signals changes, not levels: what arrived before it was
            # watched is looked for once now.
            rank.next_turn = loop.call_soon(self._live_turn, rank)

    async def stop(self) -> None:
        for rank in self._ranks:
            if rank.native_target is not None:
                assert self._receiver is not None
                # Returns once the thread let go of the socket: it is closed below.
                self._receiver.remove(rank.native_target)
                rank.native_target = None
            if rank.watched_fd is not None:
                asyncio.get_running_loop().remove_reader(rank.watched_fd)
                rank.watched_fd = None
            if rank.next_turn is not None:
                rank.next_turn.cancel()
                rank.next_turn = None
            rank.waiting = None
        tasks = [
            task for rank in self._ranks for task in (rank.replay_task, rank.monitor_task) if task is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for rank in self._ranks:
            rank.replay_task = rank.monitor_task = None
            if rank.monitor is not None:
                assert rank.sub is not None
                rank.sub.disable_monitor()
                rank.monitor.close(linger=0)
                rank.monitor = None
            if rank.sub is not None:
                rank.sub.close(linger=0)
                rank.sub = None
            self.budget.used -= rank.queued_bytes + rank.held_bytes
            rank.queue.clear()
            rank.queued_bytes = rank.held_bytes = 0
        self._started = False

    async def __aenter__(self) -> KVEventSubscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- live stream ---------------------------------------------------------------------

    def _live_ready(self, rank: _Rank) -> None:
        """The SUB's descriptor turned readable: a turn now, unless one is already due."""
        if rank.next_turn is None:
            self._live_turn(rank)

    def _live_turn(self, rank: _Rank) -> None:
        # Each turn first moves everything ZMQ holds into the receive queue (bounded in
        # bytes: beyond it a message is dropped, a gap like any lost message), with NOBLOCK
        # receives: no future and no task step per message. Receiving is cheap next to
        # decoding, so under a flood ZMQ's queue stays near empty and what waits is bounded by
        # the receive queue, not by rcvhwm messages of any size (a 100,000-batch flood left
        # 230 MB in ZMQ's queue before). Then a burst of the queue is applied, bounded in
        # count and in time so that a busy publisher cannot starve the loop; what is left
        # gets the loop's next turn (call_soon), after everything else that is ready.
        #
        # Why a reader callback and not a task awaiting recv_multipart: at 1,000
        # subscriptions each batch arrives on its own, and the task paid a future, a task
        # step and zmq.asyncio's poll bookkeeping per batch, then a second loop turn to
        # yield. ZMQ's descriptor is edge-like (it signals that EVENTS changed), so the
        # reader waits for it again only once ZMQ's queue was seen empty.
        rank.next_turn = None
        waiting = rank.waiting
        if waiting is None:
            return
        seen_empty = self._drain(rank, waiting)
        more = self._apply_queued(rank, time.perf_counter_ns() + LIVE_BUDGET_NS)
        if more or not seen_empty:
            rank.next_turn = asyncio.get_running_loop().call_soon(self._live_turn, rank)

    def _apply_queued(self, rank: _Rank, deadline_ns: int) -> bool:
        """Applies a burst of the receive queue, bounded in count and by ``deadline_ns``
        (``time.perf_counter_ns``); True when messages are left for a later turn."""
        clock = time.perf_counter_ns
        for _ in range(LIVE_BURST):
            if not rank.queue:
                break
            self._on_live_frames(rank, self._dequeue(rank))
            if clock() >= deadline_ns:
                break
        if rank.deep and not rank.queue:
            rank.deep = False
            TRIMMER.touch()
        return bool(rank.queue)

    def _drain(self, rank: _Rank, waiting: zmq.Socket[bytes]) -> bool:
        """Moves what ZMQ holds into the receive queue; True when its queue was seen empty
        (the descriptor then signals the next message). A wake-up of the descriptor almost
        always means a message: it is received at once, and EVENTS asked only after it
        (each ask costs ~2 us in libzmq, which processes its command queue for it; a profile
        of 1,000 subscriptions had a third of the live path's time in three asks a batch)."""
        for _ in range(DRAIN_SLICE):
            try:
                frames = waiting.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return True
            self._enqueue(rank, frames)
            if not _readable(waiting):
                return True
        return False

    def _apply_now(self, rank: _Rank, seq: int, payload: bytes, may_apply: bool) -> bool:
        """A live batch the native receive thread handed over, applied at once when
        ``may_apply``; queued instead (False) otherwise and while a replay runs: ingest then
        holds live batches, and the receive queue's byte bounds must decide what is dropped
        first."""
        if not may_apply or rank.ingest.replay_in_flight:
            self._enqueue(rank, [b"", seq.to_bytes(_SEQ_FRAME_BYTES, "big"), payload])
            return False
        self._on_live(rank, seq, payload)
        return True

    def _enqueue(self, rank: _Rank, frames: list[bytes]) -> None:
        size = sum(len(frame) for frame in frames)
        budget = self.budget
        queue = rank.queue
        queue.append((frames, size))
        rank.queued_bytes += size
        budget.used += size
        # Over a bound, the oldest messages go: the newest one stays, so the hole is seen
        # as a gap when it is applied and a replay asked at once (dropping the newest would
        # hide a hole at the end of a flood until the publisher's next batch). A queue of
        # one message keeps it whatever its size (it is in memory already; ingest skips an
        # oversized batch undecoded), so a publisher always makes progress.
        limit = self.config.ingest.max_queued_bytes
        while len(queue) > 1 and (rank.queued_bytes + rank.held_bytes > limit or budget.used > budget.limit):
            reason: DropReason = (
                "publisher_bytes" if rank.queued_bytes + rank.held_bytes > limit else "total_bytes"
            )
            _, dropped = queue.popleft()
            rank.queued_bytes -= dropped
            budget.used -= dropped
            rank.ingest.dropped_on_receive(reason, dropped)
            rank.deep = True
        if rank.queued_bytes > TRIM_AFTER_BYTES:
            rank.deep = True
        rank.peak_queued_bytes = max(rank.peak_queued_bytes, rank.queued_bytes)
        budget.peak = max(budget.peak, budget.used)

    def _dequeue(self, rank: _Rank) -> list[bytes]:
        frames, size = rank.queue.popleft()
        rank.queued_bytes -= size
        self.budget.used -= size
        return frames

    async def _watch_connection(self, rank: _Rank, monitor: zmq.asyncio.Socket) -> None:
        """A dropped connection to the publisher, and its coming back, are news for the core
        (``on_disconnected``, ``on_connected``); ZMQ reconnects by itself."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            try:
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._follow(rank, rank.ingest.on_disconnected(self._clock()))
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._follow(rank, rank.ingest.on_connected(self._clock()))
            except Exception:  # the subscription must outlive a fault of its own
                rank.ingest.stats.internal_errors += 1
                log.exception("%s: error handling a connection event", rank.endpoint)

    def _on_live_frames(self, rank: _Rank, frames: list[bytes]) -> None:
        if len(frames) != 3:
            rank.ingest.malformed_frame(
                f"{len(frames)} frames of sizes {_sizes(frames)}; expected [topic, seq, payload]"
            )
            return
        _topic, seq_frame, payload = frames
        if len(seq_frame) != _SEQ_FRAME_BYTES:
            rank.ingest.malformed_frame(f"seq frame of {len(seq_frame)} bytes; frame sizes {_sizes(frames)}")
            return
        self._on_live(rank, int.from_bytes(seq_frame, "big"), payload)

    def _on_live(self, rank: _Rank, seq: int, payload: bytes) -> None:
        # Asked inline: two calls per batch were ~5% of the live path at 1,000 publishers.
        started = STAGE_TIMES.start() if STAGE_TIMES.enabled else 0
        ingest = rank.ingest
        try:
            now = self._clock()
            step = ingest.on_live(seq, payload, now)
            self._follow(rank, step)
            if self._on_applied is not None and step.action in _INDEX_MOVED:
                self._on_applied(ingest.worker, now)
        except Exception:  # one bad message must never end the stream
            ingest.stats.internal_errors += 1
            if ingest.stats.internal_errors == 1:
                log.exception(
                    "%s: error handling a KV-event message; further ones only counted", rank.endpoint
                )
        finally:
            if started:
                STAGE_TIMES.stop("kv_ingest", started)

    def _follow(self, rank: _Rank, step: Step) -> None:
        """Carry out the I/O side of a core decision."""
        # What ingest holds while a replay runs counts against the same bounds as the queue.
        held = rank.ingest.buffered_bytes
        self.budget.used += held - rank.held_bytes
        rank.held_bytes = held
        if not step.abandon_replay and step.replay_from is None:
            return  # nearly every batch: asyncio.current_task() alone was 6% of the live path
        current = asyncio.current_task()
        if step.abandon_replay and rank.replay_task is not None and rank.replay_task is not current:
            rank.replay_task.cancel()
            rank.replay_task = None
        if step.replay_from is not None:
            old = rank.replay_task
            if old is not None and old is not current and not old.done():
                old.cancel()
            rank.replay_task = asyncio.create_task(
                self._replay(rank, step.replay_from), name=f"kv-replay {rank.replay_endpoint}"
            )

    # --- replay --------------------------------------------------------------------------

    async def _replay(self, rank: _Rank, start_seq: int) -> None:
        ingest = rank.ingest
        assert rank.replay_endpoint is not None
        # A fresh DEALER per replay: replies to an abandoned replay die with its socket.
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        try:
            dealer.connect(rank.replay_endpoint)
            await dealer.send_multipart([b"", encode_seq(start_seq)])
            while True:
                deadline = ingest.replay_deadline
                if deadline is None:
                    return
                remaining_ms = max(0.0, deadline - self._clock()) * 1000.0
                if not await dealer.poll(timeout=remaining_ms):
                    step = ingest.check_replay_timeout(self._clock())
                    if step is not None:
                        self._follow(rank, step)
                        return
                    continue
                frames = await dealer.recv_multipart()
                if len(frames) == 4 and frames[0] == b"":
                    seq_frame, payload = frames[2], frames[3]
                elif len(frames) == 3 and frames[0] == b"":
                    seq_frame, payload = frames[1], frames[2]
                else:
                    ingest.malformed_frame(f"replay reply of {len(frames)} frames of sizes {_sizes(frames)}")
                    continue
                if len(seq_frame) != _SEQ_FRAME_BYTES:
                    ingest.malformed_frame(f"replay seq frame of {len(seq_frame)} bytes")
                    continue
                seq = int.from_bytes(seq_frame, "big")
                now = self._clock()
                if seq == REPLAY_END_SEQ:
                    self._follow(rank, ingest.on_replay_end(now))
                    return
                step = ingest.on_replay_batch(seq, payload, now)
                if step.action is Action.IGNORED:
                    # Stale, or the answer broke off and the replay is asked again from the
                    # hole on a fresh socket (this one's later replies are not wanted).
                    if step.replay_from is not None:
                        self._follow(rank, step)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken replay must not take the subscriber down
            ingest.stats.internal_errors += 1
            if ingest.stats.internal_errors == 1:
                log.exception("%s: replay failed; further errors only counted", rank.replay_endpoint)
            self._follow(rank, ingest.on_replay_failed(repr(exc), self._clock()))
        finally:
            dealer.close(linger=0)
            TRIMMER.touch()


class KVEventIngestService:
    """Subscribers of all endpoints, keyed by endpoint name; discovery adds and removes them."""

    def __init__(
        self,
        index: PrefixIndex,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_applied: BatchApplied | None = None,
        max_queued_bytes_total: int | None = None,
        receive_thread: bool = True,
    ) -> None:
        self.index = index
        # The live sockets on one native thread where it can run (kv_receive_thread), made
        # with the first subscription; receive_thread False, or no native module: each on
        # the event loop with pyzmq.
        available, why = native_receiver_available() if receive_thread else (False, "receive_thread off")
        self.receive_mode = "native" if available else "python"
        self.receive_mode_reason = why
        self._receiver: NativeLiveReceiver | None = None
        self._context = context or shared_context()
        self._clock = clock
        self._on_applied = on_applied
        self._subscribers: dict[str, KVEventSubscriber] = {}
        # Received bytes waiting for ingest over every subscriber (IngestConfig.max_queued_bytes_total).
        if max_queued_bytes_total is None:
            max_queued_bytes_total = IngestConfig().max_queued_bytes_total
        self.budget = ReceiveBudget(max_queued_bytes_total)

    def _live_receiver(self) -> NativeLiveReceiver | None:
        if self._receiver is None and self.receive_mode == "native":
            try:
                self._receiver = NativeLiveReceiver()
            except OSError as exc:
                self.receive_mode, self.receive_mode_reason = "python", str(exc)
                log.warning("KV events received on the event loop (pyzmq): %s", exc)
        return self._receiver

    @property
    def receiver_stats(self) -> dict[str, int] | None:
        """The native receive thread's totals; None when the sockets are on the event loop."""
        return None if self._receiver is None else self._receiver.stats()

    @property
    def subscribers(self) -> dict[str, KVEventSubscriber]:
        return dict(self._subscribers)

    @property
    def endpoints(self) -> list[str]:
        return sorted(self._subscribers)

    async def add_endpoint(self, config: SubscriberConfig) -> KVEventSubscriber:
        """Subscribe to an endpoint; a changed config for a known name replaces its subscriber."""
        current = self._subscribers.get(config.name)
        if current is not None:
            if current.config == config:
                return current
            await self.remove_endpoint(config.name)
        subscriber = KVEventSubscriber(
            config,
            self.index,
            context=self._context,
            clock=self._clock,
            on_applied=self._on_applied,
            budget=self.budget,
            receiver=self._live_receiver(),
        )
        self._subscribers[config.name] = subscriber
        await subscriber.start()
        return subscriber

    async def remove_endpoint(self, name: str, *, purge: bool = True) -> bool:
        """Unsubscribe; ``purge`` also drops the endpoint's workers from the index."""
        subscriber = self._subscribers.pop(name, None)
        if subscriber is None:
            return False
        await subscriber.stop()
        if purge:
            for worker in subscriber.config.worker_names:
                self.index.remove_worker(worker)
        return True

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: sub.snapshot() for name, sub in sorted(self._subscribers.items())}

    def views(self, endpoints: Sequence[Endpoint]) -> list[PublisherView]:
        """One view per data-parallel rank of each endpoint, in ``endpoints`` order."""
        return publisher_views(endpoints, self)

    def totals(self) -> IngestStats:
        total = IngestStats()
        for subscriber in self._subscribers.values():
            total.add(subscriber.stats)
        return total

    async def stop(self) -> None:
        """Stop every subscriber; the index keeps their entries."""
        for name in list(self._subscribers):
            await self.remove_endpoint(name, purge=False)
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None


def publisher_views(
    endpoints: Sequence[Endpoint], service: KVEventIngestService | None
) -> list[PublisherView]:
    """Every endpoint's KV-event view per rank: subscribed ones as their ingest sees them,
    endpoints that publish no events as ``fallback``. ``service`` None: ingest is off."""
    subscribers = {} if service is None else service.subscribers
    views: list[PublisherView] = []
    for endpoint in endpoints:
        subscriber = subscribers.get(endpoint.name)
        if subscriber is not None:
            views.extend(subscriber.views())
            continue
        for rank, worker in enumerate(endpoint.index_workers()):
            if endpoint.kv_events is None:
                views.append(PublisherView.without_events(endpoint.name, rank, worker))
            else:
                # Discovery has the endpoint and the subscription is being set up.
                views.append(
                    PublisherView(endpoint.name, rank, worker, "degraded", "not subscribed yet", False)
                )
    return views
