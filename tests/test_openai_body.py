"""OpenAI request bodies: both schemas, every prompt shape, and clear errors for bad bodies."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from scheduler.codec.openai import (
    BadRequestBody,
    ChatMessage,
    InferenceRequestBody,
    _parse_fast,
    api_for_path,
    parse_request_body,
    parse_request_body_carefully,
)


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
    assert body.prompt_token_ids == (None if ids is None else array("Q", ids))


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


def test_large_token_prompt_is_read_into_one_uint64_buffer() -> None:
    ids = list(range(60_000))
    for parse in (parse_request_body, parse_request_body_carefully):
        body = parse(_body({"prompt": ids}), "/v1/completions")
        # The index hashes a uint64 buffer in place (the native transport hands one too).
        assert isinstance(body.prompt_token_ids, array) and body.prompt_token_ids.typecode == "Q"
        assert body.prompt_token_ids.tolist() == ids


@pytest.mark.parametrize(
    "ids", [[2**64 - 1, 0], [2**64, 1], [2**70]], ids=["largest-uint64", "past-uint64", "huge"]
)
def test_token_ids_past_64_bits_stay_a_list(ids: list[int]) -> None:
    for parse in (parse_request_body, parse_request_body_carefully):
        body = parse(_body({"prompt": ids}), "/v1/completions")
        assert list(body.prompt_token_ids or ()) == ids
        assert isinstance(body.prompt_token_ids, array) == (max(ids) < 2**64)


@given(
    st.lists(st.integers(min_value=0, max_value=2**64 + 5), max_size=40),
    st.sampled_from(["", " ", "\n", "\t ", "\r\n"]),
)
@settings(max_examples=300, deadline=None)
def test_the_id_array_kernel_reads_what_json_reads(ids: list[int], space: str) -> None:
    tokenids = pytest.importorskip("scheduler._native.tokenids")
    raw = ("[" + space + ("," + space).join(map(str, ids)) + space + "]").encode()
    read = tokenids.json_uint_array(raw)
    if ids and max(ids) < 2**64:
        assert read is not None and read.tolist() == json.loads(raw)
    else:
        assert read is None  # empty, or past 64 bits: the general decoder decides


@pytest.mark.parametrize(
    "raw",
    [
        b"[01]",
        b"[1.0]",
        b"[1e3]",
        b"[-1]",
        b"[-0]",
        b"[1,]",
        b"[1 2]",
        b'["1"]',
        b"[[1]]",
        b"[1]x",
        b"[1,2",
        b"",
        b"[",
        b"[true]",
    ],
)
def test_the_id_array_kernel_leaves_everything_else_to_the_decoder(raw: bytes) -> None:
    tokenids = pytest.importorskip("scheduler._native.tokenids")
    assert tokenids.json_uint_array(raw) is None


# --- the fast parser against the careful one ---------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values most of the time, so that accepted bodies are common; any scalar otherwise."""
    return st.integers(min_value=0, max_value=9).flatmap(lambda roll: valid if roll else _scalars)


_counts = _mostly(st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)))
_token_lists = st.lists(
    _mostly(st.integers(min_value=0, max_value=2**64 - 1)).filter(lambda v: v is not None), max_size=5
)
_prompts = _mostly(
    st.one_of(st.text(max_size=6), _token_lists, st.lists(st.text(max_size=3), max_size=2), st.just([[1, 2]]))
)
_parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": _mostly(st.text(max_size=3))}
    ),
    max_size=2,
)
_contents = _mostly(st.one_of(st.none(), st.text(max_size=5), _parts))
_message = _mostly(
    st.fixed_dictionaries(
        {"role": _mostly(st.sampled_from(["user", "assistant", ""]))},
        optional={"content": _contents, "name": st.text(max_size=3)},
    )
)
_optional_fields = {
    "model": _mostly(st.one_of(st.none(), st.text(max_size=4))),
    "stream": _mostly(st.one_of(st.none(), st.booleans())),
    "max_tokens": _counts,
    "max_completion_tokens": _counts,
    "tools": st.lists(st.dictionaries(st.text(max_size=3), _scalars, max_size=2), max_size=2),
}
_documents = st.one_of(
    st.fixed_dictionaries({"prompt": _prompts}, optional=_optional_fields),
    st.fixed_dictionaries({"messages": _mostly(st.lists(_message, max_size=3))}, optional=_optional_fields),
    st.fixed_dictionaries({}, optional={"prompt": _prompts, "messages": _scalars, **_optional_fields}),
)


@settings(max_examples=1000, deadline=None)
@example(document={"messages": [{"role": "user"}], "max_tokens": 9, "max_completion_tokens": 5}, path=None)
@example(document={"prompt": [1, 2], "max_tokens": 3, "stream": None}, path="/v1/completions")
@given(document=_documents, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/x", None]))
def test_fast_parser_answers_only_where_the_careful_one_agrees(
    document: dict[str, Any], path: str | None
) -> None:
    raw = json.dumps(document).encode()
    fast = _parse_fast(raw, path)
    try:
        careful = parse_request_body_carefully(raw, path)
    except BadRequestBody:
        assert fast is None, "the fast path accepted a body the careful one refuses"
        return
    if fast is not None:
        assert fast == careful
    assert parse_request_body(raw, path) == careful
    event("fast path answered" if fast is not None else "careful path answered")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": [1, 2], "prompt": "last wins"}',
        b'\xef\xbb\xbf{"prompt": "bom"}',
        b'{"prompt": "\\ud800"}',
        b'{"prompt": [1, 2], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": [1, NaN]}',
        b'{"prompt": "x", "max_tokens": 1e3}',
    ],
)
def test_fast_parser_edge_cases_match_the_careful_parser(raw: bytes) -> None:
    try:
        careful: InferenceRequestBody | str = parse_request_body_carefully(raw, "/v1/completions")
    except BadRequestBody as exc:
        careful = str(exc)
    try:
        either: InferenceRequestBody | str = parse_request_body(raw, "/v1/completions")
    except BadRequestBody as exc:
        either = str(exc)
    assert either == careful


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def test_chat_tools_are_kept_for_the_template_and_leave_the_fast_path() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    raw = _body({"messages": [{"role": "user", "content": "rain?"}], "tools": [tool]})
    assert _parse_fast(raw, "/v1/chat/completions") is None
    body = parse_request_body(raw, "/v1/chat/completions")
    assert body.tools == (tool,)
    assert (
        parse_request_body(_body({"messages": [{"role": "user", "content": "x"}], "tools": None})).tools == ()
    )
    with pytest.raises(BadRequestBody, match=r"'tools\[0\]'"):
        parse_request_body(_body({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "x"}]}))


def test_anthropic_messages_read_as_the_chat_vllm_renders() -> None:
    document = {
        "model": "m",
        "max_tokens": 9,
        "stream": True,
        "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "rain"},
                    {"type": "text", "text": "and"},
                    {"type": "image", "source": {"data": "..."}},
                    {"type": "text", "text": "tomorrow?"},
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER_SCHEMA}],
    }
    body = parse_request_body(_body(document), "/v1/messages")
    assert body.api == "chat"
    assert body.messages == (
        ChatMessage("system", "Be brief."),  # vLLM concatenates system blocks as they are
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "Checking."),
        ChatMessage("tool", "rain"),  # a user's tool result precedes the rest of its turn
        ChatMessage("user", "and\ntomorrow?"),
    )
    function = {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA}
    assert body.tools == ({"type": "function", "function": function},)
    assert (body.model, body.max_tokens, body.stream) == ("m", 9, True)


def test_responses_bodies_read_as_the_chat_vllm_renders() -> None:
    document = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather"}, {"type": "input_image"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Rain."}]},
            {"role": "user", "content": "tomorrow?"},
        ],
        "max_output_tokens": 12,
        "tools": [
            {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA},
            {"type": "web_search"},
        ],
    }
    body = parse_request_body(_body(document), "/v1/responses")
    assert body.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "weather"),
        ChatMessage("tool", "rain"),
        ChatMessage("assistant", "Rain."),
        ChatMessage("user", "tomorrow?"),
    )
    function = {"name": "get_weather", "parameters": WEATHER_SCHEMA}
    assert body.tools == ({"type": "function", "function": function},)
    assert body.max_tokens == 12
    plain = parse_request_body(_body({"input": "hello"}), "/v1/responses?stream=1")
    assert plain.messages == (ChatMessage("user", "hello"),)


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [
        ({"messages": []}, "/v1/messages", "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": []}]}, "/v1/messages", "content"),
        ({"messages": [{"role": "user", "content": "x"}], "system": 3}, "/v1/messages", "'system'"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "/v1/messages", r"'tools\[0\]'"),
        ({"input": 3}, "/v1/responses", "'input'"),
        ({"input": "x", "instructions": 1}, "/v1/responses", "'instructions'"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "/v1/responses", "text"),
    ],
)
def test_malformed_messages_and_responses_bodies_say_why(document: object, path: str, message: str) -> None:
    with pytest.raises(BadRequestBody, match=message):
        parse_request_body(_body(document), path)


def test_tools_are_rendered_by_the_chat_template_as_the_worker_renders_them() -> None:
    from scheduler.sim.tokenizer import load

    tokenizer = load()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    body = parse_request_body(_body({"messages": [{"role": "user", "content": "x"}], "tools": [tool]}))
    with_tools = tokenizer.hf.token_ids(body)
    # The simulated worker's own path: its chat handler passes the request's tools to the template.
    assert list(with_tools) == tokenizer.chat_ids([{"role": "user", "content": "x"}], True, [tool])
    without = tokenizer.hf.token_ids(
        parse_request_body(_body({"messages": [{"role": "user", "content": "x"}]}))
    )
    assert len(with_tools) > len(without)
    assert "get_weather" in tokenizer.decode(with_tools)


@pytest.mark.parametrize(
    "raw",
    [
        _body({"model": "a", "prompt": [1, 2], "stream": True}),
        _body({"prompt": "no model yet", "max_tokens": 3}),
        b'{"model": "a", "prompt": "x", "temperature": NaN}',  # json reads it, msgspec does not
    ],
)
def test_with_model_changes_the_model_and_nothing_else(raw: bytes) -> None:
    from scheduler.codec.openai import with_model

    rewritten = with_model(raw, "b-v2")
    before, after = json.loads(raw), json.loads(rewritten)
    assert after.pop("model") == "b-v2"
    before.pop("model", None)
    assert list(after) == list(before)
    assert json.dumps(after) == json.dumps(before)  # NaN compares unequal to itself; its text does not
    assert parse_request_body(rewritten, "/v1/completions").model == "b-v2"
