"""OpenAI ``usage`` read from a response as it streams past, in linear time.

vLLM reports ``usage.prompt_tokens_details.cached_tokens`` (the prefix it found cached) and
``usage.completion_tokens`` in the JSON body of a non-streamed response, and in the last SSE
``data:`` event of a streamed one when the client asked for ``stream_options.include_usage``
(with ``continuous_usage_stats`` every event carries it; the last still wins).

Reading and interpreting are separate: ``ResponseUsageReader`` keeps, chunk by chunk, the one
thing worth parsing (a capture: the last SSE line holding a usage object, the JSON body, or its
tail), and ``usage_from_capture`` parses it once at the end. The native transport does the
reading half in C++ (kernels/extproc/usage_capture.cc) and hands its capture to the same function.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

# A usage object, not "usage": null. Inside a JSON string the quotes would be escaped (\"usage\"),
# so model output that mentions usage does not match.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_TAIL_BYTES = 64 * 1024
_MAX_SSE_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None


class CaptureKind(IntEnum):
    """What a capture holds (numbered as kernels/extproc/transport.h's UsageCapture::Kind)."""

    NONE = 0
    SSE_LINE = 1  # the last ``data:`` line holding a usage object
    JSON = 2  # the whole JSON body, up to max_json_bytes
    TAIL = 3  # the last 64 KiB of a longer JSON body


def usage_from_capture(kind: CaptureKind, data: bytes) -> Usage | None:
    if kind is CaptureKind.SSE_LINE:
        return _usage_from_document(_loads(data[5:]))
    if kind is CaptureKind.JSON:
        document = _loads(data)
        if document is not None:
            return _usage_from_document(document)
        return _usage_from_tail(data[-_TAIL_BYTES:])
    if kind is CaptureKind.TAIL:
        return _usage_from_tail(data)
    return None


class ResponseUsageReader:
    """Feed response body chunks in order; ``usage()`` at the end of the body."""

    def __init__(self, content_type: str | None, max_json_bytes: int) -> None:
        self._sse: bool | None = None
        if content_type:
            self._sse = "text/event-stream" in content_type.lower()
        self._max_json_bytes = max_json_bytes
        # JSON: every chunk until the cap, joined once at the end; past the cap only a tail.
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""
        # SSE: the unfinished last line, as pieces (joined once the newline arrives).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._usage_line: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._sse is None:
            # No content-type: an SSE stream starts with a field name, JSON with a brace.
            self._sse = chunk.lstrip().startswith((b"data:", b"event:", b"id:", b":"))
        if self._sse:
            self._feed_sse(chunk)
        else:
            self._feed_json(chunk)

    def _feed_json(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._max_json_bytes:
            self._chunks.append(chunk)
            return
        if self._chunks:
            self._chunks.append(chunk)
            self._tail = b"".join(self._chunks)[-_TAIL_BYTES:]
            self._chunks = []
        else:
            self._tail = (self._tail + chunk)[-_TAIL_BYTES:]

    def _feed_sse(self, chunk: bytes) -> None:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if start < len(chunk):
                    self._pending_size += len(chunk) - start
                    if self._pending_size > _MAX_SSE_LINE_BYTES:
                        # Not a plausible event line; drop it rather than hold it all.
                        self._pending.clear()
                        self._pending_size = 0
                    else:
                        self._pending.append(chunk[start:])
                return
            line = chunk[start:newline]
            if self._pending:
                self._pending.append(line)
                line = b"".join(self._pending)
                self._pending.clear()
                self._pending_size = 0
            self._line(line)
            start = newline + 1

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:") and _USAGE_OBJECT.search(line):
            self._usage_line = line

    def capture(self) -> tuple[CaptureKind, bytes]:
        """What is left to parse, at the end of the body."""
        if self._sse:
            if self._pending:
                self._line(b"".join(self._pending))
                self._pending.clear()
            if self._usage_line is None:
                return CaptureKind.NONE, b""
            return CaptureKind.SSE_LINE, self._usage_line
        if self._chunks:
            return CaptureKind.JSON, b"".join(self._chunks)
        if self._tail:
            return CaptureKind.TAIL, self._tail
        return CaptureKind.NONE, b""

    def usage(self) -> Usage | None:
        return usage_from_capture(*self.capture())


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _usage_from_tail(tail: bytes) -> Usage | None:
    last = None
    for found in _USAGE_OBJECT.finditer(tail):
        last = found
    if last is None:
        return None
    text = tail[last.end() - 1 :].decode("utf-8", "replace")
    try:
        usage, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return _usage_from_document({"usage": usage})


def _usage_from_document(document: Any) -> Usage | None:
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        cached_tokens=_count(cached),
    )


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None
