"""Prompt token ids from a worker's render endpoint, for pools whose tokenizer kvsched cannot load.

vLLM (and the simulated pool) answer ``POST /v1/completions/render`` with a list of
``GenerateRequest`` (one per prompt) and ``POST /v1/chat/completions/render`` with one; their
``token_ids`` are exactly the ids the engine will cache (``vllm/entrypoints/serve/render/``).
Every worker of a pool serves the same model, so any healthy one can answer; requests rotate
over them. Answers are kept in an LRU cache keyed by the prompt (its text, or the
conversation), so a repeated prompt costs nothing.

Cached by prompt prefix, too: a prompt that extends a cached one (the next turn of a
conversation: the same messages and more; a completion prompt that starts with an earlier
prompt's text) is routed at once on the cached prompt's ids less its last
``PREFIX_MARGIN_TOKENS`` (a boundary can tokenise differently once text follows it), and
rendered in the background for the next turn. Routing needs only the prefix: the new tail
is cached nowhere yet. The first background render of such a prompt checks that the
cached ids really are a prefix of the full ones; if not (a chat template that re-renders
earlier turns differently), prefix reuse is switched off and logged once.

What it costs: one HTTP round trip to a worker per new conversation or unrelated prompt on
the routing path (the README gives the figure measured on the simulated pool). When the
render call fails the request is routed without prefix information (by load) and the
failure is counted and logged once; a request is never refused for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from scheduler.codec.openai import InferenceRequestBody

log = logging.getLogger(__name__)

DEFAULT_CACHE_ENTRIES = 4096
DEFAULT_TIMEOUT_S = 2.0
# Ids dropped from the end of a cached prefix: a few tokens cover a boundary merge (a
# trailing "\n\n" that becomes "\n" + "\n..." once text follows, for example).
PREFIX_MARGIN_TOKENS = 4
# Leading characters that index cached completion prompts for the prefix search, and the
# most recent prompts kept per index entry (bounds the search to 64 string compares).
_TEXT_INDEX_CHARS = 64
_TEXT_INDEX_DEPTH = 64


@dataclass(slots=True)
class RenderStats:
    calls: int = 0
    cache_hits: int = 0
    prefix_hits: int = 0  # routed on a cached prefix, rendered in the background
    failures: int = 0
    seconds: float = 0.0  # summed over calls

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "prefix_hits": self.prefix_hits,
            "failures": self.failures,
            "mean_call_ms": round(1000.0 * self.seconds / self.calls, 3) if self.calls else None,
        }


def _cache_key(body: InferenceRequestBody) -> tuple[Any, ...]:
    if body.api == "chat":
        return ("chat", _tools_key(body), tuple((message.role, message.content) for message in body.messages))
    return ("completions", body.prompt_text or "")


def _tools_key(body: InferenceRequestBody) -> str:
    return json.dumps(body.tools, sort_keys=True) if body.tools else ""


def render_request(body: InferenceRequestBody) -> tuple[str, dict[str, Any]]:
    """The render path and JSON body for ``body``'s prompt."""
    payload: dict[str, Any] = {} if body.model is None else {"model": body.model}
    if body.api == "chat":
        payload["messages"] = [{"role": m.role, "content": m.content} for m in body.messages]
        if body.tools:
            payload["tools"] = list(body.tools)
        return "/v1/chat/completions/render", payload
    payload["prompt"] = body.prompt_text or ""
    return "/v1/completions/render", payload


def rendered_ids(document: Any) -> list[int]:
    """``token_ids`` of a render answer (a GenerateRequest, or a list of them: the first)."""
    if isinstance(document, list):
        if not document:
            raise ValueError("the render answer is an empty list")
        document = document[0]
    ids = document.get("token_ids") if isinstance(document, dict) else None
    if not isinstance(ids, list) or not all(type(token) is int for token in ids):
        raise ValueError("the render answer has no token_ids list")
    return ids


class WorkerRenderTokenizer:
    """``render_token_ids`` asks a worker; the synchronous methods know nothing (routing by load)."""

    releases_gil = False

    def __init__(
        self,
        addresses: Callable[[], Sequence[str]],
        *,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._addresses = addresses
        self._cache: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self._cache_entries = cache_entries
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._next = 0
        self._logged_failure = False
        self.stats = RenderStats()
        # Completion prompts by their first characters, for the prefix search.
        self._texts: dict[str, list[str]] = {}
        self.prefix_reuse = True
        self._prefix_checked = False
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def token_ids(self, body: InferenceRequestBody) -> Sequence[int]:
        return self._cache.get(_cache_key(body), [])

    def text_token_ids(self, text: str) -> list[int]:
        return []

    async def render_token_ids(self, body: InferenceRequestBody) -> list[int]:
        key = _cache_key(body)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
            return cached
        if self.prefix_reuse:
            prefix = self._cached_prefix(body)
            if prefix is not None and len(prefix) > PREFIX_MARGIN_TOKENS:
                self.stats.prefix_hits += 1
                routed = prefix[:-PREFIX_MARGIN_TOKENS]
                task = asyncio.create_task(self._render_later(body, key, routed))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                return routed
        return await self._render(body, key) or []

    def _cached_prefix(self, body: InferenceRequestBody) -> list[int] | None:
        """Ids of the longest cached prompt that this one extends."""
        if body.api == "chat":
            for end in range(len(body.messages) - 1, 0, -1):
                messages = tuple((m.role, m.content) for m in body.messages[:end])
                found = self._cache.get(("chat", _tools_key(body), messages))
                if found is not None:
                    return found
            return None
        text = body.prompt_text or ""
        candidates = self._texts.get(text[:_TEXT_INDEX_CHARS], ())
        best = max(
            (c for c in candidates if len(c) < len(text) and text.startswith(c)), key=len, default=None
        )
        return None if best is None else self._cache.get(("completions", best))

    async def _render_later(
        self, body: InferenceRequestBody, key: tuple[Any, ...], routed: list[int]
    ) -> None:
        ids = await self._render(body, key)
        if ids is None or self._prefix_checked:
            return
        self._prefix_checked = True
        if ids[: len(routed)] != routed:
            self.prefix_reuse = False
            log.warning(
                "worker render: a cached prompt's ids are not a prefix of a prompt extending it (the chat "
                "template renders earlier turns differently); every new prompt is rendered before routing"
            )

    async def _render(self, body: InferenceRequestBody, key: tuple[Any, ...]) -> list[int] | None:
        addresses = list(self._addresses())
        if not addresses:
            return None
        address = addresses[self._next % len(addresses)]
        self._next += 1
        path, payload = render_request(body)
        started = self._clock()
        try:
            ids = await self._post(f"http://{address}{path}", payload)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.stats.failures += 1
            if not self._logged_failure:
                self._logged_failure = True
                log.warning(
                    "worker render at %s failed (%s); such requests are routed by load only, "
                    "further failures only counted",
                    address,
                    exc,
                )
            return None
        finally:
            self.stats.calls += 1
            self.stats.seconds += self._clock() - started
        self._remember(key, ids)
        return ids

    def _remember(self, key: tuple[Any, ...], ids: list[int]) -> None:
        self._cache[key] = ids
        if key[0] == "completions":
            bucket = self._texts.setdefault(key[1][:_TEXT_INDEX_CHARS], [])
            bucket.append(key[1])
            if len(bucket) > _TEXT_INDEX_DEPTH:
                del bucket[0]
        if len(self._cache) > self._cache_entries:
            old, _ = self._cache.popitem(last=False)
            if old[0] == "completions":
                stale = self._texts.get(old[1][:_TEXT_INDEX_CHARS])
                if stale is not None and old[1] in stale:
                    stale.remove(old[1])
                    if not stale:
                        del self._texts[old[1][:_TEXT_INDEX_CHARS]]

    async def _post(self, url: str, payload: dict[str, Any]) -> list[int]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.post(url, json=payload) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status} from {url}")
            document = await response.json(content_type=None)
        return rendered_ids(document)


async def close_quietly(tokenizer: object) -> None:
    close = getattr(tokenizer, "close", None)
    if close is not None and asyncio.iscoroutinefunction(close):
        await close()
