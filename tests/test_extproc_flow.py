"""Flow control on the ext_proc path: while the pool is saturated a request waits on a real
gRPC stream, sheddable requests get 429 with the GIE's dropped-reason header, a wait that
runs out gets an explained 503, and capacity freed by a completion lets the next one go."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from test_extproc_server import (  # the same harness: a real gRPC server and Envoy-shaped streams
    ADDRESSES,
    POST,
    EnvoyStream,
    RecordingScheduler,
    ServerFactory,
    _completion_body,
    _drain_request,
    _immediate,
    _set_headers,
)

from scheduler.adapters.extproc import ExtProcConfig, ExtProcServer, TLSSettings
from scheduler.core.flowcontrol import SHED_SATURATED, WAIT_EXCEEDED, FlowControlConfig
from scheduler.core.objectives import Objective, ObjectiveTable
from scheduler.core.scheduler import EndpointMetrics

DROPPED = "x-llm-d-request-dropped-reason"


@pytest.fixture
async def start_server(extproc_transport: str) -> AsyncIterator[ServerFactory]:
    servers: list[ExtProcServer] = []

    async def start(scheduler: RecordingScheduler, **options: Any) -> ExtProcServer:
        server = ExtProcServer(
            scheduler,
            host="127.0.0.1",
            port=0,
            health_port=0,
            tls=TLSSettings.plaintext(),
            config=ExtProcConfig(destination_list=True, transport=extproc_transport),  # type: ignore[arg-type]
            **options,
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[ExtProcServer], EnvoyStream]]:
    channels: list[grpc.aio.Channel] = []

    def open_stream(server: ExtProcServer) -> EnvoyStream:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return EnvoyStream(channel)

    yield open_stream
    for channel in channels:
        await channel.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds; fail rather than hang."""
    deadline = time.monotonic() + 10.0
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0)


def _saturated(flow: FlowControlConfig) -> RecordingScheduler:
    scheduler = RecordingScheduler(ADDRESSES)
    scheduler.reload(scheduler.config.model_copy(update={"flow_control": flow}))
    scheduler.set_objectives(ObjectiveTable.of([Objective("batch", priority=-1), Objective("gold", 10)]))
    busy = EndpointMetrics(waiting=flow.queue_depth_threshold, running=64, kv_usage=0.5)
    for address in ADDRESSES:
        # The server's clock is time.monotonic: metrics stamped now are fresh, hence trusted.
        scheduler.update_metrics(address, busy, now=time.monotonic())
    return scheduler


async def _send(stream: EnvoyStream, request_id: str, objective: str | None = None) -> None:
    headers = {**POST, "x-request-id": request_id}
    if objective:
        headers["x-llm-d-inference-objective"] = objective
    await stream.request_headers(headers)
    await stream.request_body(_completion_body("hello"))


async def test_sheddable_request_is_429_with_reason_while_saturated(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    scheduler = _saturated(FlowControlConfig())
    server = await start_server(scheduler)
    stream = connect(server)
    await _send(stream, "b1", "batch")
    status, headers, body = _immediate(await stream.read())
    assert status == 429 and headers[DROPPED] == SHED_SATURATED
    assert SHED_SATURATED in body["error"]["message"]
    assert scheduler.picks == [] and server.stats.outcomes["shed"] == 1
    assert scheduler.flow.stats.rejected == {SHED_SATURATED: 1}


async def test_waiting_request_goes_when_capacity_frees_highest_priority_first(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    scheduler = _saturated(FlowControlConfig(max_wait_s=30.0))
    server = await start_server(scheduler)
    plain, gold = connect(server), connect(server)
    await _send(plain, "p1")
    reading_plain = asyncio.ensure_future(plain.read())
    await _send(gold, "g1", "gold")
    reading_gold = asyncio.ensure_future(gold.read())
    # Both wait in kvsched: nothing was picked yet.
    await _until(lambda: len(scheduler.flow) == 2)
    assert scheduler.picks == [] and not reading_plain.done() and not reading_gold.done()

    # One endpoint drains; a finished request pokes the gate: the gold request goes first.
    scheduler.update_metrics(
        ADDRESSES[0], EndpointMetrics(waiting=0, running=1, kv_usage=0.1), now=time.monotonic()
    )
    assert server.flow_gate is not None
    server.flow_gate.poke()
    first = await asyncio.wait_for(reading_gold, 10)
    second = await asyncio.wait_for(reading_plain, 10)
    assert first.WhichOneof("response") == second.WhichOneof("response") == "request_headers"
    # The endpoint has room for both (waiting 0 + 2 routed since its scrape < 5): the gold
    # request was picked first, both onto the endpoint that drained.
    assert [p.request_id for p in scheduler.picks] == ["g1", "p1"]
    for answer in (first, second):
        assert _set_headers(answer)["x-gateway-destination-endpoint"].split(",")[0] == ADDRESSES[0]
    assert scheduler.flow.stats.dispatched_from_queue == 2


async def test_completion_releases_the_next_waiting_request(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    scheduler = _saturated(FlowControlConfig(max_wait_s=30.0, max_inflight_per_endpoint=1))
    for address in ADDRESSES[1:]:
        scheduler.update_metrics(
            address, EndpointMetrics(waiting=9, running=64, kv_usage=0.9), now=time.monotonic()
        )
    scheduler.update_metrics(
        ADDRESSES[0], EndpointMetrics(waiting=0, running=0, kv_usage=0.0), now=time.monotonic()
    )
    server = await start_server(scheduler)
    first, second = connect(server), connect(server)
    await _send(first, "r1")
    await _drain_request(first)  # routed at once: the pool had room
    await _send(second, "r2")
    reading = asyncio.ensure_future(second.read())
    # One in flight on the only endpoint with room: saturated, so r2 waits.
    await _until(lambda: "r2" in scheduler.flow)
    await first.response_headers()
    await first.read()
    await first.response_body(b'{"choices": [{"text": "x"}]}', end_of_stream=True)
    await first.read()
    answer = await asyncio.wait_for(reading, 10)
    assert answer.WhichOneof("response") == "request_headers"
    assert [p.request_id for p in scheduler.picks] == ["r1", "r2"]


async def test_wait_bound_gives_an_explained_503(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = _saturated(FlowControlConfig(max_wait_s=0.05))
    server = await start_server(scheduler)
    stream = connect(server)
    with caplog.at_level(logging.INFO, logger="kvsched.audit"):
        await _send(stream, "w1")
        status, headers, _ = _immediate(await stream.read())
    assert status == 503 and headers[DROPPED] == WAIT_EXCEEDED
    assert scheduler.picks == [] and server.stats.outcomes["queue_timeout"] == 1
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvsched.audit"]
    assert audit and audit[-1]["decision"] == "queue_timeout" and audit[-1]["reason"] == WAIT_EXCEEDED


async def test_audit_line_carries_predicted_and_observed_ttft(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler = RecordingScheduler(ADDRESSES)
    server = await start_server(scheduler)
    stream = connect(server)
    with caplog.at_level(logging.INFO, logger="kvsched.audit"):
        await _send(stream, "a1")
        await _drain_request(stream)
        await stream.response_headers()
        await stream.read()
        await stream.response_body(
            b'{"choices": [{"text": "x"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}',
            end_of_stream=True,
        )
        await stream.read()
        # The native transport hands Python a response's end within its lazy wake-up (2 ms).
        await _until(lambda: server.stats.outcomes["completed"] == 1)
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvsched.audit"]
    assert len(audit) == 1 and audit[0]["outcome"] == "completed"
    assert audit[0]["predicted_ttft_ms"] > 0 and audit[0]["prediction_source"] == "prior"
    assert audit[0]["ttft_ms"] is not None
    # The completion was learned from: the predictor holds one observation.
    assert scheduler.predictor.stats.observed == 1


async def test_a_failure_inside_flow_control_still_routes_the_request(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    scheduler = RecordingScheduler(ADDRESSES)
    server = await start_server(scheduler)
    assert server.flow_gate is not None

    def broken(item: object) -> object:
        raise RuntimeError("flow control broke")

    server.flow_gate.admit_now = broken  # type: ignore[method-assign,assignment]
    stream = connect(server)
    await _send(stream, "f1")
    answer = await _drain_request(stream)
    assert answer.WhichOneof("response") == "request_headers"
    assert [p.request_id for p in scheduler.picks] == ["f1"]
    assert server.stats.outcomes["routed"] == 1
