"""Live replay: send a workload to an OpenAI-compatible endpoint at its arrival times.

* ``api="completions"``: ``POST /v1/completions`` with the prompt as a list of token ids
  (OpenAI's API and vLLM accept one), so the server caches exactly the workload's prefixes;
  a text workload (``prompt_text``) sends its text.
* ``api="chat"``: ``POST /v1/chat/completions`` with the prompt as one user message whose
  words name the token ids (``t123 t456 ...``): equal token prefixes give equal text
  prefixes, whatever the server's tokenizer.

Requests stream with ``stream_options.include_usage`` so that the last chunk reports
``usage.prompt_tokens_details.cached_tokens`` (vLLM fills it when prefix caching is on).
TTFT is the time to the first chunk carrying content, TPOT the mean gap after it, e2e the
time to the end of the response. A server that answers with one JSON body instead of a
stream is measured too (TTFT = e2e). A server that reports no usage leaves the cached
tokens unknown (the report's hit ratio is then null) and completion tokens are counted as
content chunks. HTTP errors, stream errors and timeouts count as failed, with the reason.
A concurrency cap makes requests wait for a free slot, never dropped.

A worker that reports its own TTFT for the request (the simulated workers do, beside the
usage: ``scheduler.sim.worker.TIMING_KEY``) has it recorded too (``worker_ttft_s``,
``engine_ttft_s``): the client's TTFT minus the worker's is what the path between them took.

Given ``count_tokens`` (the client's own tokenizer, as benchmark clients such as inference-perf
count), every streamed chunk's text is counted and a request whose count differs from the
server's ``usage.completion_tokens``, or whose prompt ids differ in number from
``usage.prompt_tokens``, is marked as a token-count mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from scheduler.sim.worker import TIMING_KEY
from scheduler.workloads.model import RequestOutcome, SLOTargets, Workload, WorkloadRequest

log = logging.getLogger(__name__)

Api = Literal["completions", "chat"]
API_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# The simulated workers name themselves in the first; a gateway running the Inference
# Extension's conformance echo names the picked endpoint in the second.
SERVED_BY_HEADERS = ("x-kvsched-sim-worker", "x-gateway-destination-endpoint-served")
_ERROR_BODY_CHARS = 200


def base_url(url: str) -> str:
    """``http://host:port`` from a URL that may end in ``/`` or ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def prompt_text(token_ids: list[int]) -> str:
    return " ".join(f"t{t}" for t in token_ids)


def request_body(
    request: WorkloadRequest, model: str | None, api: Api, *, stream: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": request.max_tokens, "stream": stream}
    if model:
        body["model"] = model
    if api == "chat":
        text = (
            request.prompt_text if request.prompt_text is not None else prompt_text(request.prompt_token_ids)
        )
        body["messages"] = [{"role": "user", "content": text}]
    elif request.prompt_text is not None:
        body["prompt"] = request.prompt_text
    else:
        body["prompt"] = list(request.prompt_token_ids)
    if stream:
        body["stream_options"] = {"include_usage": True}
    # vLLM's extension: generate exactly max_tokens, as the workload says; others ignore it.
    body["ignore_eos"] = True
    return body


@dataclass(slots=True)
class StreamDiagnostics:
    """Malformed stream lines across one replay: counted, the first one logged."""

    malformed_lines: int = 0

    def malformed(self, request_id: str, line: bytes, error: Exception) -> None:
        if not self.malformed_lines:
            log.warning("%s: skipping a stream line that is not JSON (%s): %r", request_id, error, line[:120])
        self.malformed_lines += 1


def _content(choice: Mapping[str, Any]) -> str | None:
    """The text a completion or chat choice carries (None for a role-only or empty delta)."""
    if "text" in choice:
        text = choice["text"]
        return text if isinstance(text, str) else None
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, Mapping):
            content = part.get("content")
            return content if isinstance(content, str) and content else None
    return None


def _apply_worker_timing(body: Mapping[str, Any], outcome: RequestOutcome) -> None:
    """The serving worker's own TTFT for this request, where it reports one (``TIMING_KEY``)."""
    timing = body.get(TIMING_KEY)
    if not isinstance(timing, Mapping):
        return
    for key, field in (("ttft_ms", "worker_ttft_s"), ("engine_ttft_ms", "engine_ttft_s")):
        value = timing.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            setattr(outcome, field, value / 1000.0)


def _apply_usage(body: Mapping[str, Any], outcome: RequestOutcome) -> bool:
    _apply_worker_timing(body, outcome)
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return False
    if isinstance(usage.get("prompt_tokens"), int):
        outcome.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        outcome.completion_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, Mapping) and isinstance(details.get("cached_tokens"), int):
        outcome.cached_tokens = details["cached_tokens"]
    return True


def _error_text(body: Mapping[str, Any]) -> str | None:
    error = body.get("error")
    if error is None:
        return None
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error)


async def _read_stream(
    resp: aiohttp.ClientResponse,
    outcome: RequestOutcome,
    clock: Callable[[], float],
    diagnostics: StreamDiagnostics,
    count_tokens: Callable[[str], int] | None = None,
) -> None:
    chunks = 0
    counted = 0
    usage = False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            diagnostics.malformed(outcome.request_id, data, exc)
            continue
        if not isinstance(chunk, dict):
            diagnostics.malformed(outcome.request_id, data, TypeError("not an object"))
            continue
        if (error := _error_text(chunk)) is not None:
            outcome.error = f"stream error: {error[:_ERROR_BODY_CHARS]}"
            return
        for choice in chunk.get("choices") or ():
            if isinstance(choice, Mapping) and (text := _content(choice)) is not None:
                chunks += 1
                if count_tokens is not None:
                    counted += count_tokens(text)
                if outcome.first_token_s is None:
                    outcome.first_token_s = clock()
        usage = _apply_usage(chunk, outcome) or usage
    if not usage:
        outcome.completion_tokens = chunks
    elif count_tokens is not None:
        outcome.client_completion_tokens = counted


async def _read_body(
    resp: aiohttp.ClientResponse, outcome: RequestOutcome, clock: Callable[[], float]
) -> None:
    body = json.loads(await resp.read())
    if not isinstance(body, dict):
        raise ValueError("response body is not a JSON object")
    if (error := _error_text(body)) is not None:
        outcome.error = f"error: {error[:_ERROR_BODY_CHARS]}"
        return
    texts = [
        c for choice in body.get("choices") or () if isinstance(choice, Mapping) and (c := _content(choice))
    ]
    # The whole answer arrives at once: its first token and its end are the same moment.
    outcome.end_s = clock()
    if texts:
        outcome.first_token_s = outcome.end_s
    if not _apply_usage(body, outcome):
        outcome.completion_tokens = len(texts)


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    request: WorkloadRequest,
    model: str | None,
    clock: Callable[[], float],
    *,
    api: Api = "completions",
    diagnostics: StreamDiagnostics | None = None,
    slo: SLOTargets | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> RequestOutcome:
    """Send one request and measure it; never raises for what the server or network does."""
    diagnostics = diagnostics or StreamDiagnostics()
    slo = slo or SLOTargets()
    outcome = RequestOutcome(
        request.request_id,
        ok=False,
        start_s=clock(),
        prompt_tokens=len(request.prompt_token_ids),
        slo_ttft_ms=slo.ttft_ms,
        slo_tpot_ms=slo.tpot_ms,
    )
    try:
        async with session.post(
            base_url(url) + API_PATHS[api],
            json=request_body(request, model, api),
            headers={"x-request-id": request.request_id, **slo.headers()},
        ) as resp:
            outcome.endpoint = next((resp.headers[h] for h in SERVED_BY_HEADERS if h in resp.headers), None)
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:_ERROR_BODY_CHARS]
                outcome.error = f"http {resp.status}: {text}"
            elif resp.content_type == "text/event-stream":
                await _read_stream(resp, outcome, clock, diagnostics, count_tokens)
            else:
                await _read_body(resp, outcome, clock)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    if outcome.end_s is None:
        outcome.end_s = clock()
    if not outcome.error and outcome.first_token_s is None:
        outcome.error = "no tokens: the response carried no content"
    outcome.ok = not outcome.error
    if outcome.ok and count_tokens is not None and outcome.client_completion_tokens is not None:
        outcome.token_count_mismatch = outcome.client_completion_tokens != outcome.completion_tokens or (
            outcome.prompt_tokens != len(request.prompt_token_ids)
        )
    return outcome


async def discover_model(session: aiohttp.ClientSession, url: str) -> str | None:
    """The first model ``GET /v1/models`` lists, or None (requests then name no model)."""
    try:
        async with session.get(base_url(url) + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 200:
                models = (await resp.json(content_type=None)).get("data") or []
                if models and isinstance(models[0], Mapping) and isinstance(models[0].get("id"), str):
                    model: str = models[0]["id"]
                    return model
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
        log.info("%s/v1/models unavailable (%s): requests will name no model", base_url(url), exc)
    return None


async def replay_live(
    workload: Workload,
    url: str,
    *,
    model: str | None = None,
    api: Api = "completions",
    time_scale: float = 1.0,
    concurrency: int = 256,
    progress: Callable[[RequestOutcome], None] | None = None,
    timeout_s: float = 600.0,
    slo: SLOTargets | None = None,
    count_tokens: Callable[[str], int] | None = None,
    route: Callable[[WorkloadRequest], str] | None = None,
) -> list[RequestOutcome]:
    """Send every request ``(arrival_s - first arrival) * time_scale`` after the start, at most
    ``concurrency`` in flight (the rest wait their turn), and return the outcomes in workload
    order. ``model=None`` asks the server's ``/v1/models``. Times are the event loop's clock.
    ``route`` names the URL each request goes to instead of ``url`` (a client that picks the
    server itself)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if api not in API_PATHS:
        raise ValueError(f"api must be one of {', '.join(API_PATHS)}")
    loop = asyncio.get_running_loop()
    clock = loop.time
    gate = asyncio.Semaphore(concurrency)
    diagnostics = StreamDiagnostics()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    first_arrival = min((r.arrival_s for r in workload.requests), default=0.0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if model is None:
            model = await discover_model(session, url)
        start = clock()

        async def run(request: WorkloadRequest) -> RequestOutcome:
            # The load generator's schedule: waiting for a request's arrival time is the
            # replay itself, not synchronisation.
            delay = start + (request.arrival_s - first_arrival) * time_scale - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                outcome = await send_one(
                    session,
                    url if route is None else route(request),
                    request,
                    model,
                    clock,
                    api=api,
                    diagnostics=diagnostics,
                    slo=slo,
                    count_tokens=count_tokens,
                )
            if progress is not None:
                progress(outcome)
            return outcome

        tasks = [asyncio.create_task(run(r)) for r in workload.requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
            if diagnostics.malformed_lines:
                log.warning("%d malformed stream line(s) skipped in this replay", diagnostics.malformed_lines)
