"""KV-event ingest over real ZMQ sockets: a PUB and a replay ROUTER speaking vLLM 0.33.0's
framing (and the older replay framing), driven by hand so tests can drop, repeat,
corrupt and restart sequences; the subscriber under test is the production one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
import zmq
import zmq.asyncio

from scheduler.adapters.kv_subscriber import KVEventSubscriber, SubscriberConfig
from scheduler.codec.kvevents import REPLAY_END_FRAME, decode_seq, encode_batch, encode_seq
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig, PrefixIndex

BLOCK = 4
TOPIC = b"kv@10.0.0.1:8000@model"


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
    """vLLM's ZmqEventPublisher wire behaviour, with knobs for loss and restarts."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        replay: bool = True,
        legacy_replay: bool = False,
        port: int | None = None,
        replay_port: int | None = None,
    ) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if port is None:
            self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.pub.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        self.router = None
        self.replay_port = None
        self.legacy_replay = legacy_replay
        self.buffer: dict[int, bytes] = {}
        self.next_seq = 0
        self.replays_served = 0
        self._task: asyncio.Task[None] | None = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            if replay_port is None:
                self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
            else:
                self.router.bind(f"tcp://127.0.0.1:{replay_port}")
                self.replay_port = replay_port
            self._task = asyncio.create_task(self._serve_replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    async def publish(self, batch: EventBatch, *, drop: bool = False, legacy: bool = False) -> int:
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(batch, legacy=legacy)
        self.buffer[seq] = payload
        if not drop:
            await self.pub.send_multipart([TOPIC, encode_seq(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    def restart(self) -> None:
        self.next_seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            identity, _empty, start = await self.router.recv_multipart()
            self.replays_served += 1
            for seq in sorted(s for s in self.buffer if s >= decode_seq(start)):
                head = [identity, b""] if self.legacy_replay else [identity, b"", TOPIC]
                await self.router.send_multipart([*head, encode_seq(seq), self.buffer[seq]])
            end = [identity, b""] if self.legacy_replay else [identity, b"", TOPIC]
            await self.router.send_multipart([*end, REPLAY_END_FRAME, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (the sockets are asynchronous by nature)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def connected(sub: KVEventSubscriber, pub: FakeVLLMPublisher) -> None:
    """Defeat ZMQ's slow-joiner: send 2-frame probes (malformed on purpose, so they are
    counted and change nothing) until the subscriber has seen one, then zero the count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while sub.stats.malformed_frames == 0:
        assert loop.time() < deadline, "subscriber never connected"
        await pub.send_raw([TOPIC, b"probe"])
        await asyncio.sleep(0.01)
    for rank in range(sub.config.data_parallel_size):
        sub.rank_stats(rank).malformed_frames = 0


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def make_index() -> PrefixIndex:
    return PrefixIndex(IndexConfig(block_size=BLOCK))


async def start(
    index: PrefixIndex, pub: FakeVLLMPublisher, ctx: zmq.asyncio.Context, name: str = "w", **extra: object
) -> KVEventSubscriber:
    config = SubscriberConfig(name, pub.endpoint, pub.replay_endpoint, topic="kv@", **extra)  # type: ignore[arg-type]
    sub = KVEventSubscriber(config, index, context=ctx)
    await sub.start()
    await connected(sub, pub)
    return sub


@pytest.mark.parametrize("legacy", [False, True])
async def test_in_order_batches_are_applied(ctx: zmq.asyncio.Context, legacy: bool) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx, replay=False)
    sub = await start(index, pub, ctx)
    tokens = prompt(4)
    for batch in chain_batches(tokens):
        await pub.publish(batch, legacy=legacy)
    await until(lambda: sub.stats.batches_applied == 4)
    assert index.match_tokens(tokens)["w"].total_blocks == 4
    assert sub.stats.gaps == 0 and sub.stats.resets == 0
    await sub.stop()
    await pub.close()


@pytest.mark.parametrize("legacy_replay", [False, True])
async def test_gap_is_filled_by_replay(ctx: zmq.asyncio.Context, legacy_replay: bool) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx, legacy_replay=legacy_replay)
    sub = await start(index, pub, ctx)
    tokens = prompt(5)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await until(lambda: sub.stats.batches_applied == 1)
    await pub.publish(batches[1], drop=True)  # lost to the PUB high-water mark
    await pub.publish(batches[2], drop=True)
    for batch in batches[3:]:
        await pub.publish(batch)
    await until(lambda: sub.stats.replays_completed == 1 and sub.stats.batches_applied == 5)
    assert sub.stats.gaps == 1 and sub.stats.resets == 0
    assert index.match_tokens(tokens)["w"].total_blocks == 5  # as if nothing was lost
    await sub.stop()
    await pub.close()


async def test_gap_without_replay_resets_only_that_worker(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    other = chain_batches(prompt(2, base=500), first_hash=900)
    for batch in other:
        index.apply_batch("other", batch)
    pub = FakeVLLMPublisher(ctx, replay=False)
    sub = await start(index, pub, ctx)
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await pub.publish(batches[1])
    await until(lambda: sub.stats.batches_applied == 2)
    assert index.match_tokens(tokens)["w"].total_blocks == 2
    await pub.publish(EventBatch(9.0, [BlockRemoved([100])]), drop=True)
    fresh = prompt(1, base=300)
    await pub.publish(EventBatch(10.0, [BlockStored([777], None, fresh, BLOCK)]))
    await until(lambda: sub.stats.resets == 1 and sub.stats.batches_applied == 3)
    assert "w" not in index.match_tokens(tokens)  # unknown after the loss: forgotten
    assert index.match_tokens(fresh)["w"].total_blocks == 1  # the new batch applied
    assert index.match_tokens(prompt(2, base=500))["other"].total_blocks == 2
    await sub.stop()
    await pub.close()


async def test_replay_that_cannot_cover_the_gap_resets(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx)
    sub = await start(index, pub, ctx)
    tokens = prompt(3)
    batches = chain_batches(tokens)
    await pub.publish(batches[0])
    await until(lambda: sub.stats.batches_applied == 1)
    lost = await pub.publish(batches[1], drop=True)
    del pub.buffer[lost]  # older than the publisher's buffer_steps
    await pub.publish(batches[2])
    await until(lambda: sub.stats.replays_completed == 1 and sub.stats.batches_applied == 2)
    assert sub.stats.resets == 1 and sub.stats.lost_batches == 1
    # Block 2 chains to block 1, which the reset forgot: it is an orphan, not a match.
    assert "w" not in index.match_tokens(tokens)
    assert sub.stats.orphans == 1
    await sub.stop()
    await pub.close()


async def test_publisher_restart_resets_then_applies(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx, replay=False)
    sub = await start(index, pub, ctx)
    old = prompt(2)
    for batch in chain_batches(old):
        await pub.publish(batch)
    await until(lambda: sub.stats.batches_applied == 2)
    pub.restart()  # new engine process: seq from 0, empty cache
    new = prompt(1, base=50)
    await pub.publish(EventBatch(0.0, [BlockStored([5], None, new, BLOCK)]))
    await until(lambda: sub.stats.restarts == 1 and sub.stats.batches_applied == 3)
    assert "w" not in index.match_tokens(old)
    assert index.match_tokens(new)["w"].total_blocks == 1
    await sub.stop()
    await pub.close()


async def test_malformed_frames_and_payloads_are_counted_and_skipped(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx, replay=False)
    sub = await start(index, pub, ctx)
    await pub.send_raw([TOPIC, b"\x00\x01", b"payload"])  # short seq frame
    await pub.send_raw([TOPIC, encode_seq(0), b"a", b"b"])  # four frames
    await pub.send_raw([TOPIC, encode_seq(0), b"\xc1 not msgpack"])
    await pub.send_raw([TOPIC, encode_seq(1), msgpack.packb({"not": "a batch"})])
    bad_event = msgpack.packb([1.0, [{"type": "Bogus"}, {"type": "AllBlocksCleared"}], 0])
    await pub.send_raw([TOPIC, encode_seq(2), bad_event])
    pub.next_seq = 3
    tokens = prompt(1)
    await pub.publish(EventBatch(3.0, [BlockStored([1], None, tokens, BLOCK)]))
    await until(lambda: sub.stats.batches_applied >= 2)
    stats = sub.stats
    assert stats.malformed_frames == 2
    assert stats.malformed_payloads == 2
    assert stats.bad_events == 1
    assert index.match_tokens(tokens)["w"].total_blocks == 1  # the subscriber kept serving
    await sub.stop()
    await pub.close()


async def test_tiers_groups_duplicates_and_clear_through_the_wire(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx, replay=False)
    sub = await start(index, pub, ctx)
    tokens = prompt(2)
    events = [
        BlockStored([1, 2], None, tokens, BLOCK, medium=Tier.CPU),
        BlockStored([1], None, tokens[:BLOCK], BLOCK, medium=Tier.GPU),
        BlockStored([1], None, tokens[:BLOCK], BLOCK, medium=Tier.GPU),  # duplicate store
        BlockStored([1], None, tokens[:BLOCK], BLOCK, group_idx=1, kv_cache_spec_kind="sliding_window"),
    ]
    await pub.publish(EventBatch(0.0, events, 0))
    await until(lambda: sub.stats.batches_applied == 1)
    assert index.match_tokens(tokens)["w"] == (2, 1, 1, 0)
    await pub.publish(EventBatch(1.0, [BlockRemoved([1], Tier.GPU)], 0))
    await pub.publish(EventBatch(2.0, [BlockRemoved([1], Tier.GPU, group_idx=1)], 0))
    await until(lambda: sub.stats.batches_applied == 3)
    assert index.match_tokens(tokens)["w"] == (2, 1, 1, 0)  # one GPU reference left
    await pub.publish(EventBatch(3.0, [AllBlocksCleared()], 0))
    await until(lambda: sub.stats.batches_applied == 4)
    assert index.match_tokens(tokens) == {}
    await sub.stop()
    await pub.close()


async def test_late_joiner_catches_up_by_replay(ctx: zmq.asyncio.Context) -> None:
    index = make_index()
    pub = FakeVLLMPublisher(ctx)
    tokens = prompt(3)
    batches = chain_batches(tokens)
    for batch in batches[:2]:
        await pub.publish(batch, drop=True)  # before the subscriber existed
    config = SubscriberConfig("w", pub.endpoint, pub.replay_endpoint, topic="kv@")
    async with KVEventSubscriber(config, index, context=ctx) as sub:
        await connected(sub, pub)
        await pub.publish(batches[2])
        await until(lambda: sub.stats.replays_completed == 1 and sub.stats.batches_applied == 3)
        assert index.match_tokens(tokens)["w"].total_blocks == 3
    await pub.close()


async def test_data_parallel_ranks_use_port_offsets(ctx: zmq.asyncio.Context) -> None:
    probe = ctx.socket(zmq.PUB)
    for _ in range(50):
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.unbind(f"tcp://127.0.0.1:{port}")
        try:
            ranks = [FakeVLLMPublisher(ctx, replay=False, port=port + r) for r in range(2)]
            break
        except zmq.ZMQError:
            continue
    probe.close(linger=0)
    index = make_index()
    config = SubscriberConfig("pod", ranks[0].endpoint, None, topic="kv@", data_parallel_size=2)
    sub = KVEventSubscriber(config, index, context=ctx)
    await sub.start()
    for rank in ranks:
        await connected(sub, rank)
    tokens = prompt(2)
    await ranks[1].publish(chain_batches(tokens)[0])
    await until(lambda: sub.rank_stats(1).batches_applied == 1)
    assert index.match_tokens(tokens) == {"pod#dp1": (1, 1, 0, 0)}
    assert sub.rank_stats(0).batches_applied == 0
    await sub.stop()
    for rank in ranks:
        await rank.close()
