"""Prompt token ids from a worker's render endpoint, for pools whose tokenizer kvsched cannot load.

vLLM (and the simulated pool) answer ``POST /v1/completions/render`` with a list of
``GenerateRequest`` (one per prompt) and ``POST /v1/chat/completions/render`` with one; their
``token_ids`` are exactly the ids the engine will cache (``vllm/entrypoints/serve/render/``).
Every worker of a pool serves the same model, so any healthy one can answer; requests rotate
over them. Answers are kept in an LRU cache keyed by the prompt (its text, or the
conversation), so a repeated prompt costs nothing.

What it costs: one HTTP round trip to a worker per distinct prompt on the routing path (the
README gives the figure measured on the simulated pool). When the render call fails the
request is routed without prefix information (by load) and the failure is counted and
logged once; a request is never refused for it.
"""

from __future__ import annotations

import asyncio
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


@dataclass(slots=True)
class RenderStats:
    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    seconds: float = 0.0  # summed over calls

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
            "mean_call_ms": round(1000.0 * self.seconds / self.calls, 3) if self.calls else None,
        }


def _cache_key(body: InferenceRequestBody) -> tuple[Any, ...]:
    if body.api == "chat":
        return ("chat", tuple((message.role, message.content) for message in body.messages))
    return ("completions", body.prompt_text or "")


def render_request(body: InferenceRequestBody) -> tuple[str, dict[str, Any]]:
    """The render path and JSON body for ``body``'s prompt."""
    payload: dict[str, Any] = {} if body.model is None else {"model": body.model}
    if body.api == "chat":
        payload["messages"] = [{"role": m.role, "content": m.content} for m in body.messages]
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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def token_ids(self, body: InferenceRequestBody) -> list[int]:
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
        addresses = list(self._addresses())
        if not addresses:
            return []
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
            return []
        finally:
            self.stats.calls += 1
            self.stats.seconds += self._clock() - started
        self._cache[key] = ids
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        return ids

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
