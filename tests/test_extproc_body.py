"""Body handling invariants of the Endpoint Picker: re-chunking, Content-Length, token ids."""

from __future__ import annotations

import json

import pytest

from scheduler.adapters.extproc import responses
from scheduler.adapters.extproc.config import DESTINATION_HEADER
from scheduler.codec.openai import BadRequestBody, parse_request_body


@pytest.mark.parametrize("size", [0, 1, 61_999, 62_000, 62_001, 220_000, 1_000_003])
def test_rechunked_body_is_intact_bounded_and_ends_once(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunks = list(responses.request_body_responses(body, 62_000, True))
    parts = [c.request_body.response.body_mutation.streamed_response for c in chunks]
    assert b"".join(p.body for p in parts) == body
    assert all(len(p.body) <= 62_000 for p in parts)
    assert [p.end_of_stream for p in parts] == [False] * (len(parts) - 1) + [True]


def test_route_headers_carry_the_body_length() -> None:
    answer = responses.route_headers_response("10.0.0.1:8000", 220_000)
    headers = {
        h.header.key: h.header.raw_value.decode()
        for h in answer.request_headers.response.header_mutation.set_headers
    }
    assert headers == {DESTINATION_HEADER: "10.0.0.1:8000", "content-length": "220000"}


def test_long_token_id_prompt_passes_through_unchanged() -> None:
    ids = list(range(50_000))
    parsed = parse_request_body(json.dumps({"prompt": ids}).encode(), "/v1/completions")
    assert list(parsed.prompt_token_ids or ()) == ids


@pytest.mark.parametrize(
    ("value", "position"), [(True, 3), (-1, 3), (1.5, 3), ("7", 3), (None, 3), (False, 0)]
)
def test_every_bad_token_id_is_refused_with_its_position(value: object, position: int) -> None:
    ids: list[object] = [5, 6, 7, 8, 9]
    ids[position] = value
    with pytest.raises(BadRequestBody, match=rf"'prompt\[{position}\]'"):
        parse_request_body(json.dumps({"prompt": ids}).encode(), "/v1/completions")
