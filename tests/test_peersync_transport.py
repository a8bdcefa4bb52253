"""The sync channel over real ZMQ sockets on loopback: a replica's routing reaches its peer,
malformed frames are counted and skipped, and peers come from EndpointSlices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from scheduler.adapters.peersync import PeerSyncTransport, endpointslice_peers
from scheduler.codec.peersync import PeerSyncDecodeError, decode, encode
from scheduler.core.index import IndexConfig
from scheduler.core.peerload import DONE, PeerSyncConfig, Placed, Released, Routed, Snapshot, SyncMessage
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest

E1 = "10.0.0.1:8000"


def _replica(name: str, sync: PeerSyncConfig | None = None) -> Scheduler:
    config = SchedulerConfig(index=IndexConfig(block_size=16), sync=sync or PeerSyncConfig(enabled=True))
    replica = Scheduler(config)
    replica.set_endpoints([Endpoint(E1, E1, kv_events="tcp://a")], 0.0)
    replica.update_metrics(E1, EndpointMetrics(0, 0, 0.0), 0.0)
    replica.start_sync(name, 1)
    return replica


@contextlib.asynccontextmanager
async def _connected_pair(
    context: zmq.asyncio.Context, sync: PeerSyncConfig | None = None, **transport: Any
) -> AsyncIterator[tuple[Scheduler, Scheduler, PeerSyncTransport, PeerSyncTransport]]:
    """Replicas "a" and "b", each with its transport subscribed to the other's, once each has
    heard from the other (a PUB drops what it sends before the SUB has joined: the snapshots
    a subscription asks for repair that, and here they show the connections are up)."""
    a, b = _replica("a", sync), _replica("b", sync)
    ta = PeerSyncTransport(a, bind="tcp://127.0.0.1:0", context=context, **transport)
    tb = PeerSyncTransport(b, bind="tcp://127.0.0.1:0", context=context, **transport)
    await ta.start()
    await tb.start()
    try:
        ta.set_peers([tb.bound_address])
        tb.set_peers([ta.bound_address])
        await _until(lambda: "a" in b.peer_load.peers() and "b" in a.peer_load.peers())
        yield a, b, ta, tb
    finally:
        await ta.stop()
        await tb.stop()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "body",
    [
        Routed("r1", E1, 512, 9.5, 2.25, True),
        Routed("r1", E1, 512, 9.5, 2.25, True, (), 0, (2**64 - 1, 7, 8), "10.0.0.9:8000"),
        Routed("r1", E1, 512, 9.5, 2.25, True, (1, 2), 32, (3,), E1),
        Released("r1", DONE),
        Snapshot((Routed("r1", E1, 512, 9.5, 2.25, False), Routed("r2", E1, 0, 5.0, 5.0, True))),
        Placed("r1", E1, (2**64 - 1, 5, 6, 7)),
    ],
)
def test_codec_round_trip(body: Routed | Released | Snapshot | Placed) -> None:
    message, sent_at = decode(encode(SyncMessage("a", 7, 3, 0.0, body), 1_700_000_000.5))
    assert message == SyncMessage("a", 7, 3, 0.0, body) and sent_at == 1_700_000_000.5


def test_routed_message_is_small() -> None:
    frame = encode(
        SyncMessage(
            "kvsched-7d9f-abcde",
            1_733_000_000_000_000_000,
            12345,
            0.0,
            Routed("0123456789abcdef0123456789abcdef", "10.244.1.17:8000", 6912, 12.5, 3.1),
        ),
        1.7e9,
    )
    assert len(frame) < 120


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x01",
        msgpack.packb([9, "a", 1, 1, 0.0, 0, []]),
        msgpack.packb([1, "a", 1, 1, 0.0, 5, []]),
        msgpack.packb([1, "a", 1, 1, 0.0, 4, ["r1", E1]]),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(frame: bytes) -> None:
    with pytest.raises(PeerSyncDecodeError):
        decode(frame)


async def test_a_replicas_routing_and_release_reach_its_peer_over_zmq() -> None:
    context = zmq.asyncio.Context()
    try:
        async with _connected_pair(context) as (a, b, ta, tb):
            pick = a.pick(SchedulingRequest("r1", list(range(1, 65)), max_tokens=4), ta.clock())
            assert pick.status == "ok"
            await _until(lambda: b.endpoint_state(E1, ta.clock()).inflight_requests == 1)
            a.on_completed("r1", ta.clock())
            await _until(lambda: b.endpoint_state(E1, ta.clock()).inflight_requests == 0)
            assert b.peer_load.stats.lag_max_s < 1.0
            # A malformed frame from the peer's address is counted and skipped; sync goes on.
            raw = context.socket(zmq.PUB)
            port = raw.bind_to_random_port("tcp://127.0.0.1")
            tb.set_peers([ta.bound_address, f"tcp://127.0.0.1:{port}"])
            await _until(lambda: (raw.send(b"not msgpack"), tb.stats.malformed > 0)[1])
            a.pick(SchedulingRequest("r2", list(range(1, 65)), max_tokens=4), ta.clock())
            await _until(lambda: b.endpoint_state(E1, ta.clock()).inflight_requests == 1)
            raw.close(0)
    finally:
        context.term()


async def test_a_routing_goes_out_at_once_not_with_the_periodic_flush() -> None:
    """A peer blind to a routing may route onto the same pod: the routing is sent as soon as
    the loop is done with the decision. With the periodic flush and the snapshots an hour
    apart, only that send can carry it (the 5 ms flush it used to wait for was a live mean
    lag of 3.3 ms between two replicas)."""
    context = zmq.asyncio.Context()
    hourly = PeerSyncConfig(enabled=True, snapshot_interval_s=3600.0)
    try:
        async with _connected_pair(context, hourly, flush_interval_s=3600.0) as (a, b, ta, tb):
            assert (
                a.pick(SchedulingRequest("r1", list(range(1, 65)), max_tokens=4), ta.clock()).status == "ok"
            )
            await _until(lambda: b.endpoint_state(E1, tb.clock()).inflight_requests == 1, timeout_s=2.0)
            assert b.peer_load.stats.last_lag_s < 1.0
    finally:
        context.term()


async def test_a_peer_that_subscribes_gets_a_snapshot_at_once() -> None:
    # The interval is an hour: the snapshot at start went out before anyone listened, so a
    # snapshot reaching the late subscriber can only be the one its subscription asked for.
    context = zmq.asyncio.Context()
    config = SchedulerConfig(
        index=IndexConfig(block_size=16), sync=PeerSyncConfig(enabled=True, snapshot_interval_s=3600.0)
    )
    replica = Scheduler(config)
    replica.set_endpoints([Endpoint(E1, E1, kv_events="tcp://a")], 0.0)
    replica.update_metrics(E1, EndpointMetrics(0, 0, 0.0), 0.0)
    replica.start_sync("survivor", 1)
    transport = PeerSyncTransport(replica, bind="tcp://127.0.0.1:0", context=context)
    await transport.start()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        await _until(lambda: transport.stats.sent_messages >= 1)  # the snapshot at start
        sub.connect(transport.bound_address)
        message, _ = decode(await asyncio.wait_for(sub.recv(), 5.0))
        assert isinstance(message.body, Snapshot) and message.replica == "survivor"
        assert transport.stats.snapshots_on_subscribe == 1
    finally:
        sub.close(0)
        await transport.stop()
        context.term()


def test_endpointslice_peers_are_the_ready_addresses_but_this_pod() -> None:
    document = {
        "items": [
            {
                "endpoints": [
                    {"addresses": ["10.1.0.4"], "conditions": {"ready": True}},
                    {"addresses": ["10.1.0.5"], "conditions": {"ready": False}},
                    {"addresses": ["10.1.0.6"]},
                ]
            },
            {"endpoints": [{"addresses": ["fd00::7"], "conditions": {"ready": True}}]},
        ]
    }
    assert endpointslice_peers(document, 9004, own_ip="10.1.0.6") == [
        "tcp://10.1.0.4:9004",
        "tcp://[fd00::7]:9004",
    ]
    assert endpointslice_peers({}, 9004, None) == []
