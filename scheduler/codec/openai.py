"""OpenAI-compatible request bodies, reduced to what routing needs.

Schemas (OpenAI API reference, as served by vLLM's OpenAI-compatible server):

* ``POST /v1/completions``: ``prompt`` is a string, a list of token ids, a list of strings or a
  list of token-id lists (a batch). A batch is routed as one request, so the first prompt
  decides the prefix.
* ``POST /v1/chat/completions``: ``messages`` is a list of ``{"role", "content"}`` where
  ``content`` is a string, ``null`` (assistant turns that only call tools) or a list of parts;
  only ``{"type": "text", "text": ...}`` parts carry text.
* Both: ``model``, ``max_tokens`` (``max_completion_tokens`` for chat), ``stream``.
* Chat ``tools`` (``[{"type": "function", "function": {...}}]``) are kept: a chat template
  renders them into the prompt, ahead of the messages in most templates.
* ``POST /v1/messages`` (Anthropic's Messages API, which vLLM serves too): read as the chat
  conversation vLLM turns it into (``vllm/entrypoints/anthropic/serving_messages.py``,
  ``_convert_anthropic_to_openai_request``, vLLM 0.11+): ``system`` (a string, or text blocks
  concatenated) becomes a first system message; each message's text blocks are joined as chat
  parts are; a user turn's ``tool_result`` block becomes a ``tool`` message placed before it;
  ``tools`` (``name``, ``description``, ``input_schema``) become chat function tools whose
  ``parameters`` are the ``input_schema``.
* ``POST /v1/responses`` (OpenAI's Responses API): read as vLLM's ``_construct_input_messages``
  (``vllm/entrypoints/openai/serving_responses.py``) reads it: ``instructions`` becomes a first
  system message, a string ``input`` one user message, a list ``input`` one message per item
  with a role (``input_text``/``output_text`` parts are text) and a ``tool`` message per
  ``function_call_output``; flat function ``tools`` are nested as chat tools
  (``construct_tool_dicts``); ``max_output_tokens`` is the output budget.

Both of those become a ``chat`` body: routing only needs the conversation the worker renders.
The ``:path`` decides the schema; a body sent to another path is classified by its keys, and
one that has neither ``prompt`` nor ``messages`` (embeddings, tokenisation, ...) is still
routed, just without a prompt to match.

Two parsers with one result. The common body (a string or token-id prompt, or string/null
chat contents, with well-typed ``model``/``stream``/``max_tokens``) is decoded by msgspec
straight into typed fields, validated in C and skipping every other key without building it;
anything else it refuses (a batch, content parts, a malformed value, invalid JSON or UTF-8)
goes to the careful parser (``json.loads`` and the rules below), which accepts or refuses it
with its own message. The fast path only answers when it is sure: the two agree on every body
it accepts (``tests/test_openai_body.py`` holds them equal on generated bodies). Measured on a
54 KB body of 8,192 token ids: 1.3 ms (``json.loads`` 0.9 ms, then a per-id type check
0.4 ms) -> 0.34 ms.

Token ids come out as an ``array('Q')`` (uint64) from both parsers, as the native ext_proc
transport's parser hands them too: the prefix index hashes such a buffer in place, where a
list makes it read one int object per token, and the fast path reads a plain id array
straight into it (``kernels/tokenids.pyx``) without building those objects at all. Ids
past 2**64 - 1 (which no vocabulary has) stay a list.
"""

from __future__ import annotations

import importlib
import json
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, cast

import msgspec

from scheduler.codec.plain_ints import plain_ints

ApiKind = Literal["completions", "chat", "other"]
# The path's schema: the two above, and the request shapes read as a chat conversation.
PathKind = Literal["completions", "chat", "anthropic_messages", "responses"]


class BadRequestBody(ValueError):
    """The body cannot be an OpenAI request; the message is safe to show to the client."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class InferenceRequestBody:
    api: ApiKind
    model: str | None = None
    prompt_text: str | None = None
    prompt_token_ids: Sequence[int] | None = None  # array('Q') unless an id passes 2**64 - 1
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int | None = None
    stream: bool = False
    # Chat function tools as the template receives them ({"type": "function", "function": {...}}).
    tools: tuple[dict[str, Any], ...] = ()

    @property
    def has_prompt(self) -> bool:
        return self.prompt_text is not None or self.prompt_token_ids is not None or bool(self.messages)


def leading_prompt(body: InferenceRequestBody, max_chars: int) -> InferenceRequestBody:
    """``body`` with its prompt text cut to the first ``max_chars`` characters: a text prompt's
    head, or the messages in order with the last one kept cut. Token ids and prompts within
    the limit pass through unchanged."""
    if body.prompt_token_ids is not None:
        return body
    if body.prompt_text is not None and len(body.prompt_text) > max_chars:
        return replace(body, prompt_text=body.prompt_text[:max_chars])
    if sum(len(message.content) for message in body.messages) <= max_chars:
        return body
    kept: list[ChatMessage] = []
    left = max_chars
    for message in body.messages:
        if left <= 0:
            break
        kept.append(
            message if len(message.content) <= left else replace(message, content=message.content[:left])
        )
        left -= len(message.content)
    return replace(body, messages=tuple(kept))


def api_for_path(path: str | None) -> PathKind | None:
    """The schema a request path implies, or None when the path does not say."""
    if not path:
        return None
    route = path.split("?", 1)[0].rstrip("/")
    if route.endswith("/chat/completions"):
        return "chat"
    if route.endswith("/completions"):
        return "completions"
    if route.endswith("/v1/messages"):
        return "anthropic_messages"
    if route.endswith("/v1/responses"):
        return "responses"
    return None


_Count = Annotated[int, msgspec.Meta(ge=0)]


class _FastMessage(msgspec.Struct):
    role: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | None = None


class _FastBody(msgspec.Struct):
    """The fields routing reads, in the shapes the fast path accepts (others: careful path)."""

    model: str | None = None
    # Kept as its JSON text: a plain id array is read by the kernel, anything else decoded below.
    prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    messages: list[_FastMessage] | msgspec.UnsetType = msgspec.UNSET
    stream: bool | None = None
    max_tokens: _Count | None = None
    max_completion_tokens: _Count | None = None
    # Only whether it is there: a body with tools goes to the careful parser.
    tools: msgspec.Raw | None = None


_FAST_DECODER = msgspec.json.Decoder(_FastBody)
_PROMPT_DECODER = msgspec.json.Decoder(str | list[_Count])


def _native_uint_array() -> Callable[[Any], array[int] | None] | None:
    try:
        module = importlib.import_module("scheduler._native.tokenids")
    except ImportError:  # not built: msgspec decodes the ids into a list, then the array is filled
        return None
    return cast(Callable[[Any], "array[int] | None"], module.json_uint_array)


_NATIVE_UINT_ARRAY = _native_uint_array()


def token_id_array(ids: list[int]) -> Sequence[int]:
    """``ids`` (non-negative ints) as an ``array('Q')``; the list itself when one passes 64 bits."""
    try:
        return array("Q", ids)
    except OverflowError:
        return ids


def _fast_prompt(raw: msgspec.Raw) -> str | Sequence[int] | None:
    """The prompt's text or ids; None when the fast path cannot be sure (a batch, a bad id)."""
    if _NATIVE_UINT_ARRAY is not None:
        ids = _NATIVE_UINT_ARRAY(raw)
        if ids is not None:
            return ids
    try:
        prompt = _PROMPT_DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(prompt, str):
        return prompt
    return token_id_array(prompt) if prompt else None


def parse_request_body(body: bytes, path: str | None = None) -> InferenceRequestBody:
    """Parse one request body (already complete) once; raise BadRequestBody when malformed."""
    fast = _parse_fast(body, path)
    return fast if fast is not None else parse_request_body_carefully(body, path)


def _parse_fast(body: bytes, path: str | None) -> InferenceRequestBody | None:
    """The common body, decoded and checked in C; None: let the careful parser decide."""
    try:
        document = _FAST_DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    path_api = api_for_path(path)
    if path_api == "anthropic_messages" or path_api == "responses" or document.tools is not None:
        return None
    api: ApiKind | None = path_api
    messages, prompt = document.messages, document.prompt
    if api is None:
        api = (
            "chat"
            if messages is not msgspec.UNSET
            else "completions"
            if prompt is not msgspec.UNSET
            else "other"
        )
    stream = bool(document.stream)
    if api == "chat":
        if messages is msgspec.UNSET or not messages:
            return None
        max_tokens = document.max_completion_tokens
        return InferenceRequestBody(
            "chat",
            model=document.model,
            messages=tuple(ChatMessage(m.role, m.content or "") for m in messages),
            max_tokens=document.max_tokens if max_tokens is None else max_tokens,
            stream=stream,
        )
    if api == "completions":
        if prompt is msgspec.UNSET:
            return None
        read = _fast_prompt(prompt)
        if read is None:
            return None
        text, token_ids = (read, None) if isinstance(read, str) else (None, read)
        return InferenceRequestBody(
            "completions",
            model=document.model,
            prompt_text=text,
            prompt_token_ids=token_ids,
            max_tokens=document.max_tokens,
            stream=stream,
        )
    return InferenceRequestBody("other", model=document.model, max_tokens=document.max_tokens, stream=stream)


def with_model(body: bytes, model: str) -> bytes:
    """``body`` (a JSON object already parsed once) with its ``model`` set to ``model``.

    Re-encoded with msgspec, which keeps the keys' order and every other value as it was; a
    body only ``json`` reads (NaN, a lone surrogate) goes through ``json`` instead."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        document = json.loads(body)
        document["model"] = model
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )
    document["model"] = model
    encoded: bytes = msgspec.json.encode(document)
    return encoded


def parse_request_body_carefully(body: bytes, path: str | None = None) -> InferenceRequestBody:
    """Every body, with a clear message for each way it can be wrong (``json.loads``)."""
    try:
        document = json.loads(body)
    except UnicodeDecodeError as exc:
        raise BadRequestBody(f"request body is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise BadRequestBody(
            f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise BadRequestBody("request body nests JSON too deeply") from exc
    if not isinstance(document, dict):
        raise BadRequestBody(f"request body must be a JSON object, not {_json_type(document)}")
    path_api = api_for_path(path)
    if path_api == "anthropic_messages":
        return _anthropic_messages_body(document)
    if path_api == "responses":
        return _responses_body(document)
    api: ApiKind | None = path_api
    if api is None:
        if "messages" in document:
            api = "chat"
        elif "prompt" in document:
            api = "completions"
        else:
            api = "other"
    model = _optional_str(document, "model")
    stream = document.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestBody(f"'stream' must be a boolean, not {_json_type(stream)}")
    if api == "chat":
        max_tokens = _optional_count(document, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _optional_count(document, "max_tokens")
        return InferenceRequestBody(
            "chat",
            model=model,
            messages=_parse_messages(document.get("messages")),
            max_tokens=max_tokens,
            stream=stream,
            tools=chat_tools(document.get("tools")),
        )
    max_tokens = _optional_count(document, "max_tokens")
    if api == "completions":
        text, token_ids = _parse_prompt(document.get("prompt"))
        return InferenceRequestBody(
            "completions",
            model=model,
            prompt_text=text,
            prompt_token_ids=token_ids,
            max_tokens=max_tokens,
            stream=stream,
        )
    return InferenceRequestBody("other", model=model, max_tokens=max_tokens, stream=stream)


def _parse_prompt(prompt: Any) -> tuple[str | None, Sequence[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if prompt is None:
        raise BadRequestBody("'prompt' is required for /v1/completions")
    if not isinstance(prompt, list):
        raise BadRequestBody(
            f"'prompt' must be a string, a list of token ids or a list of prompts, not {_json_type(prompt)}"
        )
    if not prompt:
        raise BadRequestBody("'prompt' must not be an empty list")
    first = prompt[0]
    if isinstance(first, str):
        return first, None
    if isinstance(first, list):
        if not first:
            raise BadRequestBody("'prompt[0]' must not be an empty list of token ids")
        return None, _token_ids(first, "prompt[0]")
    return None, _token_ids(prompt, "prompt")


def _token_ids(values: list[Any], where: str) -> Sequence[int]:
    # The common case checked in C; the loop below says which id is wrong.
    if plain_ints(values) and min(values) >= 0:
        return token_id_array(values)
    for position, value in enumerate(values):
        if type(value) is not int or value < 0:
            raise BadRequestBody(f"'{where}[{position}]' must be a non-negative integer token id")
    return token_id_array(values)


def _parse_messages(messages: Any) -> tuple[ChatMessage, ...]:
    if messages is None:
        raise BadRequestBody("'messages' is required for /v1/chat/completions")
    if not isinstance(messages, list):
        raise BadRequestBody(f"'messages' must be a list, not {_json_type(messages)}")
    if not messages:
        raise BadRequestBody("'messages' must not be empty")
    parsed: list[ChatMessage] = []
    for position, message in enumerate(messages):
        role = _message_role(message, position)
        parsed.append(ChatMessage(role, _content_text(message.get("content"), position)))
    return tuple(parsed)


def _message_role(message: Any, position: int) -> str:
    """The role of ``messages[position]``, an object (OpenAI's and Anthropic's bodies alike)."""
    if not isinstance(message, dict):
        raise BadRequestBody(f"'messages[{position}]' must be an object, not {_json_type(message)}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequestBody(f"'messages[{position}].role' must be a non-empty string")
    return role


def _content_text(content: Any, position: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequestBody(
            f"'messages[{position}].content' must be a string or a list of parts, not {_json_type(content)}"
        )
    texts: list[str] = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequestBody(f"'messages[{position}].content[{index}]' must be an object")
        if part.get("type") != "text":
            # Images, audio and files cannot be tokenised here; the text parts still share a prefix.
            continue
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequestBody(f"'messages[{position}].content[{index}].text' must be a string")
        texts.append(text)
    # vLLM joins text parts with newlines when it flattens content for a string-only template.
    return "\n".join(texts)


def _stream_flag(document: dict[str, Any]) -> bool:
    stream = document.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequestBody(f"'stream' must be a boolean, not {_json_type(stream)}")
    return stream


def chat_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI chat ``tools``, as given: each an object whose ``function`` is an object."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise BadRequestBody(f"'tools' must be a list, not {_json_type(tools)}")
    for position, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise BadRequestBody(f"'tools[{position}]' must be an object with a 'function' object")
    return tuple(tools)


def _anthropic_messages_body(document: dict[str, Any]) -> InferenceRequestBody:
    """Anthropic's Messages API body as the chat conversation vLLM renders for it."""
    messages: list[ChatMessage] = []
    system = document.get("system")
    if isinstance(system, str):
        if system:
            messages.append(ChatMessage("system", system))
    elif isinstance(system, list):
        # vLLM concatenates the system text blocks with nothing between them.
        blocks = [_block_text(block, f"system[{i}]") for i, block in enumerate(system)]
        messages.append(ChatMessage("system", "".join(blocks)))
    elif system is not None:
        raise BadRequestBody(f"'system' must be a string or a list of blocks, not {_json_type(system)}")
    turns = document.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRequestBody("'messages' must be a non-empty list for /v1/messages")
    for position, turn in enumerate(turns):
        role = _message_role(turn, position)
        content = turn.get("content")
        if isinstance(content, str):
            messages.append(ChatMessage(role, content))
            continue
        if not isinstance(content, list) or not content:
            raise BadRequestBody(
                f"'messages[{position}].content' must be a string or a non-empty list of blocks"
            )
        texts: list[str] = []
        for index, block in enumerate(content):
            where = f"messages[{position}].content[{index}]"
            if not isinstance(block, dict):
                raise BadRequestBody(f"'{where}' must be an object")
            kind = block.get("type")
            if kind == "text":
                if text := _block_text(block, where):
                    texts.append(text)
            elif kind == "tool_result":
                result = block.get("content")
                # vLLM: a user's tool result is a tool message of str(content), ahead of the turn.
                text = "" if not result else result if isinstance(result, str) else str(result)
                if role == "user":
                    messages.append(ChatMessage("tool", text))
                else:
                    texts.append(f"Tool result: {text}")
        messages.append(ChatMessage(role, "\n".join(texts)))
    max_tokens = _optional_count(document, "max_tokens")
    tools = document.get("tools")
    chat_tools: list[dict[str, Any]] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequestBody(f"'tools' must be a list, not {_json_type(tools)}")
        for position, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise BadRequestBody(f"'tools[{position}]' must be an object with a string 'name'")
            function = {
                "name": tool["name"],
                "description": tool.get("description"),
                "parameters": tool.get("input_schema"),
            }
            chat_tools.append({"type": "function", "function": function})
    return InferenceRequestBody(
        "chat",
        model=_optional_str(document, "model"),
        messages=tuple(messages),
        max_tokens=max_tokens,
        stream=_stream_flag(document),
        tools=tuple(chat_tools),
    )


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict):
        raise BadRequestBody(f"'{where}' must be an object")
    if block.get("type") != "text":
        return ""
    text = block.get("text")
    if not isinstance(text, str):
        raise BadRequestBody(f"'{where}.text' must be a string")
    return text


_RESPONSES_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _responses_body(document: dict[str, Any]) -> InferenceRequestBody:
    """OpenAI's Responses API body as the chat conversation vLLM renders for it."""
    messages: list[ChatMessage] = []
    instructions = document.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequestBody(f"'instructions' must be a string, not {_json_type(instructions)}")
    if instructions:
        messages.append(ChatMessage("system", instructions))
    given = document.get("input")
    if isinstance(given, str):
        messages.append(ChatMessage("user", given))
    elif isinstance(given, list) and given:
        for position, item in enumerate(given):
            if not isinstance(item, dict):
                raise BadRequestBody(f"'input[{position}]' must be an object, not {_json_type(item)}")
            if item.get("type") == "function_call_output":
                output = item.get("output")
                messages.append(ChatMessage("tool", output if isinstance(output, str) else ""))
                continue
            role = item.get("role")
            if role is None:
                continue  # reasoning, function calls: no text of a turn of their own
            if not isinstance(role, str) or not role:
                raise BadRequestBody(f"'input[{position}].role' must be a non-empty string")
            messages.append(ChatMessage(role, _responses_content(item.get("content"), position)))
    else:
        raise BadRequestBody("'input' must be a string or a non-empty list for /v1/responses")
    tools = document.get("tools")
    chat_tools: list[dict[str, Any]] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequestBody(f"'tools' must be a list, not {_json_type(tools)}")
        for position, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise BadRequestBody(f"'tools[{position}]' must be an object")
            if tool.get("type") == "function":
                function = {key: value for key, value in tool.items() if key != "type"}
                chat_tools.append({"type": "function", "function": function})
    return InferenceRequestBody(
        "chat",
        model=_optional_str(document, "model"),
        messages=tuple(messages),
        max_tokens=_optional_count(document, "max_output_tokens"),
        stream=_stream_flag(document),
        tools=tuple(chat_tools),
    )


def _responses_content(content: Any, position: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequestBody(f"'input[{position}].content' must be a string or a list of parts")
    texts: list[str] = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequestBody(f"'input[{position}].content[{index}]' must be an object")
        if part.get("type") in _RESPONSES_TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequestBody(f"'input[{position}].content[{index}].text' must be a string")
            texts.append(text)
    return "\n".join(texts)


def _optional_str(document: dict[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequestBody(f"'{key}' must be a string, not {_json_type(value)}")


def _optional_count(document: dict[str, Any], key: str) -> int | None:
    value = document.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise BadRequestBody(f"'{key}' must be a non-negative integer")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
