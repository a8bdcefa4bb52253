"""OpenAI request bodies: both schemas, every prompt shape, and clear errors for bad bodies."""

from __future__ import annotations

import json

import pytest

from scheduler.codec.openai import BadRequestBody, ChatMessage, api_for_path, parse_request_body


def _body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_path_decides_the_schema() -> None:
    assert api_for_path("/v1/chat/completions") == "chat"
    assert api_for_path("/v1/completions?x=1") == "completions"
    assert api_for_path("/v1/completions/") == "completions"
    assert api_for_path("/v1/embeddings") is None
    assert api_for_path(None) is None


def test_completion_string_prompt() -> None:
    body = parse_request_body(
        _body({"model": "m", "prompt": "hello", "max_tokens": 7, "stream": True}), "/v1/completions"
    )
    assert body.api == "completions"
    assert body.prompt_text == "hello"
    assert body.prompt_token_ids is None
    assert (body.model, body.max_tokens, body.stream) == ("m", 7, True)


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ([1, 2, 3], None, [1, 2, 3]),
        (["first", "second"], "first", None),
        ([[4, 5], [6]], None, [4, 5]),
    ],
)
def test_completion_prompt_shapes_take_the_first_prompt(
    prompt: object, text: str | None, ids: list[int] | None
) -> None:
    body = parse_request_body(_body({"prompt": prompt}), "/v1/completions")
    assert body.prompt_text == text
    assert body.prompt_token_ids == ids


def test_chat_messages_with_string_and_part_contents() -> None:
    document = {
        "model": "m",
        "max_completion_tokens": 5,
        "max_tokens": 99,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "http://x"}},
                    {"type": "text", "text": "this"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
    }
    body = parse_request_body(_body(document), "/v1/chat/completions")
    assert body.api == "chat"
    assert body.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "look at\nthis"),
        ChatMessage("assistant", ""),
    )
    assert body.max_tokens == 5


def test_schema_detected_by_keys_on_other_paths() -> None:
    assert parse_request_body(_body({"messages": [{"role": "user", "content": "x"}]})).api == "chat"
    assert parse_request_body(_body({"prompt": "x"}), "/proxy").api == "completions"
    other = parse_request_body(_body({"model": "e", "input": "x"}), "/v1/embeddings")
    assert other.api == "other"
    assert not other.has_prompt
    assert other.model == "e"


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (b"{not json", "/v1/completions", "not valid JSON"),
        (b"\xff\xfe", "/v1/completions", "not"),
        (b"[1, 2]", "/v1/completions", "must be a JSON object"),
        (_body({"model": "m"}), "/v1/completions", "'prompt' is required"),
        (_body({"prompt": []}), "/v1/completions", "must not be an empty list"),
        (_body({"prompt": [1, -2]}), "/v1/completions", "'prompt[1]'"),
        (_body({"prompt": [1, True]}), "/v1/completions", "'prompt[1]'"),
        (_body({"prompt": [[]]}), "/v1/completions", "'prompt[0]'"),
        (_body({"prompt": 3}), "/v1/completions", "'prompt' must be"),
        (_body({"prompt": "x", "max_tokens": -1}), "/v1/completions", "'max_tokens'"),
        (_body({"prompt": "x", "stream": "yes"}), "/v1/completions", "'stream'"),
        (_body({"prompt": "x", "model": 5}), "/v1/completions", "'model'"),
        (_body({"messages": []}), "/v1/chat/completions", "'messages' must not be empty"),
        (_body({"prompt": "x"}), "/v1/chat/completions", "'messages' is required"),
        (_body({"messages": [{"content": "x"}]}), "/v1/chat/completions", "'messages[0].role'"),
        (_body({"messages": ["x"]}), "/v1/chat/completions", "'messages[0]' must be an object"),
        (_body({"messages": [{"role": "user", "content": 5}]}), "/v1/chat/completions", "content"),
        (
            _body({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
            "/v1/chat/completions",
            "content[0].text",
        ),
    ],
)
def test_malformed_bodies_raise_with_a_clear_message(raw: bytes, path: str, message: str) -> None:
    with pytest.raises(BadRequestBody, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_request_body(raw, path)


def test_large_token_prompt_is_kept_without_copies() -> None:
    ids = list(range(60_000))
    body = parse_request_body(_body({"prompt": ids}), "/v1/completions")
    assert body.prompt_token_ids == ids
