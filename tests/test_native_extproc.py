"""The native ext_proc transport's halves held against their Python twins.

The native side parses request bodies (simdjson), captures response usage and builds the
routing answers itself; each must agree with the Python code the other transport runs
(codec/openai.py, adapters/extproc/usage.py, adapters/extproc/responses.py), on fixed cases
and on generated ones. The protocol end to end is tested over real gRPC in
test_extproc_server.py / test_extproc_flow.py / test_extproc_api.py and through a real Envoy in
test_e2e_envoy.py, once per transport.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.adapters.extproc import ExtProcConfig, ExtProcServer, TLSSettings, native, responses, server
from scheduler.adapters.extproc.native import load_native
from scheduler.adapters.extproc.usage import CaptureKind, ResponseUsageReader, usage_from_capture
from scheduler.codec.openai import BadRequestBody, ChatMessage, InferenceRequestBody, parse_request_body

extproc = load_native()
needs_native = pytest.mark.skipif(extproc is None, reason="scheduler._native.extproc not built")


def _python_view(body: bytes, path: str | None) -> tuple[Any, ...] | None:
    """parse_request_body's answer in the shape the native parser gives, None for a 400."""
    try:
        parsed = parse_request_body(body, path)
    except BadRequestBody:
        return None
    messages = tuple((m.role, m.content) for m in parsed.messages) if parsed.api == "chat" else None
    ids = None if parsed.prompt_token_ids is None else list(parsed.prompt_token_ids)
    view = (parsed.api, parsed.model, parsed.max_tokens, parsed.stream, ids, parsed.prompt_text, messages)
    return (*view, parsed.tools)


def _native_view(body: bytes, path: str | None) -> tuple[Any, ...] | None:
    assert extproc is not None
    parsed = extproc.parse_body(body, path)
    if parsed is None:
        return None
    api, model, max_tokens, stream, token_ids, text, messages = parsed
    ids = None if token_ids is None else list(token_ids)
    # The native record has no tools: a body with tools must be left to Python.
    return (api, model, max_tokens, stream, ids, text, messages, ())


def _agrees(body: bytes, path: str | None) -> bool:
    """The native parser answers exactly as Python does, or leaves the body to Python."""
    native_view = _native_view(body, path)
    return native_view is None or native_view == _python_view(body, path)


FIXED_BODIES = [
    (b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}', "/v1/completions"),
    (b'{"prompt": "hello", "stream": true}', "/v1/completions?x=1"),
    (b'{"prompt": ["first", 7], "stream": null}', "/v1/completions/"),
    (b'{"prompt": [[5, 6], "x"]}', None),
    (b'{"prompt": [18446744073709551615]}', None),
    (b'{"prompt": [18446744073709551616]}', None),  # beyond 64 bits: Python's, not simdjson's
    (b'{"prompt": [-0, 0]}', None),
    (b'{"prompt": [1.0]}', None),
    (b'{"prompt": [true]}', None),
    (b'{"prompt": []}', None),
    (b'{"prompt": [[]]}', None),
    (b'{"prompt": null}', "/v1/completions"),
    (b'{"model": "a", "model": "b", "prompt": "x"}', None),  # Python keeps the last one
    (b'{"model": "\\ud800", "prompt": "x"}', None),  # a lone surrogate: Python accepts it
    (b'{"model": NaN, "prompt": "x"}', None),
    (b'\xef\xbb\xbf{"prompt": "bom"}', None),
    (b'{"prompt": "x", "max_tokens": 5.0}', None),
    (b'{"prompt": "x", "max_tokens": -1}', None),
    (b'{"prompt": "x", "max_tokens": false}', None),
    (b'{"prompt": "x", "stream": 1}', None),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3, "max_tokens": "x"}',
        None,
    ),
    (
        b'{"messages": [{"role": "user", "content": null}, {"role": "tool", "content": [{"type": "text", '
        b'"text": "a"}, {"type": "image_url"}, {"text": "b", "type": "text"}]}]}',
        "/v1/chat/completions",
    ),
    (b'{"messages": [{"role": "", "content": "x"}]}', None),
    (b'{"messages": [{"role": "user", "content": [1]}]}', None),
    (b'{"messages": [{"role": "user", "content": [{"type": 3}]}]}', None),
    (b'{"messages": []}', None),
    (b'{"messages": {"role": "user"}}', None),
    (b'{"messages": [{"role": "user", "content": "x"}], "prompt": [1]}', "/v1/completions"),
    (b'{"input": "embed me", "model": "e"}', "/v1/embeddings"),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}',
        None,
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": null}', "/v1/chat/completions"),
    (b'{"messages": [{"role": "user", "content": "x"}], "system": "be brief"}', "/v1/messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "system": "be brief"}', "/proxy/v1/messages/"),
    (b'{"input": "hello", "instructions": "be brief"}', "/v1/responses"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "/v1/responses"),
    (b"[1, 2]", None),
    (b'{"prompt": "x"} trailing', None),
    (b'{"prompt": "tab\\t and \\u00e9 and \\ud83d\\ude00"}', None),
    (json.dumps({"prompt": "deep", "x": [[[[[[[[[[[[1]]]]]]]]]]]]}).encode(), None),
    (b'{"prompt": "x", "extra": ' + b"[" * 300 + b"]" * 300 + b"}", None),
]


@needs_native
@pytest.mark.parametrize(("body", "path"), FIXED_BODIES)
def test_native_body_parser_agrees_with_parse_request_body(body: bytes, path: str | None) -> None:
    assert _agrees(body, path)


@needs_native
def test_native_body_parser_answers_the_common_bodies_itself() -> None:
    # A fast path that always fell back would agree trivially: the usual bodies are its own.
    for body, path in FIXED_BODIES[:4] + FIXED_BODIES[21:22]:
        assert _native_view(body, path) is not None, body
    ids = list(range(8192))
    parsed = _native_view(json.dumps({"model": "m", "prompt": ids}).encode(), "/v1/completions")
    assert parsed is not None and parsed[4] == ids


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**66),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=6),
)
_part = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["text", "image_url", 1]),
        "text": st.one_of(st.text(max_size=5), st.just(2)),
    },
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "", 3]),
        "content": st.one_of(_json_scalars, st.lists(_part, max_size=3)),
    },
)
_prompt = st.one_of(
    _json_scalars,
    st.lists(st.integers(min_value=-1, max_value=2**64), max_size=8),
    st.lists(
        st.one_of(st.text(max_size=4), st.lists(st.integers(min_value=0, max_value=9), max_size=3)),
        max_size=3,
    ),
    st.lists(_json_scalars, max_size=3),
)
_document = st.fixed_dictionaries(
    {},
    optional={
        "model": _json_scalars,
        "prompt": _prompt,
        "messages": st.one_of(_json_scalars, st.lists(_message, max_size=3)),
        "max_tokens": _json_scalars,
        "max_completion_tokens": _json_scalars,
        "stream": _json_scalars,
        "other": _json_scalars,
    },
)


@needs_native
@settings(max_examples=400, deadline=None)
@given(
    document=_document,
    path=st.sampled_from([None, "/v1/completions", "/v1/chat/completions", "/v1/embeddings", ""]),
    duplicate=st.sampled_from([None, "model", "prompt", "stream"]),
)
def test_native_body_parser_agrees_on_generated_bodies(
    document: dict[str, Any], path: str | None, duplicate: str | None
) -> None:
    body = json.dumps(document)
    if duplicate is not None:
        # JSON allows a repeated key; Python keeps its last value.
        body = body[:-1] + ("," if document else "") + f'"{duplicate}": "again"}}'
    assert _agrees(body.encode(), path)


# --- usage ------------------------------------------------------------------------------------

SSE = (
    b'data: {"choices": [{"text": "a"}], "usage": null}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, '
    b'"prompt_tokens_details": {"cached_tokens": 6}}}\r\n\r\ndata: [DONE]\n\n'
)
JSON = json.dumps(
    {"choices": [{"text": "ok"}], "usage": {"completion_tokens": 2, "prompt_tokens": 5}}
).encode()


def _python_capture(content_type: str | None, chunks: list[bytes], max_json: int) -> tuple[int, bytes]:
    reader = ResponseUsageReader(content_type, max_json)
    for chunk in chunks:
        reader.feed(chunk)
    kind, data = reader.capture()
    return int(kind), data


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(body)) for cut in cuts})
    pieces, start = [], 0
    for point in [*points, len(body)]:
        pieces.append(body[start:point])
        start = point
    return pieces


@needs_native
@pytest.mark.parametrize(
    ("content_type", "body", "max_json"),
    [
        ("text/event-stream; charset=utf-8", SSE, 1 << 20),
        (None, SSE, 1 << 20),
        ("application/json", JSON, 1 << 20),
        ("application/json", JSON, 20),  # past the cap: the tail is searched
        ("application/json", b"x" * 70_000 + JSON, 100),  # the tail is the last 64 KiB
        (None, b"  " + JSON, 1 << 20),
        ("text/event-stream", b"data: " + b"x" * 100 + b'"usage" : {"completion_tokens": 1}', 1 << 20),
        ("Text/Event-Stream", b": comment\nevent: x\n", 1 << 20),
        (None, b"", 1 << 20),
    ],
)
def test_native_usage_capture_agrees_with_the_reader(
    content_type: str | None, body: bytes, max_json: int
) -> None:
    assert extproc is not None
    for cuts in ([], [1], [7, 8, 9], list(range(0, len(body), 13))):
        chunks = _split(body, cuts)
        expected = _python_capture(content_type, chunks, max_json)
        assert tuple(extproc.capture_usage(content_type, chunks, max_json)) == expected
    kind, data = extproc.capture_usage(content_type, [body], max_json)
    reader = ResponseUsageReader(content_type, max_json)
    reader.feed(body)
    assert usage_from_capture(CaptureKind(kind), data) == reader.usage()


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.one_of(
            st.just(b"data: [DONE]"),
            st.just(b'data: {"usage": {"completion_tokens": 3}}'),
            st.just(b'data: {"usage": null}'),
            st.binary(max_size=12),
        ),
        max_size=6,
    ),
    newline=st.sampled_from([b"\n", b"\r\n", b"\n\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=5),
    content_type=st.sampled_from([None, "text/event-stream", "application/json"]),
    max_json=st.sampled_from([0, 16, 1 << 20]),
)
def test_native_usage_capture_agrees_on_generated_streams(
    events: list[bytes], newline: bytes, cuts: list[int], content_type: str | None, max_json: int
) -> None:
    assert extproc is not None
    chunks = [chunk for chunk in _split(newline.join(events), cuts) if chunk]
    assert tuple(extproc.capture_usage(content_type, chunks, max_json)) == _python_capture(
        content_type, chunks, max_json
    )


# --- answers ----------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize(
    ("destination", "length", "extra", "scores"),
    [
        ("10.0.0.1:8000", 1234, [], []),
        ("10.0.0.1:8000,10.0.0.2:8000", None, [("x-request-id", "abc")], []),
        ("10.0.0.3:8000", 0, [("x-odd", "line\nbreak\x7f")], []),
        ("10.0.0.3:8000", 10, [], [("10.0.0.3:8000", 0.875), ("10.0.0.1:8000", 0.5), ("[::1]:8000", 0.0)]),
    ],
)
def test_native_route_answer_equals_the_python_one(
    destination: str, length: int | None, extra: list[tuple[str, str]], scores: list[tuple[str, float]]
) -> None:
    assert extproc is not None
    native_bytes = extproc.route_response(destination, length, extra, scores or None)
    native_answer = ext_proc.ProcessingResponse.FromString(native_bytes)
    assert native_answer == responses.route_headers_response(destination, length, extra, scores)
    fields = native_answer.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert ("x-gateway-destination-endpoint-scores" in fields) == bool(scores)


@needs_native
@pytest.mark.parametrize(("size", "end_of_stream"), [(0, True), (1, False), (62_000, True), (150_001, True)])
def test_native_body_chunks_equal_the_python_ones(size: int, end_of_stream: bool) -> None:
    assert extproc is not None
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    native_chunks = [
        ext_proc.ProcessingResponse.FromString(raw)
        for raw in extproc.body_chunks(body, 62_000, end_of_stream)
    ]
    assert native_chunks == list(responses.request_body_responses(body, 62_000, end_of_stream))


# --- choosing the transport --------------------------------------------------------------------


def test_auto_falls_back_to_python_and_native_is_refused_without_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "load_native", lambda: None)
    assert server.resolve_transport("auto") == "python"
    assert server.resolve_transport("python") == "python"
    with pytest.raises(RuntimeError, match=r"built without scheduler\._native\.extproc"):
        server.resolve_transport("native")


@needs_native
async def test_auto_serves_native_when_built() -> None:
    picker = ExtProcServer(
        _NoScheduler(), host="127.0.0.1", port=0, health_port=None, tls=TLSSettings.plaintext()
    )
    assert picker.config.transport == "auto" and picker.transport == "native"
    await picker.start()
    try:
        assert picker.port and picker.health_port is None
    finally:
        await picker.stop(0)
    chosen = ExtProcServer(_NoScheduler(), config=ExtProcConfig(transport="python"))
    assert chosen.transport == "python"


class _NoScheduler:
    def endpoints(self) -> list[Any]:
        return []


def test_parsed_tuple_becomes_the_codec_record() -> None:
    body, ids = native._inference_body(("chat", "m", 3, True, None, None, (("user", "hi"),)))
    assert body == InferenceRequestBody(
        "chat", model="m", messages=(ChatMessage("user", "hi"),), max_tokens=3, stream=True
    )
    assert ids is None


@needs_native
async def test_a_fork_with_both_grpc_cores_serving_runs_and_exits() -> None:
    # grpcio's core (with its fork handlers) and libgrpc 1.51 (none registered) in one process.
    assert extproc is not None
    transport = extproc.Transport({"host": "127.0.0.1", "port": 0, "health_port": 0})
    transport.start()
    python_server = grpc.aio.server()
    python_server.add_insecure_port("127.0.0.1:0")
    await python_server.start()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        await python_server.stop(0)
        await asyncio.to_thread(transport.shutdown, 0.0)
