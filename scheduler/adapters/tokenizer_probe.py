"""Which tokenizer ``kvsched serve`` uses, and a start-up check that it matches the pool's.

Text and chat prompts match a worker's KV blocks only if kvsched turns them into the ids the
worker caches. Nothing on the wire says when that fails: the events arrive, the index fills,
lookups score zero. So once the pool's first endpoints are known:

* ``tokenizer_mode: auto`` settles on a tokenizer: the configured files if any; else the
  directory a worker names as ``tokenizer_path`` in ``/model_info`` (the simulated pool and
  SGLang do) when it is readable here; else the worker's render endpoint when it answers
  (unless KV events are off: approximate mode matches kvsched's own ids, whatever they are);
  else the byte stand-in, with a warning that text prompts cannot match KV events.
* the probe tokenises a text prompt and a conversation itself and through a worker's
  ``/tokenize`` (vLLM's ``TokenizeCompletionRequest`` / ``TokenizeChatRequest``), and
  compares the ids. A disagreement is logged once, naming the cause and the fix, and shows
  in ``kvsched_tokenization_mismatch{check="probe"}`` and on ``/debug/status``. A worker
  without ``/tokenize`` leaves the probe ``unknown``; the run-time check on served hits
  (``scheduler/core/prefixstats.py``) still applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from scheduler.adapters.render_tokenizer import WorkerRenderTokenizer, close_quietly
from scheduler.adapters.tokenizer import (
    DEFAULT_PIECE_CACHE_BYTES,
    ByteTokenizer,
    HFTokenizer,
    PromptTokenizer,
    SwitchableTokenizer,
    TemplateError,
)
from scheduler.codec.openai import ChatMessage, InferenceRequestBody

log = logging.getLogger(__name__)

TokenizerMode = Literal["auto", "local", "worker_render", "bytes"]
ProbeStatus = Literal["match", "mismatch", "unknown", "skipped", "pending"]

PROBE_TEXT = (
    "Tokenizer probe from kvsched: the quick brown fox jumps over the lazy dog, 1,234 times; "
    "naïve café déjà vu."
)
PROBE_MESSAGES = (
    ChatMessage("system", "You are a terse assistant."),
    ChatMessage("user", PROBE_TEXT),
)
_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


@dataclass(slots=True)
class ProbeResult:
    status: ProbeStatus
    detail: str
    endpoint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, "endpoint": self.endpoint}


def _first_difference(ours: Sequence[int], theirs: Sequence[int]) -> int:
    for position, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return position
    return min(len(ours), len(theirs))


async def _post_json(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Any:
    async with session.post(url, json=payload) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return await response.json(content_type=None)


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return await response.json(content_type=None)


async def probe_endpoint(
    session: aiohttp.ClientSession, address: str, tokenizer: PromptTokenizer, description: str
) -> ProbeResult:
    """Compare ``tokenizer``'s ids with ``address``'s ``/tokenize`` for a text and a chat probe."""
    base = f"http://{address}/tokenize"
    cases = (
        ("text prompt", {"prompt": PROBE_TEXT}, InferenceRequestBody("completions", prompt_text=PROBE_TEXT)),
        (
            "chat prompt",
            {"messages": [{"role": m.role, "content": m.content} for m in PROBE_MESSAGES]},
            InferenceRequestBody("chat", messages=PROBE_MESSAGES),
        ),
    )
    for name, payload, body in cases:
        try:
            answer = await _post_json(session, base, payload)
            theirs = answer["tokens"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            return ProbeResult("unknown", f"{address} did not answer /tokenize ({exc})", address)
        try:
            ours = tokenizer.token_ids(body)
        except TemplateError as exc:
            return ProbeResult("mismatch", f"kvsched's chat template refused the probe: {exc}", address)
        if list(ours) != list(theirs):
            at = _first_difference(ours, theirs)
            return ProbeResult(
                "mismatch",
                f"for a {name} kvsched's tokenizer ({description}) gives {len(ours)} ids and {address}'s "
                f"/tokenize {len(theirs)}, first differing at position {at}: text and chat prompts cannot "
                "match this pool's KV blocks. Set tokenizer_dir to the model's tokenizer files "
                "(kvsched sim prints its own) or tokenizer_mode: worker_render",
                address,
            )
    return ProbeResult("match", f"{address}'s /tokenize agrees on a text and a chat prompt", address)


async def pool_tokenizer_dir(session: aiohttp.ClientSession, address: str) -> Path | None:
    """The local directory a worker names as its tokenizer (``/model_info`` ``tokenizer_path``)."""
    try:
        info = await _get_json(session, f"http://{address}/model_info")
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    path = info.get("tokenizer_path") if isinstance(info, dict) else None
    if not isinstance(path, str) or not path:
        return None
    directory = Path(path)
    return directory if (directory / "tokenizer.json").is_file() else None


async def renders(session: aiohttp.ClientSession, address: str) -> bool:
    try:
        answer = await _post_json(session, f"http://{address}/v1/completions/render", {"prompt": PROBE_TEXT})
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return (
        isinstance(answer, list) and bool(answer) and isinstance(answer[0], dict) and "token_ids" in answer[0]
    )


class TokenizerService:
    """Holds the tokenizer in force (``tokenizer``) and settles it once the pool is known."""

    def __init__(
        self,
        mode: TokenizerMode,
        local: PromptTokenizer | None,
        local_description: str,
        addresses: Callable[[], Sequence[str]],
        *,
        probe: bool = True,
        render_when_auto: bool = True,
        piece_cache_bytes: int = DEFAULT_PIECE_CACHE_BYTES,
    ) -> None:
        self.mode = mode
        self.piece_cache_bytes = piece_cache_bytes
        self.probe_enabled = probe
        # Without KV events (approximate mode) kvsched only matches its own ids: a render
        # round trip per request would buy nothing there.
        self.render_when_auto = render_when_auto
        self._addresses = addresses
        if mode == "worker_render":
            initial: PromptTokenizer = WorkerRenderTokenizer(addresses)
            description = "the workers' render endpoint"
        elif local is not None:
            initial, description = local, local_description
        else:
            initial, description = ByteTokenizer(), "byte stand-in"
        self.tokenizer = SwitchableTokenizer(initial, description)
        # auto without local files: settled from the pool's answers.
        self.settled = mode != "auto" or local is not None
        self.probe = ProbeResult("pending" if probe else "skipped", "not run yet" if probe else "disabled")

    async def on_endpoints(self) -> None:
        """Settle ``auto`` mode and run the probe against the first endpoint that answers."""
        addresses = list(self._addresses())
        if not addresses:
            return
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
            if not self.settled:
                await self._settle(session, addresses)
            if self.probe_enabled and self.probe.status in ("pending", "unknown"):
                await self._probe(session, addresses)

    async def _settle(self, session: aiohttp.ClientSession, addresses: list[str]) -> None:
        for address in addresses[:3]:
            directory = await pool_tokenizer_dir(session, address)
            if directory is not None:
                self.tokenizer.replace(
                    HFTokenizer.from_dir(directory, piece_cache_bytes=self.piece_cache_bytes),
                    f"the pool's tokenizer at {directory}",
                )
                log.info("tokenizer: %s names its tokenizer files %s; using them", address, directory)
                self.settled = True
                return
        for address in addresses[:3] if self.render_when_auto else ():
            if await renders(session, address):
                self.tokenizer.replace(WorkerRenderTokenizer(self._addresses), "the workers' render endpoint")
                log.info(
                    "tokenizer: no tokenizer files configured; %s answers /v1/completions/render, so text "
                    "and chat prompts are tokenised by the workers (one round trip per new prompt)",
                    address,
                )
                self.settled = True
                return
        if self.render_when_auto:
            log.warning(
                "tokenizer: none configured and the pool names none; text and chat prompts use "
                "kvsched's byte stand-in and cannot match KV events (set tokenizer_dir, or "
                "tokenizer_mode: worker_render)"
            )
        else:
            log.info("tokenizer: the byte stand-in (approximate mode matches kvsched's own routing history)")
        self.settled = True

    async def _probe(self, session: aiohttp.ClientSession, addresses: list[str]) -> None:
        if isinstance(self.tokenizer.current, WorkerRenderTokenizer):
            self.probe = ProbeResult("skipped", "the workers tokenise (worker_render): nothing to compare")
            return
        result = ProbeResult("unknown", "no endpoint answered")
        for address in addresses[:3]:
            result = await probe_endpoint(session, address, self.tokenizer, self.tokenizer.description)
            if result.status != "unknown":
                break
        self.probe = result
        if result.status == "mismatch":
            log.warning("tokenizer probe: %s", result.detail)
        else:
            log.info("tokenizer probe: %s", result.detail)

    def status(self) -> dict[str, Any]:
        current = self.tokenizer.current
        status: dict[str, Any] = {
            "mode": self.mode,
            "in_use": self.tokenizer.description,
            "settled": self.settled,
            "probe": self.probe.as_dict(),
        }
        if isinstance(current, WorkerRenderTokenizer):
            status["render"] = current.stats.as_dict()
        if isinstance(current, HFTokenizer):
            status["pieces"] = current.pieces.snapshot()
        return status

    async def close(self) -> None:
        await close_quietly(self.tokenizer.current)
