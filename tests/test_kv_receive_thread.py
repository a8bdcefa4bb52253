"""The native KV-event receive thread (``kernels/kvrecvloop.h``) over real ZMQ sockets.

Every subscriber test of ``test_kv_subscriber.py`` runs on this thread too; these are the
thread's own duties: calling the libzmq pyzmq loaded, its pending bound, letting go of a
socket before Python closes it, and the ingest service's choice between it and pyzmq.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from test_kv_subscriber import TOPIC, FakeVLLMPublisher, _flood_while_held, _wide_chain, make_index, until

from scheduler.adapters.kv_receive_thread import NativeLiveReceiver, libzmq_path, native_receiver_available
from scheduler.adapters.kv_subscriber import KVEventIngestService, KVEventSubscriber, SubscriberConfig
from scheduler.codec.kvevents import encode_seq

AVAILABLE, WHY = native_receiver_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native receive thread: {WHY}")


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def test_the_thread_calls_the_libzmq_pyzmq_loaded() -> None:
    path = libzmq_path()
    assert path is not None and Path(path).name.startswith("libzmq")
    receiver = NativeLiveReceiver()
    try:
        assert receiver.stats()["sockets"] == 0
    finally:
        receiver.close()
    from scheduler._native.kvrecv import KVReceiveLoop

    with pytest.raises(OSError, match="no loaded libzmq"):
        KVReceiveLoop("/nonexistent/libzmq.so.5", 1024)


async def test_past_its_pending_bound_the_thread_waits_and_nothing_is_lost(ctx: zmq.asyncio.Context) -> None:
    """A flood faster than the loop applies: past max_pending_bytes the thread stops receiving
    (ZMQ's queues hold the rest, up to RCVHWM, then drop: a gap the replay closes), so what
    waits between two wake-ups is bounded, and the index still ends whole."""
    index = make_index()
    pub = FakeVLLMPublisher(ctx).open()
    receiver = NativeLiveReceiver(max_pending_bytes=2048)
    sub = KVEventSubscriber(
        SubscriberConfig("w", pub.endpoint, pub.replay_endpoint, topic="kv@"),
        index,
        context=ctx,
        receiver=receiver,
    )
    try:
        await sub.start()
        assert await pub.subscribed() == b"kv@"
        await until(lambda: sub.stats.replays_completed >= 1)  # the join replay, from 0
        tokens, payloads = _wide_chain(400, 32)
        assert min(len(p) for p in payloads) > 512  # four of them pass the bound
        await _flood_while_held(pub, payloads)
        await until(
            lambda: (
                sub.stats.batches_applied == len(payloads)
                and not sub.snapshot()["ranks"][0]["replay_in_flight"]
            )
        )
        assert receiver.stats()["stalls"] > 0
        assert index.match_tokens(tokens)["w"].total_blocks == 400 * 32
        assert sub.stats.lost_batches == 0 and sub.stats.resets == 0
    finally:
        await sub.stop()
        receiver.close()
        await pub.close()


async def test_a_socket_taken_back_mid_flood_is_closed_without_the_thread_touching_it(
    ctx: zmq.asyncio.Context,
) -> None:
    """``stop`` closes each SUB right after taking it back from the thread: taking it back
    must wait for the thread to let go (a socket used by two threads crashes libzmq), and what
    the thread received for it but Python had not taken is dropped, not applied late."""
    index = make_index()
    receiver = NativeLiveReceiver()
    pubs = [FakeVLLMPublisher(ctx, replay=False).open() for _ in range(4)]
    subs = [
        KVEventSubscriber(
            SubscriberConfig(f"w{i}", p.endpoint, topic="kv@"), index, context=ctx, receiver=receiver
        )
        for i, p in enumerate(pubs)
    ]
    _, payloads = _wide_chain(2000, 2)
    senders = [zmq.Socket.shadow(p.pub.underlying) for p in pubs if p.pub is not None]
    try:
        for sub, pub in zip(subs, pubs, strict=True):
            await sub.start()
            await pub.subscribed()
        for round_ in range(3):
            # Each publisher floods; half-way, two subscriptions are stopped under it.
            for seq, payload in enumerate(payloads[: len(payloads) // 2]):
                for sender in senders:
                    sender.send_multipart([TOPIC, encode_seq(round_ * 10_000 + seq), payload])
            if round_ == 0:
                await until(lambda: all(s.stats.batches_applied > 0 for s in subs))
                await subs[0].stop()
                await subs[1].stop()
                stopped = [s.stats.batches_applied for s in subs[:2]]
        await until(lambda: receiver.stats()["messages"] >= 2 * 3 * len(payloads) // 2)
        await asyncio.sleep(0)  # one more loop turn: a late application would show now
        assert receiver.sockets == 2
        assert [s.stats.batches_applied for s in subs[:2]] == stopped
        assert all(s.stats.batches_applied > stopped[0] for s in subs[2:])
    finally:
        for sub in subs:
            await sub.stop()
        receiver.close()
        for pub in pubs:
            await pub.close()


async def test_the_ingest_service_receives_on_the_thread_unless_told_not_to(ctx: zmq.asyncio.Context) -> None:
    pub = FakeVLLMPublisher(ctx, replay=False).open()
    for wanted, mode in ((True, "native"), (False, "python")):
        service = KVEventIngestService(make_index(), context=ctx, receive_thread=wanted)
        try:
            await service.add_endpoint(SubscriberConfig("w", pub.endpoint, topic="kv@"))
            assert service.receive_mode == mode
            assert (service.receiver_stats is not None) == wanted
        finally:
            await service.stop()
        assert service.receiver_stats is None
    await pub.close()


async def test_a_socket_the_thread_cannot_watch_is_received_on_the_loop(ctx: zmq.asyncio.Context) -> None:
    """The thread refuses a socket whose descriptor it cannot watch with a clear error (the
    socket stays Python's), and the subscription takes it on the event loop instead: its
    batches are applied all the same."""
    from scheduler._native.kvrecv import KVReceiveLoop

    path = libzmq_path()
    assert path is not None
    loop = KVReceiveLoop(path, 1024)
    probe = ctx.socket(zmq.SUB)
    try:
        with pytest.raises(OSError, match="cannot watch descriptor -1"):
            loop.add(1, probe.underlying, -1)
    finally:
        loop.close()
        probe.close(linger=0)

    receiver = NativeLiveReceiver()
    refused = receiver._thread.add

    def refuse(target: int, address: int, fd: int) -> None:
        refused(target, address, -1)

    receiver._thread = _Refusing(receiver._thread, refuse)
    index = make_index()
    pub = FakeVLLMPublisher(ctx, replay=False).open()
    sub = KVEventSubscriber(
        SubscriberConfig("w", pub.endpoint, topic="kv@"), index, context=ctx, receiver=receiver
    )
    try:
        await sub.start()
        assert await pub.subscribed() == b"kv@"
        assert receiver.sockets == 0
        tokens, payloads = _wide_chain(5, 4)
        await _flood_while_held(pub, payloads)
        await until(lambda: sub.stats.batches_applied == len(payloads))
        assert index.match_tokens(tokens)["w"].total_blocks == 5 * 4
    finally:
        await sub.stop()
        receiver.close()
        await pub.close()


class _Refusing:
    """A KVReceiveLoop whose add passes a descriptor the thread cannot watch."""

    def __init__(self, inner: Any, add: Any) -> None:
        self._inner = inner
        self.add = add

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
