"""Readiness that means warm: the gate a starting ``kvsched serve`` passes before SERVING.

The state machine (``scheduler/core/warmup.py``) with views and times made up here, then a
real ``ServeApp``: a vLLM-wire publisher on real ZMQ sockets whose replay is held back, and
the gRPC health service Envoy and the chart's readinessProbe ask.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
import zmq.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from test_kv_subscriber import FakeVLLMPublisher, chain_batches, prompt, until

from scheduler.codec.peersync import encode
from scheduler.core.kvingest import PublisherView
from scheduler.core.peerload import Snapshot, SyncMessage
from scheduler.core.warmup import Warmup, WarmupConfig
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig

CONFIG = WarmupConfig(kv_first_batch_wait_s=5.0, peer_snapshot_wait_s=3.0, max_wait_s=30.0)


def view(
    endpoint: str, *, state: str = "exact", next_seq: int | None = 3, replay: bool = False
) -> PublisherView:
    return PublisherView(endpoint, 0, endpoint, state, "", state == "exact", next_seq, replay)  # type: ignore[arg-type]


def test_waits_for_a_replay_in_flight_then_latches_warm() -> None:
    warmup = Warmup(CONFIG, started_at=100.0)
    replaying = [view("a"), view("b", state="degraded", replay=True)]
    state = warmup.update(100.5, replaying)
    assert not state.warm and state.waiting == ("b: replay in flight",)
    # A replay in flight is not cut short by the silence bound: it ends by itself.
    assert not warmup.update(100.0 + CONFIG.kv_first_batch_wait_s + 1, replaying).warm
    state = warmup.update(107.0, [view("a"), view("b")])
    assert state.warm and state.warm_at == 107.0 and state.given_up == ()
    # A latch: a later gap's replay does not take the replica out of service.
    assert warmup.update(108.0, replaying).warm


def test_a_replay_that_fell_short_or_an_endpoint_without_events_is_settled() -> None:
    warmup = Warmup(CONFIG, started_at=0.0)
    settled = [view("short", state="degraded", next_seq=9), view("none", state="fallback", next_seq=None)]
    assert warmup.update(0.1, settled).warm


def test_a_silent_publisher_holds_readiness_only_for_its_bound() -> None:
    warmup = Warmup(CONFIG, started_at=0.0)
    silent = [view("a"), view("idle", state="degraded", next_seq=None)]
    assert warmup.update(4.9, silent).waiting == ("idle: no KV-event batch yet",)
    state = warmup.update(5.0, silent)
    assert state.warm and state.given_up == ("idle: no KV-event batch yet",)


def test_sync_waits_for_every_known_peers_snapshot_or_its_bound() -> None:
    warmup = Warmup(CONFIG, started_at=0.0)
    state = warmup.update(0.5, [view("a")], sync=True, peers_known=2, peers_with_snapshot=1)
    assert not state.warm and state.waiting == ("peers' snapshots: 1 of 2",)
    assert warmup.update(0.6, [view("a")], sync=True, peers_known=2, peers_with_snapshot=2).warm
    # No peer known (discovery has not answered yet, or a lone replica): one is waited for,
    # up to the bound.
    lone = Warmup(CONFIG, started_at=0.0)
    assert not lone.update(2.9, [], sync=True).warm
    state = lone.update(3.0, [], sync=True)
    assert state.warm and state.given_up == ("peers' snapshots: 0 of 1",)


def test_max_wait_gives_up_on_whatever_still_waits() -> None:
    warmup = Warmup(CONFIG, started_at=0.0)
    endless = [view("b", state="degraded", replay=True)]
    assert not warmup.update(29.9, endless).warm
    state = warmup.update(30.0, endless)
    assert state.warm and state.given_up == ("b: replay in flight",)


def test_off_is_warm_from_the_start() -> None:
    warmup = Warmup(WarmupConfig(enabled=False), started_at=0.0)
    assert warmup.warm and warmup.update(0.0, [view("b", replay=True)]).warm


# --- a real serve: ZMQ publisher, gRPC health ---------------------------------------------------


@pytest.fixture
async def publisher() -> AsyncIterator[FakeVLLMPublisher]:
    context = zmq.asyncio.Context()
    pub = FakeVLLMPublisher(context).open()
    yield pub
    await pub.close()
    context.destroy(linger=0)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def health(port: int) -> set[int]:
    """The statuses of the service Envoy's health check names and of the chart's readinessProbe."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
            for service in ("envoy.service.ext_proc.v3.ExternalProcessor", "readiness")
        }


async def status(port: int) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/debug/status") as resp,
    ):
        document: dict[str, object] = await resp.json()
    return document


async def test_a_starting_serve_is_not_serving_until_the_kv_replay_completes(
    publisher: FakeVLLMPublisher,
) -> None:
    # The engine has a history the starting replica must learn: three batches before it.
    for batch in chain_batches(prompt(3)):
        await publisher.publish(batch)
    publisher.answer_replays = False
    config = ServeConfig.model_validate(
        {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "health_port": 0,
            "metrics_port": 0,
            "tls": {"mode": "plaintext"},
            "shutdown_grace_s": 0.1,
            "endpoints": [
                {
                    "address": f"127.0.0.1:{closed_port()}",
                    "name": "w",
                    "kv_events": publisher.endpoint,
                    "kv_replay": publisher.replay_endpoint,
                }
            ],
            # Neither the replay's own timeout nor the warm-up's bound may end the wait here.
            "kv_events": {"topic": "kv@", "ingest": {"replay_timeout_s": 60}},
            "scheduler": {"index": {"block_size": 4}},
            "warmup": {"max_wait_s": 60},
        }
    )
    async with ServeApp(config) as app:
        assert app.health_port is not None and app.metrics_port is not None
        await until(lambda: bool(publisher.held))
        assert await health(app.health_port) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        warmup = (await status(app.metrics_port))["warmup"]
        assert warmup == {
            "warm": False,
            "warm_after_s": None,
            "waiting": ["w: replay in flight"],
            "given_up": [],
        }
        assert await publisher.answer_held() == 1
        deadline = asyncio.get_running_loop().time() + 10
        while await health(app.health_port) != {health_pb2.HealthCheckResponse.SERVING}:
            assert asyncio.get_running_loop().time() < deadline, "never SERVING after the replay"
            await asyncio.sleep(0.02)
        warmup = (await status(app.metrics_port))["warmup"]
        assert isinstance(warmup, dict) and warmup["warm"] and warmup["given_up"] == []
        (view,) = app.publisher_views()
        assert view.state == "exact" and view.next_seq == 3


async def test_with_sync_on_a_starting_serve_waits_for_its_peers_first_snapshot(
    publisher: FakeVLLMPublisher,
) -> None:
    # The peer: a real PUB socket speaking the sync codec, silent until the test says.
    peer = publisher.ctx.socket(zmq.PUB)
    peer.setsockopt(zmq.LINGER, 0)
    peer_port = peer.bind_to_random_port("tcp://127.0.0.1")
    config = ServeConfig.model_validate(
        {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "health_port": 0,
            "metrics_port": 0,
            "tls": {"mode": "plaintext"},
            "shutdown_grace_s": 0.1,
            "endpoints": [
                {"address": f"127.0.0.1:{closed_port()}", "name": "w", "kv_events": publisher.endpoint}
            ],
            "kv_events": {"topic": "kv@"},
            "scheduler": {"index": {"block_size": 4}, "sync": {"enabled": True}},
            "peer_sync": {"port": 0, "peers": [f"tcp://127.0.0.1:{peer_port}"], "replica": "starting"},
            # Only the snapshot may end the wait here.
            "warmup": {"peer_snapshot_wait_s": 60, "max_wait_s": 60},
        }
    )
    try:
        async with ServeApp(config) as app:
            assert app.health_port is not None and app.metrics_port is not None
            assert await publisher.subscribed() == b"kv@"
            await publisher.publish(chain_batches(prompt(1))[0])
            # The KV events are settled; the peer's snapshot is all that is missing.
            await until(lambda: app.publisher_views()[0].state == "exact")
            warmup = (await status(app.metrics_port))["warmup"]
            assert isinstance(warmup, dict) and warmup["waiting"] == ["peers' snapshots: 0 of 1"]
            assert await health(app.health_port) == {health_pb2.HealthCheckResponse.NOT_SERVING}
            snapshot = SyncMessage("survivor", 1, 1, 0.0, Snapshot(()))
            # PUB drops what it sends before the subscription arrives: send until it lands.
            deadline = asyncio.get_running_loop().time() + 10
            while app.scheduler.peer_load.peers_with_snapshot() == 0:
                assert asyncio.get_running_loop().time() < deadline, "the snapshot never arrived"
                await peer.send(encode(snapshot, time.time()))
                await asyncio.sleep(0.05)
            deadline = asyncio.get_running_loop().time() + 10
            while await health(app.health_port) != {health_pb2.HealthCheckResponse.SERVING}:
                assert asyncio.get_running_loop().time() < deadline, "never SERVING after the snapshot"
                await asyncio.sleep(0.02)
    finally:
        peer.close(0)
