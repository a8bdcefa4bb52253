"""Reading OpenAI usage from response bodies as they stream past: SSE and JSON, any chunking."""

from __future__ import annotations

import json

from scheduler.adapters.extproc.usage import ResponseUsageReader, Usage


def _sse(events: list[object]) -> bytes:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def _usage(prompt: int, completion: int, cached: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


SSE_STREAM = _sse(
    [
        {"id": "c1", "choices": [{"text": 'say "usage": {"x": 1}'}], "usage": None},
        {"id": "c1", "choices": [{"text": "b"}], "usage": _usage(10, 1, 0)},
        {"id": "c1", "choices": [], "usage": _usage(10, 2, 8)},
    ]
)


def _read(body: bytes, content_type: str | None, chunk: int, max_json: int = 1 << 20) -> Usage | None:
    reader = ResponseUsageReader(content_type, max_json)
    for start in range(0, len(body), chunk):
        reader.feed(body[start : start + chunk])
    return reader.usage()


def test_sse_last_usage_wins_for_every_chunking() -> None:
    expected = Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=8)
    for chunk in (1, 2, 3, 7, 64, len(SSE_STREAM)):
        assert _read(SSE_STREAM, "text/event-stream; charset=utf-8", chunk) == expected


def test_sse_detected_without_content_type_and_crlf_lines() -> None:
    body = SSE_STREAM.replace(b"\n", b"\r\n")
    assert _read(body, None, 5) == Usage(10, 2, 8)


def test_sse_without_usage_and_final_line_without_newline() -> None:
    assert _read(_sse([{"choices": [], "usage": None}]), "text/event-stream", 4) is None
    tail = b'data: {"usage": {"completion_tokens": 3}}'
    assert _read(tail, "text/event-stream", 6) == Usage(None, 3, None)


def test_json_body_parsed_whole() -> None:
    document = {
        "choices": [{"text": '"usage": {"completion_tokens": 99}'}],
        "usage": _usage(5, 4, 3),
        "kv_transfer_params": None,
    }
    body = json.dumps(document).encode()
    assert _read(body, "application/json", 3) == Usage(5, 4, 3)


def test_json_beyond_the_parse_cap_reads_the_tail() -> None:
    document = {"choices": [{"text": "x" * 5000}], "usage": _usage(7, 6, 5)}
    body = json.dumps(document).encode()
    assert _read(body, "application/json", 100, max_json=1000) == Usage(7, 6, 5)


def test_non_json_and_bad_counts_give_nothing() -> None:
    assert _read(b"<html>oops</html>", "text/html", 4) is None
    bad = json.dumps({"usage": {"completion_tokens": -1, "prompt_tokens_details": {"cached_tokens": "8"}}})
    assert _read(bad.encode(), "application/json", 4) == Usage(None, None, None)
    assert ResponseUsageReader("application/json", 100).usage() is None
