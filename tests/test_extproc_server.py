"""The ext_proc Endpoint Picker over a real gRPC connection, driven the way Envoy drives it.

A real grpc.aio server on 127.0.0.1 (ephemeral port) and a real client stub replay Envoy's
FULL_DUPLEX_STREAMED message sequence: request headers, body chunks, then the response path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.protobuf import struct_pb2
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from scheduler.adapters.extproc import ExtProcConfig, ExtProcServer, TLSSettings
from scheduler.adapters.extproc.observed import ROUTED_HEADER
from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import (
    Completion,
    Endpoint,
    EndpointMetrics,
    PickChoice,
    PickResult,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)
from scheduler.core.scoring import ScoringConfig
from scheduler.core.scoring.config import SessionAffinityConfig

ADDRESSES = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
DEADLINE_S = 10.0


class RecordingScheduler(Scheduler):
    """The real Scheduler, recording what the adapter tells it; it can be made to shed or fail."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(SchedulerConfig(index=IndexConfig(block_size=16)))
        self.set_endpoints([Endpoint(name=address, address=address) for address in addresses], now=0.0)
        self.picks: list[SchedulingRequest] = []
        self.results: list[PickResult] = []
        self.first_tokens: list[tuple[str, float]] = []
        self.completed: list[dict[str, Any]] = []
        self.failed: list[str] = []
        # The pipeline itself never sheds; an admission policy that does is stood in for here.
        self.shed_reason: str | None = None
        self.pick_error: Exception | None = None

    def choose(self, request: SchedulingRequest, now: float) -> PickChoice:
        self.picks.append(request)
        if self.pick_error is not None:
            raise self.pick_error
        if self.shed_reason is not None:
            return PickChoice(PickResult("shed", [], self.shed_reason, {}))
        choice = super().choose(request, now)
        self.results.append(choice.result)
        return choice

    def on_first_token(self, request_id: str, now: float) -> None:
        self.first_tokens.append((request_id, now))
        super().on_first_token(request_id, now)

    def on_completed(
        self,
        request_id: str,
        now: float,
        *,
        served: str | None = None,
        cached_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> Completion | None:
        done = super().on_completed(
            request_id, now, served=served, cached_tokens=cached_tokens, completion_tokens=completion_tokens
        )
        self.completed.append(
            {
                "request_id": request_id,
                "served": served,
                "cached_tokens": cached_tokens,
                "completion_tokens": completion_tokens,
                "accounted_on": done.endpoint if done is not None else None,
            }
        )
        return done

    def on_failed(self, request_id: str, now: float) -> None:
        self.failed.append(request_id)
        super().on_failed(request_id, now)

    def total_inflight(self) -> int:
        return sum(self.inflight(endpoint.name)[0] for endpoint in self.endpoints())


ServerFactory = Callable[..., Awaitable[ExtProcServer]]


@pytest.fixture
async def start_server(extproc_transport: str) -> AsyncIterator[ServerFactory]:
    servers: list[ExtProcServer] = []

    async def start(scheduler: Any, **options: Any) -> ExtProcServer:
        options.setdefault("tls", TLSSettings.plaintext())
        # Most tests read the whole ordered list; the ORIGINAL_DST default has its own test.
        config = options.get("config") or ExtProcConfig(destination_list=True)
        options["config"] = config.model_copy(update={"transport": extproc_transport})
        server = ExtProcServer(scheduler, host="127.0.0.1", port=0, health_port=0, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture
def scheduler() -> RecordingScheduler:
    return RecordingScheduler(ADDRESSES)


class EnvoyStream:
    """One ext_proc stream, written the way Envoy's ext_proc filter writes it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ext_proc_grpc.ExternalProcessorStub(channel).Process()

    async def request_headers(
        self,
        headers: dict[str, str],
        *,
        end_of_stream: bool = False,
        metadata: base_pb2.Metadata | None = None,
        raw: bool = True,
    ) -> None:
        values = [
            base_pb2.HeaderValue(key=key, raw_value=value.encode())
            if raw
            else base_pb2.HeaderValue(key=key, value=value)
            for key, value in headers.items()
        ]
        message = ext_proc.ProcessingRequest(
            request_headers=ext_proc.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream
            )
        )
        if metadata is not None:
            message.metadata_context.CopyFrom(metadata)
        await self.call.write(message)

    async def request_body(self, body: bytes, chunk: int = 16 * 1024) -> None:
        for start in range(0, len(body), chunk):
            piece = body[start : start + chunk]
            end = start + chunk >= len(body)
            await self.call.write(
                ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=piece, end_of_stream=end))
            )

    async def response_headers(
        self,
        status: int = 200,
        content_type: str = "application/json",
        metadata: base_pb2.Metadata | None = None,
    ) -> None:
        headers = [
            base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
            base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
        message = ext_proc.ProcessingRequest(
            response_headers=ext_proc.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))
        )
        if metadata is not None:
            message.metadata_context.CopyFrom(metadata)
        await self.call.write(message)

    async def response_body(self, body: bytes, *, end_of_stream: bool) -> None:
        await self.call.write(
            ext_proc.ProcessingRequest(
                response_body=ext_proc.HttpBody(body=body, end_of_stream=end_of_stream)
            )
        )

    async def read(self) -> ext_proc.ProcessingResponse:
        response = await asyncio.wait_for(self.call.read(), DEADLINE_S)
        assert response is not grpc.aio.EOF, "stream ended early"
        return response

    async def read_end(self) -> None:
        assert await asyncio.wait_for(self.call.read(), DEADLINE_S) is grpc.aio.EOF


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


def _set_headers(response: ext_proc.ProcessingResponse) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    return {option.header.key: option.header.raw_value.decode() for option in mutation.set_headers}


def _metadata_destination(response: ext_proc.ProcessingResponse) -> str:
    return (
        response.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
    )


def _subset_metadata(value: struct_pb2.Value) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.lb.subset_hint"].fields["x-gateway-destination-endpoint-subset"].CopyFrom(
        value
    )
    return metadata


def _served_metadata(address: str) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.lb"].fields[
        "x-gateway-destination-endpoint-served"
    ].string_value = address
    return metadata


def _completion_body(prompt: object, **extra: object) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 8, **extra}).encode()


POST = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}


async def test_headers_only_request_is_answered_at_once(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers(
        {":method": "GET", ":path": "/v1/models", "x-request-id": "r1"}, end_of_stream=True
    )
    response = await stream.read()
    assert response.WhichOneof("response") == "request_headers"
    assert response.request_headers.response.clear_route_cache
    headers = _set_headers(response)
    expected = ",".join(scheduler.results[0].endpoints)
    assert sorted(expected.split(",")) == ADDRESSES
    assert headers["x-gateway-destination-endpoint"] == expected
    assert "content-length" not in headers
    assert _metadata_destination(response) == expected
    assert list(scheduler.picks[0].token_ids) == []
    assert scheduler.picks[0].request_id == "r1"
    # Response path of a headers-only response: completion at the end of the response headers.
    await stream.response_headers()
    assert (await stream.read()).WhichOneof("response") == "response_headers"
    await stream.response_body(b"{}", end_of_stream=True)
    echoed = await stream.read()
    assert echoed.response_body.response.body_mutation.streamed_response.body == b"{}"
    await stream.call.done_writing()
    await stream.read_end()
    # The native transport hands Python a response's end within its lazy wake-up (2 ms).
    await _until(lambda: bool(scheduler.completed))
    assert [entry["request_id"] for entry in scheduler.completed] == ["r1"]


async def test_large_body_is_held_then_rechunked_in_order(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    prompt = "the shared system prompt " * 9000  # about 220 KB
    body = _completion_body(prompt)
    assert len(body) > 220_000
    await stream.request_headers({**POST, "content-length": str(len(body)), "x-request-id": "big"})
    await stream.request_body(body, chunk=16 * 1024)
    first = await stream.read()
    assert first.WhichOneof("response") == "request_headers"
    headers = _set_headers(first)
    assert headers["content-length"] == str(len(body))
    assert headers["x-gateway-destination-endpoint"] == _metadata_destination(first)
    chunks: list[bytes] = []
    while True:
        response = await stream.read()
        assert response.WhichOneof("response") == "request_body"
        streamed = response.request_body.response.body_mutation.streamed_response
        assert len(streamed.body) <= 62_000
        chunks.append(streamed.body)
        if streamed.end_of_stream:
            break
    assert b"".join(chunks) == body
    assert len(chunks) == -(-len(body) // 62_000)
    # The decision saw the whole prompt: the body was held until its end_of_stream.
    assert bytes(scheduler.picks[0].token_ids) == prompt.encode()
    assert scheduler.picks[0].model == "m"
    assert scheduler.picks[0].max_tokens == 8


async def test_fallback_list_order_and_metadata_agree(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    # Fresh metrics (the server's clock is time.monotonic) that load two endpoints, so that
    # the order differs from the configured one.
    for address, waiting in ((ADDRESSES[0], 9), (ADDRESSES[1], 3), (ADDRESSES[2], 0)):
        metrics = EndpointMetrics(waiting=waiting, running=4, kv_usage=0.5)
        scheduler.update_metrics(address, metrics, now=time.monotonic())
    stream = connect(server)
    await stream.request_headers(POST)
    await stream.request_body(_completion_body([1, 2, 3]))
    response = await stream.read()
    expected = ",".join(scheduler.results[0].endpoints)
    assert expected == f"{ADDRESSES[2]},{ADDRESSES[1]},{ADDRESSES[0]}"
    assert _set_headers(response)["x-gateway-destination-endpoint"] == expected
    assert _metadata_destination(response) == expected
    assert list(scheduler.picks[0].token_ids) == [1, 2, 3]


@pytest.mark.parametrize(
    "hint",
    [
        struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=ADDRESSES[1])])
        ),
        struct_pb2.Value(string_value=f" {ADDRESSES[1]} , {ADDRESSES[2]}"),
    ],
    ids=["list", "comma-string"],
)
async def test_subset_hint_restricts_the_pick(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
    hint: struct_pb2.Value,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers(POST, metadata=_subset_metadata(hint))
    await stream.request_body(_completion_body("hi"))
    response = await stream.read()
    subset = scheduler.picks[0].subset
    assert subset is not None and ADDRESSES[1] in subset and ADDRESSES[0] not in subset
    routed = _set_headers(response)["x-gateway-destination-endpoint"].split(",")
    assert set(routed) == subset


def _immediate(response: ext_proc.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    headers = {
        option.header.key: option.header.raw_value.decode() for option in immediate.headers.set_headers
    }
    return immediate.status.code, headers, json.loads(immediate.body)


async def test_empty_subset_hint_is_503(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    empty = struct_pb2.Value(list_value=struct_pb2.ListValue())
    await stream.request_headers(POST, metadata=_subset_metadata(empty))
    await stream.request_body(_completion_body("hi"))
    status, _, body = _immediate(await stream.read())
    assert status == 503
    assert "subset" in body["error"]["message"]
    await stream.read_end()
    assert server.stats.outcomes["no_endpoints"] == 1


async def test_no_endpoints_is_503(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    server = await start_server(RecordingScheduler([]))
    stream = connect(server)
    await stream.request_headers(POST)
    await stream.request_body(_completion_body("hi"))
    status, headers, body = _immediate(await stream.read())
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == 503
    await stream.read_end()


async def test_shed_is_429_with_reason_header(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    scheduler.shed_reason = "saturated:\nqueue over limit"
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-llm-d-inference-objective": "batch"})
    await stream.request_body(_completion_body("hi"))
    status, headers, _ = _immediate(await stream.read())
    assert status == 429
    # Free-text reasons are flattened to a valid header value.
    assert headers["x-llm-d-request-dropped-reason"] == "saturated: queue over limit"
    assert scheduler.picks[0].objective == "batch"
    assert server.stats.outcomes["shed"] == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [(b'{"prompt": "x"', "not valid JSON"), (b'{"messages": 3}', "'messages' must be a list")],
)
async def test_malformed_body_is_400(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
    body: bytes,
    message: str,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, ":path": "/v1/chat/completions"})
    await stream.request_body(body)
    status, _, document = _immediate(await stream.read())
    assert status == 400
    assert message in document["error"]["message"]
    assert scheduler.picks == []
    assert server.stats.outcomes["bad_request"] == 1


async def test_oversized_body_is_413(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(
        scheduler, config=ExtProcConfig(destination_list=True, max_request_body_bytes=1000)
    )
    stream = connect(server)
    await stream.request_headers(POST)
    body = _completion_body("x" * 5000)
    # Envoy stops sending once the immediate response arrives; send just past the limit (the
    # second chunk crosses it, and the stream may end right after it).
    for start in range(0, 1024, 512):
        await stream.call.write(
            ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=body[start : start + 512]))
        )
    status, _, _ = _immediate(await stream.read())
    assert status == 413
    assert scheduler.picks == []


async def test_internal_error_falls_back_to_least_loaded(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    for address, waiting in zip(ADDRESSES, (5, 0, 2), strict=True):
        scheduler.update_metrics(address, EndpointMetrics(waiting=waiting, running=1, kv_usage=0.2), now=0.0)
    scheduler.pick_error = RuntimeError("scorer exploded")
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "f1"})
    await stream.request_body(_completion_body("hi"))
    response = await stream.read()
    destination = _set_headers(response)["x-gateway-destination-endpoint"]
    assert destination == f"{ADDRESSES[1]},{ADDRESSES[2]},{ADDRESSES[0]}"
    assert _metadata_destination(response) == destination
    # fallback_pick registered the request in flight on its primary.
    assert scheduler.inflight(ADDRESSES[1])[0] == 1 and scheduler.total_inflight() == 1
    assert server.stats.outcomes["routed_fallback"] == 1


async def test_internal_error_in_grpc_error_mode_aborts_the_stream(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    scheduler.pick_error = RuntimeError("scorer exploded")
    server = await start_server(
        scheduler, config=ExtProcConfig(destination_list=True, on_internal_error="grpc_error")
    )
    stream = connect(server)
    await stream.request_headers(POST)
    await stream.request_body(_completion_body("hi"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await asyncio.wait_for(stream.call.read(), DEADLINE_S)
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert "scorer exploded" in (failure.value.details() or "")
    assert server.stats.outcomes["internal_error"] == 1
    assert scheduler.total_inflight() == 0


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``, yielding to the server's tasks, for at most DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def _drain_request(stream: EnvoyStream) -> ext_proc.ProcessingResponse:
    first = await stream.read()
    assert first.WhichOneof("response") == "request_headers"
    while True:
        response = await stream.read()
        if response.request_body.response.body_mutation.streamed_response.end_of_stream:
            return first


async def test_streamed_response_reports_served_endpoint_ttft_and_usage(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "s1"})
    await stream.request_body(_completion_body("hi", stream=True))
    await _drain_request(stream)
    await stream.response_headers(content_type="text/event-stream", metadata=_served_metadata(ADDRESSES[2]))
    assert (await stream.read()).WhichOneof("response") == "response_headers"
    events = [
        b'data: {"choices": [{"text": "a"}], "usage": null}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, ',
        b'"prompt_tokens_details": {"cached_tokens": 6}}}\n\ndata: [DONE]\n\n',
    ]
    with caplog.at_level(logging.INFO, logger="kvsched.audit"):
        for index, event in enumerate(events):
            last = index == len(events) - 1
            await stream.response_body(event, end_of_stream=last)
            echoed = (await stream.read()).response_body.response.body_mutation.streamed_response
            assert (echoed.body, echoed.end_of_stream) == (event, last)
            if index == 0:
                await _until(lambda: bool(scheduler.first_tokens))
                assert [rid for rid, _ in scheduler.first_tokens] == ["s1"]
        await _until(lambda: bool(scheduler.completed))
    assert scheduler.completed == [
        {
            "request_id": "s1",
            "served": ADDRESSES[2],
            "cached_tokens": 6,
            "completion_tokens": 4,
            "accounted_on": ADDRESSES[2],
        }
    ]
    assert scheduler.completions == 1 and scheduler.total_inflight() == 0
    audit = [json.loads(record.getMessage()) for record in caplog.records if record.name == "kvsched.audit"]
    assert len(audit) == 1
    assert audit[0]["request_id"] == "s1"
    assert audit[0]["served"] == ADDRESSES[2]
    assert audit[0]["endpoint"] == scheduler.results[0].endpoints[0]
    assert audit[0]["fallbacks"] == scheduler.results[0].endpoints[1:]
    assert audit[0]["cached_tokens"] == 6
    assert audit[0]["ttft_ms"] is not None and audit[0]["e2e_ms"] >= audit[0]["ttft_ms"]
    assert set(audit[0]["scores"]) >= {"prefix_overlap", "queue_depth"}
    assert audit[0]["matched_blocks"] == 0
    assert audit[0]["explanation"]["endpoints"][0] == audit[0]["endpoint"]


async def test_native_transport_dates_a_first_byte_when_it_arrives_not_when_python_takes_it(
    extproc_transport: str,
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    if extproc_transport != "native":
        pytest.skip("the Python transport reads a first byte on the event loop, when it handles it")
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "t1"})
    await stream.request_body(_completion_body("hi", stream=True))
    await _drain_request(stream)
    await stream.response_headers(content_type="text/event-stream")
    await stream.read()
    sent_at = time.monotonic()
    await stream.response_body(b'data: {"choices": [{"text": "a"}]}\n\n', end_of_stream=False)
    # Hold the event loop (not a wait for anything): the native side gets the chunk meanwhile,
    # and Python only takes the event afterwards.
    time.sleep(0.3)
    resumed_at = time.monotonic()
    await _until(lambda: bool(scheduler.first_tokens))
    ((request_id, first_token_at),) = scheduler.first_tokens
    assert request_id == "t1"
    assert sent_at - 0.01 <= first_token_at < resumed_at - 0.15


@pytest.mark.parametrize(
    "prompt",
    [list(range(1, 70)), "hello there"],
    ids=["token ids, decided at once", "text, decided after tokenising"],
)
async def test_native_transport_answers_before_the_picks_bookkeeping(
    prompt: object,
    extproc_transport: str,
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
) -> None:
    if extproc_transport != "native":
        pytest.skip("the Python transport's answer is written after its handler returns")
    events: list[str] = []

    class Route:
        """The native transport's handle, noting when the answer is handed over."""

        def __init__(self, native: Any) -> None:
            self.native = native

        def route(self, *args: Any) -> None:
            events.append("answer")
            self.native.route(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.native, name)

    class Recording(RecordingScheduler):
        def record(self, choice: PickChoice) -> PickResult:
            events.append("record")
            return super().record(choice)

    recording = Recording(ADDRESSES)
    server = await start_server(recording)
    transport = server._native
    assert transport is not None
    transport._native = Route(transport._native)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "b1"})
    await stream.request_body(_completion_body(prompt))
    first = await _drain_request(stream)
    assert _set_headers(first)["x-gateway-destination-endpoint"] == ",".join(recording.results[0].endpoints)
    assert events == ["answer", "record"]
    # Recorded all the same: in flight on its endpoint.
    assert recording.inflight(recording.results[0].endpoints[0])[0] == 1
    assert recording.total_inflight() == 1


async def test_native_transport_keeps_serving_when_the_bookkeeping_after_an_answer_fails(
    extproc_transport: str,
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
) -> None:
    if extproc_transport != "native":
        pytest.skip("only the native transport records after answering")

    class FailingOnce(RecordingScheduler):
        failed_records = 0

        def record(self, choice: PickChoice) -> PickResult:
            if choice.unrecorded is not None and not self.failed_records:
                self.failed_records += 1
                raise RuntimeError("bookkeeping broke")
            return super().record(choice)

    scheduler = FailingOnce(ADDRESSES)
    server = await start_server(scheduler)
    for request_id in ("f1", "f2"):
        stream = connect(server)
        await stream.request_headers({**POST, "x-request-id": request_id})
        await stream.request_body(_completion_body(list(range(1, 70))))
        first = await _drain_request(stream)
        # Answered as picked, the failure notwithstanding.
        picked = ",".join(scheduler.results[-1].endpoints)
        assert _set_headers(first)["x-gateway-destination-endpoint"] == picked
    assert scheduler.failed_records == 1
    assert server.stats.outcomes["internal_error"] == 1 and server.stats.outcomes["routed"] == 2
    # The first request's bookkeeping, left pending by the failure, was done before the
    # second's pick: both are in flight.
    assert scheduler.total_inflight() == 2


async def test_json_response_usage_and_primary_assumed_served(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "j1"})
    await stream.request_body(_completion_body("hi"))
    await _drain_request(stream)
    await stream.response_headers()
    await stream.read()
    document = {
        "choices": [{"text": "ok"}],
        "usage": {"completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 32}},
    }
    raw = json.dumps(document).encode()
    await stream.response_body(raw[:10], end_of_stream=False)
    await stream.read()
    await stream.response_body(raw[10:], end_of_stream=True)
    await stream.read()
    await _until(lambda: bool(scheduler.completed))
    primary = scheduler.results[0].endpoints[0]
    assert scheduler.completed == [
        {
            "request_id": "j1",
            "served": primary,
            "cached_tokens": 32,
            "completion_tokens": 2,
            "accounted_on": primary,
        }
    ]
    assert server.stats.outcomes["completed"] == 1


async def test_upstream_5xx_releases_as_failed(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "e1"})
    await stream.request_body(_completion_body("hi"))
    await _drain_request(stream)
    await stream.response_headers(status=503)
    await stream.read()
    await stream.response_body(b"busy", end_of_stream=True)
    await stream.read()
    await _until(lambda: bool(scheduler.failed))
    assert scheduler.failed == ["e1"]
    assert scheduler.completed == []
    assert server.stats.outcomes["upstream_error"] == 1


async def test_cancelled_stream_releases_the_request(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "c1"})
    await stream.request_body(_completion_body("hi"))
    await _drain_request(stream)
    assert scheduler.total_inflight() == 1
    stream.call.cancel()
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while scheduler.failed != ["c1"]:
        assert asyncio.get_running_loop().time() < deadline, "cancel never reached the scheduler"
        await asyncio.sleep(0.01)
    assert scheduler.total_inflight() == 0
    assert server.stats.outcomes["cancelled"] == 1, server.stats.outcomes


async def test_request_trailers_end_the_body(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers(POST)
    body = _completion_body("hi")
    await stream.call.write(ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=body)))
    await stream.call.write(ext_proc.ProcessingRequest(request_trailers=ext_proc.HttpTrailers()))
    kinds = []
    bodies = []
    for _ in range(3):
        response = await stream.read()
        kinds.append(response.WhichOneof("response"))
        if kinds[-1] == "request_body":
            streamed = response.request_body.response.body_mutation.streamed_response
            bodies.append(streamed.body)
            # The body did not end the stream: trailers follow.
            assert not streamed.end_of_stream
    assert kinds == ["request_headers", "request_body", "request_trailers"]
    assert b"".join(bodies) == body


async def test_headers_read_from_value_or_raw_value(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    headers = {
        **POST,
        "x-request-id": "v1",
        "x-gateway-inference-objective": "chat",
        "x-slo-ttft-ms": "250",
        "x-llm-d-slo-tpot-ms": "20.5",
        "x-llm-d-fairness-id": "tenant-a",
    }
    await stream.request_headers(headers, raw=False)
    await stream.request_body(_completion_body("hi"))
    await stream.read()
    request = scheduler.picks[0]
    assert request.request_id == "v1"
    assert (request.objective, request.slo_ttft_ms, request.slo_tpot_ms, request.fairness_id) == (
        "chat",
        250.0,
        20.5,
        "tenant-a",
    )


async def test_missing_request_id_is_generated_and_forwarded(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    first, second = connect(server), connect(server)
    for stream in (first, second):
        await stream.request_headers(POST)
        await stream.request_body(_completion_body("hi"))
    forwarded = [_set_headers(await stream.read())["x-request-id"] for stream in (first, second)]
    assert {request.request_id for request in scheduler.picks} == set(forwarded)
    assert len(set(forwarded)) == 2


async def test_repeated_request_id_in_flight_is_kept_apart(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    first, second = connect(server), connect(server)
    for stream in (first, second):
        await stream.request_headers({**POST, "x-request-id": "dup"})
        await stream.request_body(_completion_body("hi"))
        await _drain_request(stream)
    ids = sorted(request.request_id for request in scheduler.picks)
    assert ids[0] == "dup" and ids[1].startswith("dup~")
    assert scheduler.total_inflight() == 2


async def test_gateway_without_full_duplex_body_is_answered_on_headers(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    stream = connect(server)
    buffered = ext_proc.ProtocolConfiguration(
        request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
        response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    )
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")])
    await stream.call.write(
        ext_proc.ProcessingRequest(
            request_headers=ext_proc.HttpHeaders(headers=headers), protocol_config=buffered
        )
    )
    # Envoy in BUFFERED mode waits for this answer before it sends the body: it must come now.
    routed = await stream.read()
    assert _set_headers(routed)["x-gateway-destination-endpoint"] == ",".join(scheduler.results[0].endpoints)
    assert "content-length" not in _set_headers(routed)
    await stream.call.write(
        ext_proc.ProcessingRequest(
            request_body=ext_proc.HttpBody(body=_completion_body("hi"), end_of_stream=True)
        )
    )
    body_answer = await stream.read()
    assert body_answer.WhichOneof("response") == "request_body"
    assert not body_answer.request_body.response.HasField("body_mutation")
    assert list(scheduler.picks[0].token_ids) == []


async def test_chat_prompt_tokenised_with_the_model_template_off_the_loop(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
    tmp_path: Path,
) -> None:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["user assistant hello shared prefix"],
        trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]),
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": "<s>"})
    )
    server = await start_server(
        scheduler,
        tokenizer=HFTokenizer(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json"),
        config=ExtProcConfig(destination_list=True, tokenize_in_thread_chars=0),
    )
    stream = connect(server)
    await stream.request_headers({**POST, ":path": "/v1/chat/completions"})
    body = {"model": "m", "messages": [{"role": "user", "content": "hello shared prefix"}]}
    await stream.request_body(json.dumps(body).encode())
    await stream.read()
    expected = tokenizer.encode("<s>user hello shared prefix assistant", add_special_tokens=False).ids
    assert list(scheduler.picks[0].token_ids) == expected
    assert tokenizer.token_to_id("[UNK]") not in expected


async def test_fault_on_the_response_path_fails_the_stream_loudly(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    def broken(request_id: str, now: float) -> None:
        raise RuntimeError("bookkeeping bug")

    scheduler.on_first_token = broken  # type: ignore[method-assign]
    server = await start_server(scheduler)
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "x1"})
    await stream.request_body(_completion_body("hi"))
    await _drain_request(stream)
    await stream.response_headers()
    await stream.read()
    await stream.response_body(b"{}", end_of_stream=True)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        # The Python transport fails the stream before it echoes the chunk; the native one has
        # passed the chunk through already (the response path never waits for Python).
        while True:
            response = await asyncio.wait_for(stream.call.read(), DEADLINE_S)
            assert response is not grpc.aio.EOF, "the stream ended without an error"
            assert response.WhichOneof("response") == "response_body"
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    # The routed request is still released, as the stream's handler unwinds: the client may
    # see the error first.
    await _until(lambda: scheduler.failed == ["x1"])
    assert server.stats.outcomes["internal_error"] == 1


async def test_a_traced_decision_exports_a_span_per_stage(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
    extproc_transport: str,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from scheduler.adapters.tracing import DECISION_SPAN, DecisionTracer
    from scheduler.core.events import BlockStored, EventBatch, Tier

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(scheduler, tracer=DecisionTracer(provider.get_tracer("test")))
    prompt = list(range(1, 4 * 16 + 1))
    stored = BlockStored(list(range(500, 504)), None, prompt, 16, medium=Tier.GPU)
    assert scheduler.index.apply_batch(ADDRESSES[1], EventBatch(0.0, [stored])).stored == 4
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    stream = connect(server)
    headers = {**POST, "x-request-id": "traced", "traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
    await stream.request_headers(headers)
    await stream.request_body(_completion_body([*prompt, 9, 9]))
    routed = await stream.read()
    assert _metadata_destination(routed).split(",")[0] == ADDRESSES[1]

    spans = {span.name: span for span in exporter.get_finished_spans()}
    # The native transport parses the body on a gRPC C++ thread, before Python hears of it.
    parse = ["parse"] if extproc_transport == "python" else []
    assert set(spans) == {DECISION_SPAN, *parse, "flow_control", "lookup", "score", "predict"}
    decision = spans[DECISION_SPAN]
    attributes = dict(decision.attributes or {})
    assert attributes["kvsched.endpoint"] == ADDRESSES[1]
    assert attributes["kvsched.matched_blocks"] == 4
    assert attributes["kvsched.prompt_tokens"] == 66
    assert attributes["kvsched.predicted_ttft_ms"] > 0
    assert attributes["kvsched.outcome"] == "routed"
    # The caller's trace (traceparent) is the decision's; each stage is the decision's child,
    # inside it and in order.
    assert format(decision.context.trace_id, "032x") == caller_trace
    stages = [spans[name] for name in (*parse, "flow_control", "lookup", "score", "predict")]
    for stage in stages:
        assert stage.parent is not None and stage.parent.span_id == decision.context.span_id
        assert decision.start_time <= stage.start_time <= stage.end_time <= decision.end_time
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(stages))

    # A token-id prompt is not tokenised; a text prompt is, and gets its span.
    exporter.clear()
    stream = connect(server)
    await stream.request_headers({**POST, "x-request-id": "text"})
    await stream.request_body(_completion_body("a text prompt"))
    await stream.read()
    names = [span.name for span in exporter.get_finished_spans()]
    assert "tokenize" in names and DECISION_SPAN in names
    assert all(span.context.trace_id != decision.context.trace_id for span in exporter.get_finished_spans())


async def test_candidates_scores_go_in_the_metadata_only_when_asked_for_and_bounded(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    from scheduler.core.events import BlockStored, EventBatch, Tier

    prompt = list(range(1, 4 * 16 + 1))
    stored = BlockStored(list(range(600, 604)), None, prompt, 16, medium=Tier.GPU)
    assert scheduler.index.apply_batch(ADDRESSES[2], EventBatch(0.0, [stored])).stored == 4
    plain = await start_server(scheduler)
    scored = await start_server(scheduler, config=ExtProcConfig(endpoint_scores=2))
    answers = []
    for request_id, server in (("plain", plain), ("scored", scored)):
        stream = connect(server)
        await stream.request_headers({**POST, "x-request-id": request_id})
        await stream.request_body(_completion_body([*prompt, 5]))
        answers.append((await stream.read()).dynamic_metadata.fields["envoy.lb"].struct_value.fields)
    assert "x-gateway-destination-endpoint-scores" not in answers[0]
    scores = dict(answers[1]["x-gateway-destination-endpoint-scores"].struct_value.fields)
    # Two of three candidates: the routed one (which holds the prefix) first and best.
    assert answers[1]["x-gateway-destination-endpoint"].string_value == ADDRESSES[2]
    assert len(scores) == 2 and ADDRESSES[2] in scores
    assert scores[ADDRESSES[2]].number_value > max(
        v.number_value for k, v in scores.items() if k != ADDRESSES[2]
    )
    assert all(0.0 <= value.number_value <= 1.0 for value in scores.values())


async def test_session_header_keeps_a_session_on_one_endpoint_on_every_replica(
    start_server: ServerFactory, connect: Callable[[ExtProcServer], EnvoyStream]
) -> None:
    """Two replicas, each its own Scheduler with the endpoints discovered in another order,
    share nothing: rendezvous hashing of the configured session header agrees anyway."""
    config = SchedulerConfig(
        index=IndexConfig(block_size=16),
        scoring=ScoringConfig(session_affinity=SessionAffinityConfig(hard=True)),
    )
    replicas = []
    for order in (ADDRESSES, ADDRESSES[::-1]):
        replica = Scheduler(config)
        replica.set_endpoints([Endpoint(name=address, address=address) for address in order], now=0.0)
        extproc = ExtProcConfig(destination_list=True, session_header="x-conversation")
        replicas.append(await start_server(replica, config=extproc))

    async def primary(server: ExtProcServer, session: str | None, prompt: list[int]) -> str:
        stream = connect(server)
        await stream.request_headers(POST | ({"x-conversation": session} if session else {}))
        await stream.request_body(_completion_body(prompt))
        return _set_headers(await stream.read())["x-gateway-destination-endpoint"].split(",")[0]

    homes: dict[str, str] = {}
    for turn in range(3):
        for s in range(12):
            session = f"conversation-{s}"
            prompt = [s + 1, turn + 1] * 20  # another prompt every turn: no cache to follow
            picked = {await primary(server, session, prompt) for server in replicas}
            assert len(picked) == 1, f"replicas disagree on {session}: {picked}"
            assert homes.setdefault(session, picked.pop()) in ADDRESSES
    by_session = [homes[f"conversation-{s}"] for s in range(12)]
    assert len(set(by_session)) == len(ADDRESSES)  # sessions spread over the pool
    # Without the header a request is not tied: it goes wherever load sends it.
    assert await primary(replicas[0], None, [5] * 40) in ADDRESSES


# --- the two-filter layout: decision and observation streams ---------------------------------
# Written the way Envoy 1.40 writes them (scheduler/demo/envoy.py; read off a real Envoy, which
# tests/test_e2e_observation.py runs): the decision stream's protocol_config says
# response_body_mode NONE and the stream ends with the request phase; the observation stream
# sets observability_mode on every message and is never answered.

SPLIT = ext_proc.ProtocolConfiguration(
    request_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
)


def _header_map(values: dict[str, str]) -> ext_proc.HttpHeaders:
    return ext_proc.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
        )
    )


async def _route(stream: EnvoyStream, request_id: str) -> str:
    """A request through the decision filter; its routed id. The stream then ends, as Envoy
    resets it after the request phase."""
    await stream.call.write(
        ext_proc.ProcessingRequest(
            request_headers=_header_map({**POST, "x-request-id": request_id}), protocol_config=SPLIT
        )
    )
    await stream.request_body(_completion_body("hello there"))
    routed = _set_headers(await _drain_request(stream))[ROUTED_HEADER]
    stream.call.cancel()
    return routed


async def _observe(stream: EnvoyStream, routed_id: str, chunks: list[bytes], status: int = 200) -> None:
    async def send(**fields: object) -> None:
        await stream.call.write(ext_proc.ProcessingRequest(observability_mode=True, **fields))  # type: ignore[arg-type]

    await send(request_headers=_header_map({**POST, ROUTED_HEADER: routed_id}))
    await send(response_headers=_header_map({":status": str(status), "content-type": "text/event-stream"}))
    for i, chunk in enumerate(chunks):
        await send(response_body=ext_proc.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1))
    await stream.call.done_writing()


SSE = [
    b'data: {"choices": [{"text": "a"}]}\n\n',
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_the_observation_completes_what_the_decision_stream_routed(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    routed_id = await _route(connect(server), "split-1")
    assert routed_id.endswith(server.observations.suffix)
    assert scheduler.total_inflight() == 1
    observation = connect(server)
    await _observe(observation, routed_id, SSE)
    # Nothing is answered on an observation stream.
    await observation.read_end()
    await _until(lambda: len(scheduler.completed) == 1)
    # The decision stream's end did not release it: one completion, no failure.
    assert scheduler.failed == []
    assert [t[0] for t in scheduler.first_tokens] == ["split-1"]
    assert scheduler.completed[0]["completion_tokens"] == 1
    assert scheduler.total_inflight() == 0 and len(server.observations) == 0
    assert server.stats.outcomes["observation"] == 1 and server.stats.outcomes["completed"] == 1


async def test_an_upstream_failure_seen_by_the_observation_releases_as_failed(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    routed_id = await _route(connect(server), "split-5xx")
    await _observe(connect(server), routed_id, [b"overloaded"], status=503)
    await _until(lambda: scheduler.failed == ["split-5xx"])
    assert scheduler.completed == [] and server.stats.outcomes["upstream_error"] == 1


async def test_a_request_never_observed_is_released_at_its_bound(
    start_server: ServerFactory,
    connect: Callable[[ExtProcServer], EnvoyStream],
    scheduler: RecordingScheduler,
) -> None:
    server = await start_server(scheduler)
    await _route(connect(server), "split-lost")
    assert scheduler.total_inflight() == 1
    now = server.runner.clock()
    # The bound peers give a request: 4x its predicted latency, never under 5 s.
    assert server.observations.expire(now + 4.9) == 0 and scheduler.failed == []
    assert server.observations.expire(now + 3600.0) == 1
    assert scheduler.failed == ["split-lost"] and scheduler.total_inflight() == 0
    assert server.stats.outcomes["expired"] == 1
    # Its observation, should it come now, is counted and dropped.
    late = connect(server)
    await _observe(late, f"1{server.observations.suffix}", SSE)
    await late.read_end()
    await _until(lambda: server.stats.outcomes["observation_unknown"] == 1)
    assert scheduler.completed == []
