"""The server object around the servicers: health port, TLS modes, and kvsched.v1 Pick/Report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.adapters.extproc import ExtProcConfig, ExtProcServer, TLSSettings
from scheduler.adapters.extproc.picker_api import load_picker_protos
from scheduler.adapters.extproc.tls import self_signed_certificate
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import (
    Completion,
    Endpoint,
    PickChoice,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)

DEADLINE_S = 10.0
ADDRESSES = ["10.1.0.1:8000", "10.1.0.2:8000"]

protos = load_picker_protos()
if protos is None:
    pytest.skip(
        "scheduler._proto not generated: run python setup.py build_ext --inplace", allow_module_level=True
    )
picker_pb2, picker_pb2_grpc = protos


class RecordingScheduler(Scheduler):
    """The real Scheduler, recording the lifecycle calls the adapter makes."""

    def __init__(self) -> None:
        super().__init__(SchedulerConfig(index=IndexConfig(block_size=16)))
        self.picks: list[SchedulingRequest] = []
        self.first_tokens: list[tuple[str, float]] = []
        self.completed: list[tuple[str, float, Completion | None]] = []
        self.failed: list[str] = []

    def serve(self, addresses: list[str]) -> None:
        self.set_endpoints([Endpoint(name=address, address=address) for address in addresses], now=0.0)

    def choose(self, request: SchedulingRequest, now: float) -> PickChoice:
        self.picks.append(request)
        return super().choose(request, now)

    def on_first_token(self, request_id: str, now: float) -> None:
        self.first_tokens.append((request_id, now))
        super().on_first_token(request_id, now)

    def on_completed(self, request_id: str, now: float, **observed: Any) -> Completion | None:
        done = super().on_completed(request_id, now, **observed)
        self.completed.append((request_id, now, done))
        return done

    def on_failed(self, request_id: str, now: float) -> None:
        self.failed.append(request_id)
        super().on_failed(request_id, now)


class Started(list[ExtProcServer]):
    """The servers a test started, on one transport."""

    def __init__(self, transport: str) -> None:
        super().__init__()
        self.transport = transport


@pytest.fixture
async def servers(extproc_transport: str) -> AsyncIterator[Started]:
    started = Started(extproc_transport)
    yield started
    for server in started:
        await server.stop(0)


async def _start(started: Started, scheduler: Any, **options: Any) -> ExtProcServer:
    config = options.get("config") or ExtProcConfig(destination_list=True)
    options["config"] = config.model_copy(update={"transport": started.transport})
    server = ExtProcServer(scheduler, host="127.0.0.1", port=0, health_port=0, **options)
    await server.start()
    started.append(server)
    return server


async def _health(server: ExtProcServer, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY_SERVICES = ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor", "")


async def test_health_readiness_follows_the_scheduler_endpoints(servers: Started) -> None:
    scheduler = RecordingScheduler()
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext())
    assert server.health_port not in (None, 0, server.port)
    assert await _health(server, "liveness") == SERVING
    for service in READY_SERVICES:
        assert await _health(server, service) == NOT_SERVING
    scheduler.serve(ADDRESSES)
    for service in READY_SERVICES:
        assert await _health(server, service) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _health(server, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_sees_readiness_change(servers: Started) -> None:
    scheduler = RecordingScheduler()
    server = await _start(
        servers,
        scheduler,
        tls=TLSSettings.plaintext(),
        config=ExtProcConfig(destination_list=True, health_refresh_s=0.05),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        first = await asyncio.wait_for(watch.read(), DEADLINE_S)
        assert first.status == NOT_SERVING
        scheduler.serve(ADDRESSES)
        second = await asyncio.wait_for(watch.read(), DEADLINE_S)
        assert second.status == SERVING
        watch.cancel()


async def test_stop_reports_not_serving_and_closes(servers: Started) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext())
    assert await _health(server, "readiness") == SERVING
    port = server.port
    await server.stop(0)
    servers.remove(server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await _headers_only_route(channel)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def _headers_only_route(channel: grpc.aio.Channel) -> str:
    call = ext_proc_grpc.ExternalProcessorStub(channel).Process(timeout=DEADLINE_S)
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v1/models")])
    await call.write(
        ext_proc.ProcessingRequest(request_headers=ext_proc.HttpHeaders(headers=headers, end_of_stream=True))
    )
    response = await asyncio.wait_for(call.read(), DEADLINE_S)
    call.cancel()
    option = response.request_headers.response.header_mutation.set_headers[0]
    assert option.header.key == "x-gateway-destination-endpoint"
    return str(option.header.raw_value.decode())


async def test_self_signed_tls_serves_a_client_that_trusts_the_certificate(
    servers: Started,
) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler)  # TLS self-signed is the default
    assert server.tls.mode == "self_signed"
    assert server.certificate_pem is not None and b"BEGIN CERTIFICATE" in server.certificate_pem
    credentials = grpc.ssl_channel_credentials(root_certificates=server.certificate_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        assert sorted((await _headers_only_route(channel)).split(",")) == ADDRESSES
    # The port really is TLS: a plaintext client cannot talk to it.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await _headers_only_route(channel)


async def test_tls_from_certificate_files(servers: Started, tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(("picker.example",), ("127.0.0.1",), 1)
    (tmp_path / "tls.crt").write_bytes(certificate)
    (tmp_path / "tls.key").write_bytes(key)
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(
        servers, scheduler, tls=TLSSettings.from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
    )
    assert server.certificate_pem == certificate
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        assert sorted((await _headers_only_route(channel)).split(",")) == ADDRESSES


async def test_plaintext_mode(servers: Started) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext())
    assert server.certificate_pem is None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert sorted((await _headers_only_route(channel)).split(",")) == ADDRESSES


async def test_picker_api_pick_and_report(servers: Started) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = picker_pb2_grpc.EndpointPickerStub(channel)
        reply = await stub.Pick(
            picker_pb2.PickRequest(
                request_id="p1",
                token_ids=picker_pb2.TokenIds(ids=[5, 6, 7]),
                model="m",
                subset=picker_pb2.EndpointSubset(endpoints=[ADDRESSES[1]]),
                headers={"X-LLM-D-SLO-TTFT-MS": "300"},
                max_tokens=12,
            ),
            timeout=DEADLINE_S,
        )
        assert reply.status == picker_pb2.PickResponse.OK
        assert list(reply.endpoints) == [ADDRESSES[1]]
        explanation = json.loads(reply.explanation_json)
        assert explanation["endpoints"] == [ADDRESSES[1]]
        assert explanation["filtered"] == {ADDRESSES[0]: "not in subset hint"}
        request = scheduler.picks[0]
        assert (list(request.token_ids), request.model, request.slo_ttft_ms, request.max_tokens) == (
            [5, 6, 7],
            "m",
            300.0,
            12,
        )
        assert request.subset == frozenset({ADDRESSES[1]})
        assert scheduler.inflight(ADDRESSES[1])[0] == 1
        ack = await stub.Report(
            picker_pb2.Completion(
                request_id="p1", ttft_ms=40.0, e2e_ms=90.0, cached_tokens=16, completion_tokens=3
            ),
            timeout=DEADLINE_S,
        )
        assert ack.known
        ((rid, _, done),) = scheduler.completed
        assert rid == "p1" and done is not None
        # Times are rebuilt from the pick time, so the Scheduler sees the caller's latencies.
        assert done.ttft_s == pytest.approx(0.040) and done.e2e_s == pytest.approx(0.090)
        assert (done.endpoint, done.cached_tokens, done.completion_tokens) == (ADDRESSES[1], 16, 3)
        assert scheduler.inflight(ADDRESSES[1]) == (0, 0)
        again = await stub.Report(picker_pb2.Completion(request_id="p1"), timeout=DEADLINE_S)
        assert not again.known


async def test_picker_api_openai_body_errors_and_failures(servers: Started) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = picker_pb2_grpc.EndpointPickerStub(channel)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        ok = await stub.Pick(
            picker_pb2.PickRequest(openai_body=picker_pb2.OpenAIBody(body=body, path="/v1/chat/completions")),
            timeout=DEADLINE_S,
        )
        assert ok.status == picker_pb2.PickResponse.OK and ok.request_id
        assert bytes(scheduler.picks[-1].token_ids) == b"<|user|>\nhi\n<|assistant|>\n"
        bad = await stub.Pick(
            picker_pb2.PickRequest(openai_body=picker_pb2.OpenAIBody(body=b"{", path="/v1/completions")),
            timeout=DEADLINE_S,
        )
        assert bad.status == picker_pb2.PickResponse.BAD_REQUEST and "JSON" in bad.reason
        empty = await stub.Pick(
            picker_pb2.PickRequest(prompt_text="x", subset=picker_pb2.EndpointSubset()), timeout=DEADLINE_S
        )
        assert empty.status == picker_pb2.PickResponse.NO_ENDPOINTS
        failed = await stub.Report(
            picker_pb2.Completion(request_id=ok.request_id, failed=True), timeout=DEADLINE_S
        )
        assert failed.known and scheduler.failed == [ok.request_id]


async def test_picker_api_releases_unreported_picks_beyond_the_bound(servers: Started) -> None:
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    config = ExtProcConfig(destination_list=True, picker_api_max_pending=2)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext(), config=config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = picker_pb2_grpc.EndpointPickerStub(channel)
        for index in range(3):
            await stub.Pick(
                picker_pb2.PickRequest(request_id=f"u{index}", prompt_text="x"), timeout=DEADLINE_S
            )
        assert scheduler.failed == ["u0"]
        with pytest.raises(grpc.aio.AioRpcError) as duplicate:
            await stub.Pick(picker_pb2.PickRequest(request_id="u2", prompt_text="x"), timeout=DEADLINE_S)
        assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert server.stats.outcomes["unreported"] == 1


async def test_outcomes_are_exported_to_a_prometheus_registry(servers: Started) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    scheduler = RecordingScheduler()
    scheduler.serve(ADDRESSES)
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext(), metrics_registry=registry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await _headers_only_route(channel)
    assert registry.get_sample_value("kvsched_picker_requests_total", {"outcome": "routed"}) == 1.0
    assert registry.get_sample_value("kvsched_picker_requests_total", {"outcome": "shed"}) == 0.0
    assert registry.get_sample_value("kvsched_picker_decision_seconds_count") == 1.0


async def test_picker_api_lookup_answers_per_rank_and_tier_and_reserves_nothing(servers: Started) -> None:
    from scheduler.adapters.tokenizer import make_tokenizer
    from scheduler.codec.openai import ChatMessage, InferenceRequestBody
    from scheduler.core.events import BlockStored, EventBatch, Tier
    from scheduler.sim.tokenizer import MODEL_DIR

    tokenizer = make_tokenizer(tokenizer_dir=MODEL_DIR)  # the simulated model's real tokenizer
    text = "The prefix cache keeps every block of a prompt that an engine has computed. " * 8
    messages = [ChatMessage("system", "You answer briefly."), ChatMessage("user", text)]
    text_ids = tokenizer.token_ids(InferenceRequestBody("completions", prompt_text=text))
    chat_ids = tokenizer.token_ids(InferenceRequestBody("chat", messages=tuple(messages)))
    scheduler = RecordingScheduler()
    scheduler.set_endpoints(
        [
            Endpoint(ADDRESSES[0], ADDRESSES[0], kv_events="tcp://10.1.0.1:5557", data_parallel_size=2),
            Endpoint(ADDRESSES[1], ADDRESSES[1], kv_events="tcp://10.1.0.2:5557"),
        ],
        now=0.0,
    )
    # Rank 1 of the first endpoint holds the text's first three blocks (the last on CPU), the
    # second endpoint the chat's first two.
    for worker, ids, blocks, tier in (
        (f"{ADDRESSES[0]}#dp1", text_ids, 2, Tier.GPU),
        (ADDRESSES[1], chat_ids, 2, Tier.GPU),
    ):
        stored = BlockStored(list(range(1, blocks + 1)), None, ids[: blocks * 16], 16, medium=tier)
        scheduler.index.apply_batch(worker, EventBatch(0.0, [stored]))
    cpu = BlockStored([3], 2, text_ids[32:48], 16, medium=Tier.CPU)
    scheduler.index.apply_batch(f"{ADDRESSES[0]}#dp1", EventBatch(0.0, [cpu]))
    server = await _start(servers, scheduler, tls=TLSSettings.plaintext(), tokenizer=tokenizer)
    body = json.dumps({"model": "m", "messages": [{"role": m.role, "content": m.content} for m in messages]})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = picker_pb2_grpc.EndpointPickerStub(channel)
        by_text = await stub.Lookup(picker_pb2.LookupRequest(prompt_text=text, model="m"), timeout=DEADLINE_S)
        by_ids = await stub.Lookup(
            picker_pb2.LookupRequest(token_ids=picker_pb2.TokenIds(ids=text_ids)), timeout=DEADLINE_S
        )
        by_chat = await stub.Lookup(
            picker_pb2.LookupRequest(
                messages=picker_pb2.ChatMessages(
                    messages=[picker_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]
                )
            ),
            timeout=DEADLINE_S,
        )
        by_body = await stub.Lookup(
            picker_pb2.LookupRequest(openai_body=picker_pb2.OpenAIBody(body=body.encode())),
            timeout=DEADLINE_S,
        )
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Lookup(picker_pb2.LookupRequest(model="m"), timeout=DEADLINE_S)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Lookup(
                picker_pb2.LookupRequest(openai_body=picker_pb2.OpenAIBody(body=b"{")), timeout=DEADLINE_S
            )
    assert empty.value.code() == bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names no prompt" in (empty.value.details() or "")
    assert (by_text.model, by_text.prompt_tokens, by_text.prompt_blocks) == (
        "m",
        len(text_ids),
        len(text_ids) // 16,
    )
    assert (by_text.block_size, by_text.hash_mode, by_text.keys_compared) == (16, "own", 4)
    first, second = by_text.endpoints
    assert (first.name, first.address, first.healthy, first.source, first.matched_blocks) == (
        ADDRESSES[0],
        ADDRESSES[0],
        True,
        "kv_events",
        3,
    )
    ranks = [
        (r.rank, r.worker, r.matched_blocks, r.gpu_blocks, r.cpu_blocks, r.storage_blocks, r.keys_compared)
        for r in first.ranks
    ]
    assert ranks == [(0, ADDRESSES[0], 0, 0, 0, 0, 1), (1, f"{ADDRESSES[0]}#dp1", 3, 2, 1, 0, 4)]
    assert second.matched_blocks == 0
    # Token ids and text agree; a chat matches through the chat template, as a pick would.
    assert by_ids.endpoints == by_text.endpoints
    assert (
        [e.matched_blocks for e in by_chat.endpoints]
        == [0, 2]
        == [e.matched_blocks for e in by_body.endpoints]
    )
    assert by_body.model == "m" and by_chat.prompt_tokens == len(chat_ids)
    # Read-only: nothing was picked or reserved.
    assert scheduler.picks == [] and scheduler.inflight(ADDRESSES[0]) == scheduler.inflight(ADDRESSES[1]) == (
        0,
        0,
    )
