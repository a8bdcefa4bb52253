"""Live replay: send a workload to an OpenAI-compatible endpoint at its arrival times.

Streaming completions with ``stream_options.include_usage`` so the final chunk reports
``usage.prompt_tokens_details.cached_tokens``; prompts go as token-id lists, which vLLM
and the simulated workers accept. TTFT is the first content chunk, TPOT the mean gap
after it. A concurrency cap makes requests wait (never dropped); HTTP errors count as
failed with their status and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from scheduler.replay.report import RequestOutcome
from scheduler.workloads.model import Workload, WorkloadRequest

SERVED_BY_HEADERS = ("x-kvsched-sim-worker", "x-gateway-destination-endpoint-served")


def _usage_from(chunk: dict[str, Any], outcome: RequestOutcome) -> None:
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or outcome.prompt_tokens)
    outcome.completion_tokens = int(usage.get("completion_tokens") or outcome.completion_tokens)
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        outcome.cached_tokens = int(details["cached_tokens"])


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    request: WorkloadRequest,
    model: str,
    clock: Callable[[], float],
) -> RequestOutcome:
    outcome = RequestOutcome(
        request.request_id, ok=False, start_s=clock(), prompt_tokens=len(request.prompt_token_ids)
    )
    body = {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chunks = 0
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, headers={"x-request-id": request.request_id}
        ) as resp:
            for header in SERVED_BY_HEADERS:
                if header in resp.headers:
                    outcome.endpoint = resp.headers[header]
                    break
            if resp.status != 200:
                outcome.error = f"http {resp.status}: {(await resp.text())[:200]}"
                outcome.end_s = clock()
                return outcome
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text") is not None:
                    chunks += 1
                    if outcome.first_token_s is None:
                        outcome.first_token_s = clock()
                _usage_from(chunk, outcome)
        outcome.end_s = clock()
        if not outcome.completion_tokens:
            outcome.completion_tokens = chunks
        outcome.ok = outcome.first_token_s is not None
        if not outcome.ok:
            outcome.error = "no tokens: the stream ended without content"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.end_s = clock()
    return outcome


async def replay_live(
    workload: Workload,
    url: str,
    *,
    model: str = "default",
    time_scale: float = 1.0,
    concurrency: int = 256,
    progress: Callable[[RequestOutcome], None] | None = None,
    timeout_s: float = 600.0,
) -> list[RequestOutcome]:
    """Send every request at ``arrival_s * time_scale`` after the start; wait for all."""
    url = url.rstrip("/")
    loop = asyncio.get_running_loop()
    clock = loop.time
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    start = clock()
    first_arrival = min((r.arrival_s for r in workload.requests), default=0.0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def run(request: WorkloadRequest) -> RequestOutcome:
            # The load generator's schedule: sleeping until a request's arrival time is
            # the replay itself, not synchronisation.
            delay = start + (request.arrival_s - first_arrival) * time_scale - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                outcome = await send_one(session, url, request, model, clock)
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
