"""A read-only prefix lookup from outside: a prompt in, ``Scheduler.lookup``'s answer out.

Served as ``POST /debug/lookup`` on the metrics port (``server/debug_http.py``) and as
``kvsched.v1.EndpointPicker/Lookup`` (``picker_api.py``). The prompt is turned into token ids
by the same ``PickRunner.token_ids`` a pick uses (ids as given, the configured tokenizer or a
worker's render endpoint, the chat template for messages), so a lookup sees the keys the
next pick of that prompt would see; everything after the ids is the Scheduler's and reads
only (see ``Scheduler.lookup``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from scheduler.adapters.extproc.decide import PickRunner
from scheduler.adapters.tokenizer import TemplateError
from scheduler.codec.openai import BadRequestBody, InferenceRequestBody, parse_request_body
from scheduler.core.lookup import PrefixLookup

PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")


class BadLookup(ValueError):
    """The lookup names no usable prompt; the message is safe to show to the client."""


class LookupPort(Protocol):
    def lookup(self, token_ids: Sequence[int], now: float, *, model: str | None = None) -> PrefixLookup: ...


def parse_lookup_body(raw: bytes) -> InferenceRequestBody:
    """``{"model": ..., "prompt": text | [ids]}``, ``{"model": ..., "messages": [...]}`` or
    ``{"model": ..., "prompt_token_ids": [ids]}``: read by the OpenAI body parser a pick uses,
    with exactly one of the three prompt keys."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadLookup(f"the body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadLookup("the body must be a JSON object")
    given = [key for key in PROMPT_KEYS if key in document]
    if len(given) != 1:
        raise BadLookup(f"give exactly one of {', '.join(PROMPT_KEYS)}; got {len(given)}")
    path = "/v1/chat/completions" if given[0] == "messages" else "/v1/completions"
    if given[0] == "prompt_token_ids":
        document["prompt"] = document.pop("prompt_token_ids")
        if not isinstance(document["prompt"], list):
            raise BadLookup("prompt_token_ids must be a list of token ids")
        raw = json.dumps(document).encode()
    try:
        return parse_request_body(raw, path)
    except BadRequestBody as exc:
        raise BadLookup(str(exc)) from exc


class PromptLookup:
    def __init__(self, scheduler: LookupPort, runner: PickRunner) -> None:
        self._scheduler = scheduler
        self._runner = runner

    async def lookup(self, body: InferenceRequestBody) -> PrefixLookup:
        """Raises BadLookup for a body without a prompt or messages the chat template refuses;
        a tokenizer failure propagates (the caller answers it as an internal error)."""
        if not body.has_prompt:
            raise BadLookup("the request has no prompt, messages or token ids")
        try:
            token_ids = await self._runner.token_ids(body)
        except TemplateError as exc:
            raise BadLookup(f"chat template rejected the messages: {exc}") from exc
        return self._scheduler.lookup(token_ids, self._runner.clock(), model=body.model)

    async def lookup_json(self, raw: bytes) -> dict[str, Any]:
        return (await self.lookup(parse_lookup_body(raw))).as_dict()
