"""KV-event ingest over real ZMQ sockets on 127.0.0.1.

The publisher side speaks vLLM 0.33.0's wire (and the older replay framing) from a real
PUB-family socket and a real replay ROUTER, with payloads from the codec's encode_batch,
driven by hand so tests can drop, corrupt, restart and withhold replies. The subscriber
under test is the production one.

ZMQ's slow joiner: a PUB drops what it sends before a subscriber's subscription reached
it. The test publisher is an XPUB (a PUB that also hands the subscriptions it receives to
its owner; subscribers cannot tell it from a PUB), and every test waits for the
subscription to arrive before publishing, so no message is lost by accident. One test
uses the simulator's plain-PUB publisher instead and keeps publishing until the
subscriber has seen a batch, relying on the late-join replay to recover the rest.

Every test runs twice: with the live sockets received on the event loop (pyzmq), and on the
native receive thread (``kv_receive_thread``) where it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio
from test_kvingest import CacheModel, assert_same_view, reference

from scheduler.adapters.kv_receive_thread import NativeLiveReceiver, native_receiver_available
from scheduler.adapters.kv_subscriber import (
    KVEventIngestService,
    KVEventSubscriber,
    SubscriberConfig,
    with_port_offset,
)
from scheduler.codec.kvevents import REPLAY_END_FRAME, encode_batch, encode_seq
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig, PrefixIndex, PrefixMatch
from scheduler.core.kvingest import IngestConfig
from scheduler.sim.publisher import KVEventPublisher

BLOCK = 4
TOPIC = b"kv@10.0.0.1:8000@model"
HOST = "127.0.0.1"


def prompt(n_blocks: int, base: int = 1) -> list[int]:
    return list(range(base, base + n_blocks * BLOCK))


def chain_batches(tokens: list[int], first_hash: int = 100) -> list[EventBatch]:
    """One BlockStored per block, each chained to the previous one."""
    batches = []
    parent = None
    for i in range(len(tokens) // BLOCK):
        block_hash = first_hash + i
        stored = BlockStored([block_hash], parent, tokens[i * BLOCK : (i + 1) * BLOCK], BLOCK)
        batches.append(EventBatch(float(i), [stored], 0))
        parent = block_hash
    return batches


class FakeVLLMPublisher:
    """vLLM's ZmqEventPublisher on the wire, with knobs for loss, restarts and replay faults."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        replay: bool = True,
        legacy_replay: bool = False,
        port: int = 0,
        replay_port: int = 0,
    ) -> None:
        self.ctx = ctx
        self.with_replay = replay
        self.legacy_replay = legacy_replay
        self.port = port
        self.replay_port: int | None = replay_port if replay else None
        self.buffer: dict[int, bytes] = {}
        self.next_seq = 0
        self.answer_replays = True
        self.replay_requests: list[int] = []
        # Requests left unanswered (answer_replays False), for ``answer_held``.
        self.held: list[tuple[bytes, int]] = []
        self.pub: zmq.asyncio.Socket | None = None
        self.router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    def _bind(self, sock: zmq.asyncio.Socket, port: int) -> int:
        if port:
            sock.bind(f"tcp://{HOST}:{port}")
            return port
        return sock.bind_to_random_port(f"tcp://{HOST}")

    def open(self) -> FakeVLLMPublisher:
        pub = self.pub = self.ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        # vLLM's ZmqEventPublisher sets SNDHWM to KVEventsConfig.hwm (100,000); ZMQ's default
        # of 1,000 drops a burst of thousands of batches whenever the I/O thread falls behind.
        pub.setsockopt(zmq.SNDHWM, 100_000)
        self.port = self._bind(pub, self.port)
        if self.with_replay:
            router = self.router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            self.replay_port = self._bind(router, self.replay_port or 0)
            self._task = asyncio.create_task(self._serve_replay())
        return self

    @property
    def endpoint(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{HOST}:{self.replay_port}"

    async def subscribed(self) -> bytes:
        """Wait until a subscriber's subscription arrived: from then on nothing is dropped."""
        assert self.pub is not None
        message = await asyncio.wait_for(self.pub.recv(), 10)
        assert message[:1] == b"\x01", message
        return message[1:]

    async def publish(self, batch: EventBatch, *, drop: bool = False, legacy: bool = False) -> int:
        assert self.pub is not None
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(batch, legacy=legacy)
        self.buffer[seq] = payload
        if not drop:
            await self.pub.send_multipart([TOPIC, encode_seq(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        assert self.pub is not None
        await self.pub.send_multipart(frames)

    async def restart(self) -> None:
        """A new engine process on the same ports: seq from 0, empty replay buffer."""
        await self.close()
        self.next_seq = 0
        self.buffer.clear()
        # ZMQ releases a closed socket's listening port in its I/O thread, a moment later.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                self.open()
                return
            except zmq.ZMQError:
                await self.close()
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _serve_replay(self) -> None:
        assert self.router is not None
        router = self.router
        while True:
            identity, empty, start_frame = await router.recv_multipart()
            assert empty == b"" and len(start_frame) == 8
            start = int.from_bytes(start_frame, "big")
            self.replay_requests.append(start)
            if not self.answer_replays:
                self.held.append((identity, start))
                continue
            await self._answer(identity, start)

    async def _answer(self, identity: bytes, start: int) -> None:
        assert self.router is not None
        head = [identity, b""] if self.legacy_replay else [identity, b"", TOPIC]
        for seq in sorted(s for s in self.buffer if s >= start):
            await self.router.send_multipart([*head, encode_seq(seq), self.buffer[seq]])
        await self.router.send_multipart([*head, REPLAY_END_FRAME, b""])

    async def answer_held(self) -> int:
        """Answer the replay requests held so far; how many there were."""
        held, self.held = self.held, []
        for identity, start in held:
            await self._answer(identity, start)
        return len(held)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sock in (self.pub, self.router):
            if sock is not None:
                sock.close(linger=0)
        self.pub = self.router = None


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (the sockets are asynchronous by nature)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


_RECEIVER: list[NativeLiveReceiver | None] = [None]


def receiver() -> NativeLiveReceiver | None:
    """The receive thread this run of the test hands live sockets to (None: pyzmq)."""
    return _RECEIVER[0]


@pytest.fixture(autouse=True, params=["pyzmq", "native"])
async def live_receive(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "native":
        available, why = native_receiver_available()
        if not available:
            pytest.skip(f"native receive thread: {why}")
        _RECEIVER[0] = NativeLiveReceiver()
    try:
        yield request.param
    finally:
        if _RECEIVER[0] is not None:
            _RECEIVER[0].close()
            _RECEIVER[0] = None


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def cleanup() -> AsyncIterator[list[KVEventSubscriber | FakeVLLMPublisher]]:
    """Subscribers and publishers to close after the test, whatever its outcome."""
    items: list[KVEventSubscriber | FakeVLLMPublisher] = []
    yield items
    for item in reversed(items):
        await (item.stop() if isinstance(item, KVEventSubscriber) else item.close())


def make_index() -> PrefixIndex:
    return PrefixIndex(IndexConfig(block_size=BLOCK))


async def subscribe(
    index: PrefixIndex,
    pubs: list[FakeVLLMPublisher],
    ctx: zmq.asyncio.Context,
    cleanup: list[KVEventSubscriber | FakeVLLMPublisher],
    name: str = "w",
    **extra: object,
) -> KVEventSubscriber:
    config = SubscriberConfig(
        name, pubs[0].endpoint, pubs[0].replay_endpoint, topic="kv@", data_parallel_size=len(pubs), **extra
    )  # type: ignore[arg-type]
    sub = KVEventSubscriber(config, index, context=ctx, receiver=receiver())
    cleanup.append(sub)
    # A subscription asks for the publisher's history when it first connects
    # (``WorkerIngest.on_connected``): that replay is answered and ends before the test's
    # own batches, so each test starts from a settled view and counts only its own replays.
    answering = [pub.answer_replays for pub in pubs]
    for pub in pubs:
        pub.answer_replays = True
    await sub.start()
    for pub in pubs:
        assert await pub.subscribed() == b"kv@"
    with_replay = sum(1 for pub in pubs if pub.with_replay)
    await until(lambda: sub.stats.replays_completed + sub.stats.replays_failed >= with_replay)
    for pub, answer in zip(pubs, answering, strict=True):
        pub.answer_replays = answer
        pub.replay_requests.clear()
    return sub


def publisher(
    ctx: zmq.asyncio.Context, cleanup: list[KVEventSubscriber | FakeVLLMPublisher], **kw: object
) -> FakeVLLMPublisher:
    pub = FakeVLLMPublisher(ctx, **kw)  # type: ignore[arg-type]
    cleanup.append(pub)
    return pub.open()


@pytest.mark.parametrize("legacy", [False, True])
async def test_in_order_batches_are_applied(ctx: zmq.asyncio.Context, cleanup: list, legacy: bool) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    tokens = prompt(4)
    for batch in chain_batches(tokens):
        await pub.publish(batch, legacy=legacy)
    await until(lambda: sub.stats.batches_applied == 4)
    assert index.match_tokens(tokens)["w"] == PrefixMatch(4, 4, 0, 0)
    stats = sub.stats
    assert (stats.gaps, stats.resets, stats.malformed_frames, stats.malformed_payloads) == (0, 0, 0, 0)
    assert sub.snapshot()["ranks"][0]["view_complete"] is True


@pytest.mark.parametrize("legacy_replay", [False, True])
async def test_gaps_are_replayed_and_the_index_equals_no_loss(
    ctx: zmq.asyncio.Context, cleanup: list, legacy_replay: bool
) -> None:
    model = CacheModel(21)
    batches = model.batches(60)
    index = make_index()
    pub = publisher(ctx, cleanup, legacy_replay=legacy_replay)
    sub = await subscribe(index, [pub], ctx, cleanup)
    dropped = {5, 6, 7, 30, 41}  # lost to the PUB high-water mark; still in the replay buffer
    for seq, batch in enumerate(batches):
        await pub.publish(batch, drop=seq in dropped, legacy=seq % 2 == 1)
    await until(
        lambda: sub.stats.batches_applied == 60 and not sub.snapshot()["ranks"][0]["replay_in_flight"]
    )
    stats = sub.stats
    assert stats.gaps == len(pub.replay_requests) >= 1
    assert set(pub.replay_requests) <= {5, 30, 41}
    assert stats.replays_completed == stats.replays_requested and stats.resets == 0
    assert_same_view(index, reference(batches, "w"), model.prompts, "w")


async def test_gap_without_replay_resets_only_that_worker(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    index = make_index()
    other = chain_batches(prompt(2, base=500), first_hash=900)
    for batch in other:
        index.apply_batch("other", batch)
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await pub.publish(batches[1])
    await until(lambda: sub.stats.batches_applied == 2)
    assert index.match_tokens(tokens)["w"].total_blocks == 2
    await pub.publish(EventBatch(9.0, [BlockRemoved([101])]), drop=True)
    fresh = prompt(1, base=300)
    await pub.publish(EventBatch(10.0, [BlockStored([777], None, fresh, BLOCK)]))
    await until(lambda: sub.stats.batches_applied == 3)
    assert (sub.stats.resets, sub.stats.lost_batches) == (1, 1)
    assert "w" not in index.match_tokens(tokens)  # unknown after the loss: forgotten
    assert index.match_tokens(fresh)["w"].total_blocks == 1  # the new batch applied
    assert index.match_tokens(prompt(2, base=500))["other"].total_blocks == 2


@pytest.mark.parametrize("hash_mode", ["own", "vllm"])
async def test_a_block_chained_onto_a_lost_batch_is_an_orphan_in_both_hash_modes(
    ctx: zmq.asyncio.Context, cleanup: list, hash_mode: str
) -> None:
    # vLLM's own scenario: a batch lost on the PUB socket and no replay endpoint; the next
    # batch chains onto the lost block. vLLM mode publishes the engine's sha256_cbor hashes.
    index = PrefixIndex(IndexConfig(block_size=BLOCK, hash_mode=hash_mode))  # type: ignore[arg-type]
    tokens = prompt(3)
    first = list(index.request_keys(tokens)) if hash_mode == "vllm" else [100, 101, 102]
    batches = _chain_with(tokens, first)
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    await pub.publish(batches[0])
    await pub.publish(batches[1], drop=True)
    await pub.publish(batches[2])
    await until(lambda: sub.stats.batches_applied == 2)
    assert (sub.stats.resets, sub.stats.lost_batches, sub.stats.orphans) == (1, 1, 1)
    assert index.num_blocks == 0 and not sub.snapshot()["ranks"][0]["view_complete"]


def _chain_with(tokens: list[int], hashes: list[int]) -> list[EventBatch]:
    return [
        EventBatch(
            float(i),
            [BlockStored([h], hashes[i - 1] if i else None, tokens[i * BLOCK : (i + 1) * BLOCK], BLOCK)],
            0,
        )
        for i, h in enumerate(hashes)
    ]


async def test_replay_that_cannot_cover_the_gap_resets(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup)
    sub = await subscribe(index, [pub], ctx, cleanup)
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await until(lambda: sub.stats.batches_applied == 1)
    lost = await pub.publish(batches[1], drop=True)
    del pub.buffer[lost]  # older than the publisher's buffer_steps
    other = prompt(1, base=70)
    await pub.publish(EventBatch(2.0, [BlockStored([55], None, other, BLOCK)]))
    # The replay asked at the first connection, then the gap's.
    await until(lambda: sub.stats.replays_completed == 2 and sub.stats.batches_applied == 2)
    assert (sub.stats.resets, sub.stats.lost_batches) == (1, 1)
    assert "w" not in index.match_tokens(tokens)
    assert index.match_tokens(other)["w"].total_blocks == 1


async def test_replay_without_answer_times_out_and_resets(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup)
    pub.answer_replays = False
    sub = await subscribe(index, [pub], ctx, cleanup, ingest=IngestConfig(replay_timeout_s=0.2))
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await until(lambda: sub.stats.batches_applied == 1)
    await pub.publish(batches[1], drop=True)
    fresh = prompt(1, base=90)
    await pub.publish(EventBatch(2.0, [BlockStored([66], None, fresh, BLOCK)]))
    await until(lambda: sub.stats.replays_failed == 1 and sub.stats.batches_applied == 2)
    assert pub.replay_requests == [1]
    assert sub.stats.resets == 1
    assert "w" not in index.match_tokens(tokens) and index.match_tokens(fresh)["w"].total_blocks == 1


async def test_publisher_restart_resets_then_applies(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    old = prompt(2)
    for batch in chain_batches(old):
        await pub.publish(batch)
    await until(lambda: sub.stats.batches_applied == 2)
    await pub.restart()  # new engine process on the same port; ZMQ reconnects by itself
    assert await pub.subscribed() == b"kv@"
    new = prompt(1, base=50)
    await pub.publish(EventBatch(0.0, [BlockStored([5], None, new, BLOCK)]))
    await until(lambda: sub.stats.batches_applied == 3)
    assert (sub.stats.restarts, sub.stats.resets) == (1, 1)
    assert "w" not in index.match_tokens(old)
    assert index.match_tokens(new)["w"].total_blocks == 1


async def test_malformed_frames_and_payloads_are_counted_and_skipped(
    ctx: zmq.asyncio.Context, cleanup: list, caplog: pytest.LogCaptureFixture
) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    tokens = prompt(1)
    await pub.send_raw([TOPIC, b"\x00\x01", b"payload"])  # short seq frame
    await pub.send_raw([TOPIC, encode_seq(0), b"a", b"b"])  # four frames
    await pub.send_raw([TOPIC, encode_seq(0)])  # two frames
    await pub.publish(EventBatch(0.0, [BlockStored([1], None, tokens, BLOCK)]))
    await pub.send_raw([TOPIC, encode_seq(1), b"\xc1 not msgpack"])
    await pub.send_raw([TOPIC, encode_seq(2), msgpack.packb({"not": "a batch"})])
    bad_event = msgpack.packb([1.0, [{"type": "Bogus"}, {"type": "BlockRemoved", "block_hashes": [1]}], 0])
    await pub.send_raw([TOPIC, encode_seq(3), bad_event])
    pub.next_seq = 4
    later = prompt(1, base=40)
    await pub.publish(EventBatch(4.0, [BlockStored([2], None, later, BLOCK)]))
    await until(lambda: sub.stats.batches_applied == 3)
    stats = sub.stats
    assert (stats.malformed_frames, stats.malformed_payloads, stats.bad_events) == (3, 2, 1)
    # The lost payloads reset the worker; the removal in batch 3 then found nothing to remove.
    assert stats.resets == 1 and "w" not in index.match_tokens(tokens)
    assert index.match_tokens(later)["w"].total_blocks == 1  # the subscriber kept serving
    frame_logs = [r for r in caplog.records if "malformed ZMQ message" in r.getMessage()]
    assert len(frame_logs) == 1 and "kv events tcp://127.0.0.1" in frame_logs[0].getMessage()


async def test_tiers_groups_duplicates_and_clear_through_the_wire(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    tokens = prompt(3)
    events = [
        BlockStored([1, 2], None, tokens[: 2 * BLOCK], BLOCK, medium=Tier.CPU),
        BlockStored([1], None, tokens[:BLOCK], BLOCK, medium=Tier.GPU),
        BlockStored([1], None, tokens[:BLOCK], BLOCK, medium=Tier.GPU),  # duplicate store
        BlockStored([3], 2, tokens[2 * BLOCK :], BLOCK, medium=Tier.STORAGE),
        # Hybrid model: a sliding-window group reports the same bare hash; it is not a prefix.
        BlockStored([1], None, tokens[:BLOCK], BLOCK, group_idx=1, kv_cache_spec_kind="sliding_window"),
    ]
    await pub.publish(EventBatch(0.0, events, 0))
    await until(lambda: sub.stats.batches_applied == 1)
    assert index.match_tokens(tokens)["w"] == PrefixMatch(3, 1, 1, 1)
    await pub.publish(EventBatch(1.0, [BlockRemoved([1], Tier.GPU)], 0), legacy=True)
    # group_idx exists only in the tagged-map encoding (legacy arrays end at medium).
    await pub.publish(EventBatch(2.0, [BlockRemoved([1], Tier.GPU, group_idx=1)], 0))
    await until(lambda: sub.stats.batches_applied == 3)
    assert index.match_tokens(tokens)["w"] == PrefixMatch(3, 1, 1, 1)  # one GPU reference left
    await pub.publish(EventBatch(3.0, [BlockRemoved([1], Tier.GPU)], 0))
    await until(lambda: sub.stats.batches_applied == 4)
    assert index.match_tokens(tokens)["w"] == PrefixMatch(3, 0, 2, 1)
    await pub.publish(EventBatch(4.0, [AllBlocksCleared()], 0), legacy=True)
    await until(lambda: sub.stats.batches_applied == 5)
    assert index.match_tokens(tokens) == {}


async def test_late_joiner_catches_up_from_the_simulator_publisher(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = KVEventPublisher(topic=TOPIC.decode(), context=ctx)
    await pub.start()
    sub: KVEventSubscriber | None = None
    try:
        tokens = prompt(8)
        batches = chain_batches(tokens)
        await pub.publish(batches[0].events)  # before any subscriber existed
        config = SubscriberConfig("w", pub.endpoint, pub.replay_endpoint, topic="kv@")
        sub = KVEventSubscriber(config, index, context=ctx, receiver=receiver())
        await sub.start()
        # A plain PUB gives no sign of the subscription: keep publishing until one batch
        # got through; the late-join replay from 0 recovers whatever the SUB missed.
        sent = 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while sub.stats.batches_applied == 0:
            assert sent < len(batches) and loop.time() < deadline, "no batch reached the subscriber"
            await pub.publish(batches[sent].events)
            sent += 1
            with contextlib.suppress(AssertionError):
                await until(lambda: sub is not None and sub.stats.batches_applied > 0, timeout=0.05)
        for batch in batches[sent:]:
            await pub.publish(batch.events)
        await until(lambda: sub is not None and sub.stats.batches_applied == len(batches))
        assert index.match_tokens(tokens)["w"].total_blocks == len(batches)
        assert sub.stats.resets == 0 and sub.snapshot()["ranks"][0]["view_complete"]
    finally:
        if sub is not None:
            await sub.stop()
        await pub.close()


def _consecutive_ports(n: int) -> int:
    """A base port with n free ports after it (checked by binding, then released)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        held = []
        try:
            for offset in range(n):
                s = socket.socket()
                held.append(s)
                s.bind((HOST, base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


async def test_data_parallel_ranks_use_port_offsets(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    ranks: list[FakeVLLMPublisher] = []
    for _ in range(20):
        live, replay = _consecutive_ports(2), _consecutive_ports(2)
        try:
            for r in range(2):
                ranks.append(publisher(ctx, cleanup, port=live + r, replay_port=replay + r))
            break
        except zmq.ZMQError:  # taken meanwhile by a test running beside this one
            for pub in ranks:
                await pub.close()
            ranks.clear()
    assert with_port_offset(ranks[0].endpoint, 1) == ranks[1].endpoint
    index = make_index()
    sub = await subscribe(index, ranks, ctx, cleanup, name="pod")
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await ranks[0].publish(batches[0])
    await ranks[1].publish(batches[0])
    await ranks[1].publish(batches[1], drop=True)  # rank 1 replays from its own port
    await ranks[1].publish(batches[2])
    await until(lambda: sub.rank_stats(1).batches_applied == 3 and sub.rank_stats(0).batches_applied == 1)
    assert ranks[1].replay_requests == [1] and ranks[0].replay_requests == []
    assert index.match_tokens(tokens) == {"pod": PrefixMatch(1, 1, 0, 0), "pod#dp1": PrefixMatch(3, 3, 0, 0)}
    assert [rank["worker"] for rank in sub.snapshot()["ranks"]] == ["pod", "pod#dp1"]


async def test_service_adds_removes_and_stops_cleanly(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    index = make_index()
    pubs = [publisher(ctx, cleanup, replay=False) for _ in range(3)]
    service = KVEventIngestService(index, context=ctx, receive_thread=receiver() is not None)
    before = set(asyncio.all_tasks())
    for i, pub in enumerate(pubs):
        await service.add_endpoint(SubscriberConfig(f"pod{i}", pub.endpoint, topic="kv@"))
        assert await pub.subscribed() == b"kv@"
    same = await service.add_endpoint(SubscriberConfig("pod0", pubs[0].endpoint, topic="kv@"))
    assert same is service.subscribers["pod0"]  # an unchanged config keeps its subscriber
    for i, pub in enumerate(pubs):
        await pub.publish(chain_batches(prompt(1), first_hash=10 * i)[0])
    await until(lambda: service.totals().batches_applied == 3)
    assert set(index.match_tokens(prompt(1))) == {"pod0", "pod1", "pod2"}
    assert await service.remove_endpoint("pod1")
    assert not await service.remove_endpoint("pod1")
    assert service.endpoints == ["pod0", "pod2"] and "pod1" not in index.workers
    assert set(index.match_tokens(prompt(1))) == {"pod0", "pod2"}
    assert set(service.stats()) == {"pod0", "pod2"}
    await service.stop()
    leftover = [
        t for t in asyncio.all_tasks() - before if not t.done() and (t.get_name() or "").startswith("kv-")
    ]
    assert leftover == [] and service.endpoints == []


async def test_applied_batches_confirm_the_schedulers_speculative_placements(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    from scheduler.core.scheduler import Endpoint, Scheduler, SchedulerConfig, SchedulingRequest

    scheduler = Scheduler(SchedulerConfig(index=IndexConfig(block_size=BLOCK)))
    pub = publisher(ctx, cleanup, replay=False)
    scheduler.set_endpoints([Endpoint("pod0", "10.0.0.1:8000", kv_events=pub.endpoint)], now=0.0)
    service = KVEventIngestService(
        scheduler.index, context=ctx, receive_thread=receiver() is not None, on_applied=scheduler.on_kv_batch
    )
    await service.add_endpoint(SubscriberConfig("pod0", pub.endpoint, topic="kv@"))
    assert await pub.subscribed() == b"kv@"
    tokens = prompt(3)
    now = time.monotonic()  # the subscriber's clock: its batches arrive within events_within_s
    scheduler.pick(SchedulingRequest("a", tokens), now=now)
    scheduler.on_first_token("a", now=now)
    assert scheduler.speculative_placements == 1
    for batch in chain_batches(tokens):
        await pub.publish(batch)
    await until(lambda: scheduler.speculative_outcomes["confirmed"] == 1)
    assert scheduler.speculative_placements == 0
    await service.stop()


def test_subscriber_config_follows_the_discovered_endpoint() -> None:
    from scheduler.adapters.kv_subscriber import subscriber_config
    from scheduler.core.scheduler import Endpoint

    assert subscriber_config(Endpoint("10.0.0.5:8000", "10.0.0.5:8000")) is None
    endpoint = Endpoint(
        "10.0.0.5:8000",
        "10.0.0.5:8000",
        kv_events="tcp://10.0.0.5:5557",
        kv_replay="tcp://10.0.0.5:5558",
        kv_topic="kv@10.0.0.5",
        data_parallel_size=4,
    )
    config = subscriber_config(endpoint)
    assert config is not None
    assert config.worker_names == endpoint.index_workers()
    assert with_port_offset(config.endpoint, 3) == "tcp://10.0.0.5:5560"
    assert with_port_offset("tcp://[::1]:5558", 2) == "tcp://[::1]:5560"
    with pytest.raises(ValueError):
        SubscriberConfig("x", "ipc:///tmp/kv", data_parallel_size=2)


async def test_unreachable_replay_endpoint_times_out_and_resets(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    # A port bound and never listened on refuses connections, and while it stays bound no other
    # process can take it (released at once, another test's replay socket took it under load
    # and answered).
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        dead = f"tcp://{HOST}:{probe.getsockname()[1]}"
        ingest = IngestConfig(replay_timeout_s=0.2)
        config = SubscriberConfig("w", pub.endpoint, dead, topic="kv@", ingest=ingest)
        sub = KVEventSubscriber(config, index, context=ctx, receiver=receiver())
        cleanup.append(sub)
        await sub.start()
        await pub.subscribed()
        batches = chain_batches(prompt(3))
        await pub.publish(batches[0])
        await pub.publish(batches[1], drop=True)
        await pub.publish(batches[2])
        # The replay asked at the first connection fails as the gap's does.
        await until(lambda: sub.stats.replays_failed == 2 and sub.stats.batches_applied == 2)
        assert sub.stats.resets == 1 and sub.stats.orphans == 1


async def test_a_burst_of_queued_events_leaves_turns_to_other_tasks(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    # Thousands of batches queued at the subscriber at once (published while this loop is
    # held, so none is read before all are sent): another task on the loop, an ext_proc
    # stream in production, must get turns while they are applied, not only after.
    index = make_index()
    pub = publisher(ctx, cleanup, replay=False)
    sub = await subscribe(index, [pub], ctx, cleanup)
    total = 3000
    payloads = [encode_batch(batch) for batch in chain_batches(prompt(total), first_hash=10_000)]
    sender: zmq.Socket[bytes] = zmq.Socket.shadow(pub.pub.underlying)
    for seq, payload in enumerate(payloads):
        sender.send_multipart([TOPIC, encode_seq(seq), payload])
    seen_midway = 0

    async def other_stream() -> None:
        nonlocal seen_midway
        while sub.stats.batches_applied < total:
            if sub.stats.batches_applied > 0:
                seen_midway += 1
            await asyncio.sleep(0)

    await asyncio.wait_for(other_stream(), 30)
    assert sub.stats.batches_applied == total and sub.stats.gaps == 0
    assert seen_midway >= 3


async def test_publisher_views_follow_a_replay_and_its_failure(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    from scheduler.adapters.kv_subscriber import publisher_views
    from scheduler.core.kvingest import NO_KV_EVENTS
    from scheduler.core.scheduler import Endpoint

    index = make_index()
    pub = publisher(ctx, cleanup)
    service = KVEventIngestService(index, context=ctx, receive_thread=receiver() is not None)
    config = SubscriberConfig(
        "w", pub.endpoint, pub.replay_endpoint, topic="kv@", ingest=IngestConfig(replay_timeout_s=1.0)
    )
    sub = await service.add_endpoint(config)
    cleanup.append(sub)
    await pub.subscribed()
    # The replay asked at the first connection is answered; the gap's below is not.
    await until(lambda: sub.stats.replays_completed == 1)
    pub.answer_replays = False
    endpoints = [
        Endpoint("w", "10.0.0.1:8000", kv_events=pub.endpoint, kv_replay=pub.replay_endpoint),
        Endpoint("quiet", "10.0.0.2:8000"),
        Endpoint("coming", "10.0.0.3:8000", kv_events="tcp://10.0.0.3:5557", data_parallel_size=2),
    ]
    (view,) = sub.views()
    # Replayed from 0 before any live batch: the whole (empty) history is known.
    assert (view.state, view.next_seq, view.last_event_age_s) == ("exact", 0, None)
    batches = chain_batches(prompt(3))
    await pub.publish(batches[0])
    await until(lambda: sub.stats.batches_applied == 1)
    assert sub.views()[0].state == "exact" and sub.views()[0].last_event_age_s is not None
    await pub.publish(batches[1], drop=True)
    await pub.publish(batches[2])
    await until(lambda: sub.views()[0].buffered == 1)
    view = sub.views()[0]
    assert (view.state, view.replay_in_flight, view.replay_purpose, view.replay_from) == (
        "degraded",
        True,
        "gap",
        1,
    )
    views = publisher_views(endpoints, service)
    assert [(v.endpoint, v.rank, v.worker, v.state) for v in views] == [
        ("w", 0, "w", "degraded"),
        ("quiet", 0, "quiet", "fallback"),
        ("coming", 0, "coming", "degraded"),
        ("coming", 1, "coming#dp1", "degraded"),
    ]
    assert views[1].reason == NO_KV_EVENTS and views[2].reason == "not subscribed yet"
    # The publisher never answers: after the replay's timeout the gap is lost for good.
    await until(lambda: sub.stats.replays_failed == 1)
    view = sub.views()[0]
    assert (view.state, view.view_complete, view.replay_in_flight) == ("degraded", False, False)
    assert view.reason == "seq 1 never applied: the replay did not cover the missing batches"
    assert publisher_views(endpoints[1:2], None)[0].state == "fallback"


async def test_a_publisher_that_disconnects_leaves_the_index(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    """A SIGKILLed engine's blocks stayed in the index for as long as it was down (498 blocks in
    ``kvsched bench chaos``): the dropped connection now takes them out at once."""
    index = make_index()
    pub = publisher(ctx, cleanup)
    sub = await subscribe(index, [pub], ctx, cleanup)
    held = prompt(3)
    for batch in chain_batches(held):
        await pub.publish(batch)
    await until(lambda: sub.stats.batches_applied == 3)
    assert index.match_tokens(held)["w"].total_blocks == 3
    await pub.close()  # the process is gone: its sockets close with it
    await until(lambda: sub.stats.disconnects == 1)
    assert "w" not in index.match_tokens(held) and sub.stats.resets == 1
    assert not sub.snapshot()["ranks"][0]["view_complete"]
    # Back on the same ports (a restart, empty): followed from its first batch.
    await pub.restart()
    assert await pub.subscribed() == b"kv@"
    fresh = prompt(1, base=70)
    await pub.publish(EventBatch(0.0, [BlockStored([9], None, fresh, BLOCK)]))
    await until(lambda: sub.stats.batches_applied == 4)
    assert index.match_tokens(fresh)["w"].total_blocks == 1 and "w" not in index.match_tokens(held)
    assert sub.snapshot()["ranks"][0]["view_complete"]


def test_the_ingest_context_has_room_for_a_thousand_pods() -> None:
    # In a fresh process: the cap is fixed when a context makes its first socket, and this
    # test process's shared context may have made sockets already.
    script = (
        "import zmq, zmq.asyncio\n"
        "from scheduler.adapters.kv_subscriber import KVEventIngestService\n"
        "from scheduler.core.index import PrefixIndex\n"
        "KVEventIngestService(PrefixIndex())\n"
        "context = zmq.asyncio.Context.instance()\n"
        "sockets = [context.socket(zmq.SUB) for _ in range(1100)]\n"
        "print(len(sockets))\n"
        "for s in sockets: s.close(linger=0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1100"


def _wide_chain(batches: int, blocks_per_batch: int) -> tuple[list[int], list[bytes]]:
    """One long chain stored ``blocks_per_batch`` blocks a batch: tokens and encoded payloads."""
    tokens = prompt(batches * blocks_per_batch, base=1000)
    payloads = []
    parent = None
    for b in range(batches):
        hashes = [50_000 + b * blocks_per_batch + i for i in range(blocks_per_batch)]
        span = tokens[b * blocks_per_batch * BLOCK : (b + 1) * blocks_per_batch * BLOCK]
        payloads.append(encode_batch(EventBatch(float(b), [BlockStored(hashes, parent, span, BLOCK)], 0)))
        parent = hashes[-1]
    return tokens, payloads


async def _flood_while_held(pub: FakeVLLMPublisher, payloads: list[bytes]) -> None:
    """Every payload sent, and kept for replay, without yielding to the subscriber's loop.

    On the native receive thread the loop is held until the thread has received them all, so
    that its next turn takes the whole flood at once and what the turn's time budget leaves
    waits in the byte-bounded queue. Otherwise the thread hands the flood over in pieces as it
    comes, a turn may apply each piece within its budget, and whether anything waits (and is
    dropped) depends on the machine's timing (seen once in CI)."""
    assert pub.pub is not None
    thread = receiver()
    received = 0 if thread is None else thread.stats()["messages"]
    sender: zmq.Socket[bytes] = zmq.Socket.shadow(pub.pub.underlying)
    for payload in payloads:
        seq = pub.next_seq
        pub.next_seq += 1
        pub.buffer[seq] = payload
        sender.send_multipart([TOPIC, encode_seq(seq), payload])
    if thread is not None:
        deadline = time.monotonic() + 10.0
        while thread.stats()["messages"] < received + len(payloads):
            assert time.monotonic() < deadline, "the receive thread did not get the flood"


async def test_a_flood_waits_in_a_byte_bounded_queue_and_what_is_dropped_is_replayed(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    """ZMQ's queue held up to rcvhwm (then 100,000) messages of any size while the loop caught
    up: a 230 MB flood stayed in memory. Messages now wait in a queue bounded in bytes; one
    beyond it is dropped whole, counted with its reason, and is a gap the replay closes."""
    index = make_index()
    pub = publisher(ctx, cleanup)
    bound = 16 * 1024
    sub = await subscribe(index, [pub], ctx, cleanup, ingest=IngestConfig(max_queued_bytes=bound))
    tokens, payloads = _wide_chain(400, 32)
    assert max(len(p) for p in payloads) < bound // 8  # the queue holds at most ~10 of them
    await _flood_while_held(pub, payloads)
    await until(
        lambda: (
            sub.stats.batches_applied == len(payloads) and not sub.snapshot()["ranks"][0]["replay_in_flight"]
        )
    )
    stats = sub.stats
    assert stats.dropped_publisher_bytes > 0 and stats.dropped_total_bytes == 0
    # The very first messages may be among those dropped: then it is a late join, replayed from 0.
    assert stats.replays_requested >= 1 and stats.lost_batches == 0 and stats.resets == 0
    rank = sub.snapshot()["ranks"][0]
    assert 0 < rank["peak_queued_bytes"] <= bound and rank["queued_bytes"] == 0
    assert index.match_tokens(tokens)["w"].total_blocks == 400 * 32
    assert sub.budget.used == 0


async def test_the_process_wide_byte_bound_drops_across_publishers(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    from scheduler.adapters.kv_subscriber import ReceiveBudget

    index = make_index()
    pub = publisher(ctx, cleanup)
    shared = ReceiveBudget(8 * 1024)
    config = SubscriberConfig("w", pub.endpoint, pub.replay_endpoint, topic="kv@")
    sub = KVEventSubscriber(config, index, context=ctx, receiver=receiver(), budget=shared)
    cleanup.append(sub)
    await sub.start()
    await pub.subscribed()
    tokens, payloads = _wide_chain(300, 32)
    await _flood_while_held(pub, payloads)
    await until(
        lambda: (
            sub.stats.batches_applied == len(payloads) and not sub.snapshot()["ranks"][0]["replay_in_flight"]
        )
    )
    assert sub.stats.dropped_total_bytes > 0 and sub.stats.dropped_publisher_bytes == 0
    assert 0 < shared.peak <= 8 * 1024 and shared.used == 0
    assert index.match_tokens(tokens)["w"].total_blocks == 300 * 32


async def test_dropped_batches_are_exposed_per_reason(ctx: zmq.asyncio.Context, cleanup: list) -> None:
    from prometheus_client import generate_latest

    from scheduler.adapters.metrics import KvschedCollector, new_registry
    from scheduler.core.kvingest import IngestStats
    from scheduler.core.scheduler import Scheduler, SchedulerConfig

    stats = IngestStats(dropped_publisher_bytes=3, dropped_total_bytes=1)
    registry = new_registry(process_metrics=False)
    registry.register(KvschedCollector(Scheduler(SchedulerConfig()), ingest_stats=lambda: {"w": stats}))
    text = generate_latest(registry).decode()
    assert 'kvsched_kv_dropped_batches_total{endpoint="w",reason="publisher_bytes"} 3.0' in text
    assert 'kvsched_kv_dropped_batches_total{endpoint="w",reason="total_bytes"} 1.0' in text
    assert "kvsched_kv_dropped_publisher_bytes" not in text


async def test_a_restarted_publisher_is_replayed_from_0_when_it_reconnects(
    ctx: zmq.asyncio.Context, cleanup: list
) -> None:
    """What a restarted engine published before the subscriber's connection came back never
    reaches the live stream (ZMQ's slow joiner); it was missing from the index until the
    engine's next batch showed the hole (a worker restarted in ``kvsched bench chaos``).
    Now the reconnect itself asks the replay socket for the history from 0."""
    index = make_index()
    pub = publisher(ctx, cleanup)
    sub = await subscribe(index, [pub], ctx, cleanup)
    old = prompt(3)
    for batch in chain_batches(old):
        await pub.publish(batch)
    await until(lambda: sub.stats.batches_applied == 3)
    await pub.close()
    await until(lambda: sub.stats.disconnects == 1)
    await pub.restart()
    # The new engine's first batches went out before the subscription reached it.
    fresh = prompt(2, base=70)
    for batch in chain_batches(fresh, first_hash=900):
        await pub.publish(batch, drop=True)
    await until(lambda: sub.stats.batches_applied == 5)
    assert index.match_tokens(fresh)["w"].total_blocks == 2 and "w" not in index.match_tokens(old)
    assert pub.replay_requests == [0]
    # The replay's last batch is applied before its end marker settles the view.
    await until(lambda: sub.views()[0].state == "exact")
    view = sub.views()[0]
    assert (view.state, view.next_seq) == ("exact", 2)
    # The live stream carries on from there: the next batch is applied in order, no reset.
    resets = sub.stats.resets
    assert await pub.subscribed() == b"kv@"
    await pub.publish(EventBatch(3.0, [BlockStored([77], 901, prompt(1, base=90), BLOCK)]))
    await until(lambda: sub.stats.batches_applied == 6)
    assert sub.stats.resets == resets and sub.stats.gaps == 0 and sub.views()[0].state == "exact"
    assert index.match_tokens(fresh + prompt(1, base=90))["w"].total_blocks == 3


async def test_a_replay_of_the_engines_whole_buffer_arrives_whole(ctx: zmq.asyncio.Context) -> None:
    """vLLM answers a replay on a ROUTER socket, which drops replies that do not fit the
    connection's high-water marks (1,000 messages each side by default) instead of waiting.
    Joining an engine that holds its whole buffer (10,000 batches, vLLM's default
    buffer_steps), read slower than it is sent, lost 2,000 batches in the middle and reset
    the worker. A hole after the answer has begun is asked for again. The simulated publisher
    keeps vLLM's socket defaults; its batches are the size of a small engine step."""
    batches, blocks_per_batch = 10_000, 32
    index = make_index()
    pub = KVEventPublisher(topic=TOPIC.decode(), context=ctx)
    await pub.start()
    sub: KVEventSubscriber | None = None
    try:
        pub.mute()  # numbered and kept for replay, never sent live: the history a joiner asks for
        tokens = prompt(batches * blocks_per_batch)
        parent = None
        for b in range(batches):
            first = b * blocks_per_batch
            hashes = list(range(100 + first, 100 + first + blocks_per_batch))
            ids = tokens[first * BLOCK : (first + blocks_per_batch) * BLOCK]
            await pub.publish([BlockStored(hashes, parent, ids, BLOCK)])
            parent = hashes[-1]
        config = SubscriberConfig("w", pub.endpoint, pub.replay_endpoint, topic="kv@")
        sub = KVEventSubscriber(config, index, context=ctx, receiver=receiver())
        await sub.start()
        await until(
            lambda: sub is not None and sub.stats.batches_applied + sub.stats.lost_batches >= batches, 120
        )
        await until(lambda: sub is not None and not sub.snapshot()["ranks"][0]["replay_in_flight"], 30)
        stats = sub.stats
        assert (stats.lost_batches, stats.resets, stats.replays_failed) == (0, 0, 0)
        assert stats.batches_applied == batches and stats.replays_completed == 1
        assert index.match_tokens(tokens)["w"].total_blocks == batches * blocks_per_batch
        assert sub.snapshot()["ranks"][0]["view_complete"] is True
    finally:
        if sub is not None:
            await sub.stop()
        await pub.close()
