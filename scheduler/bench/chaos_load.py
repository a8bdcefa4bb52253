"""The steady traffic ``kvsched bench chaos`` keeps up through every fault, and what it measured.

Requests come from a fixed set of shared prefixes (``groups`` documents or system prompts of
``prefix_tokens``), each followed by a question of its own, so the pool's prefix caches hit
and a router that loses track of them shows it in the hit ratio. They are streamed token-id
completions (``usage`` in the last chunk gives the cached tokens), sent at a fixed rate
through the gateway by the same client code ``kvsched replay`` uses.

``recovery_s`` reads the outcomes around a fault: the baseline is the hit ratio and TTFT
median of the requests before it; the stack has recovered once a window of requests started
after the last disruption has a hit ratio of at least ``HIT_RATIO_FLOOR`` of the baseline
and a TTFT median within ``TTFT_CEILING`` of it (or ``TTFT_SLACK_MS`` above it, whichever is
larger: at a 20 ms baseline a loaded machine's scheduling noise alone is 50%), and the next
window does too.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from scheduler.replay.live import send_one
from scheduler.workloads.model import RequestOutcome, WorkloadRequest

VOCAB = 32_000
HIT_RATIO_FLOOR = 0.9
TTFT_CEILING = 1.5
TTFT_SLACK_MS = 25.0


@dataclass(frozen=True)
class LoadShape:
    rate: float = 8.0
    groups: int = 12
    prefix_tokens: int = 768
    suffix_tokens: int = 48
    max_tokens: int = 4
    seed: int = 0


@dataclass
class Sent:
    """One request of the steady load: when it left, its prompt, what came back."""

    at: float
    prompt: list[int]
    outcome: RequestOutcome

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def hit_ratio(self) -> float | None:
        cached = self.outcome.cached_tokens
        return (
            None if cached is None or not self.outcome.prompt_tokens else cached / self.outcome.prompt_tokens
        )


class Prompts:
    """Prompts of the load: a shared prefix (by group) and a question of their own."""

    def __init__(self, shape: LoadShape) -> None:
        self.shape = shape
        self._rng = random.Random(shape.seed)
        self.prefixes = [
            [self._rng.randrange(1, VOCAB) for _ in range(shape.prefix_tokens)] for _ in range(shape.groups)
        ]
        self._serial = 0

    def next(self) -> list[int]:
        # Some documents are asked about more than others (Zipf-like weights), as in RAG.
        group = self._rng.choices(
            range(self.shape.groups), weights=[1 / (g + 1) for g in range(self.shape.groups)]
        )
        self._serial += 1
        suffix = [self._rng.randrange(1, VOCAB) for _ in range(self.shape.suffix_tokens)]
        return self.prefixes[group[0]] + suffix


@dataclass
class SteadyLoad:
    """Sends at ``shape.rate`` through ``url`` until ``stop()``; every request is kept in ``sent``."""

    url: str
    model: str
    shape: LoadShape
    name: str = "load"
    sent: list[Sent] = field(default_factory=list)
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.prompts = Prompts(self.shape)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._serial = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"chaos {self.name}")

    async def stop(self) -> list[Sent]:
        """Stop sending and wait for what is in flight."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.sent

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        in_flight: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            next_at = loop.time()
            while not self._stop.is_set():
                task = asyncio.create_task(self._send(session, loop.time()))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                next_at += 1.0 / self.shape.rate
                # The load's own schedule: the wait until the next send is the traffic itself.
                with _suppress_timeout():
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _send(self, session: aiohttp.ClientSession, at: float) -> None:
        self._serial += 1
        prompt = self.prompts.next()
        request = WorkloadRequest(f"{self.name}-{self._serial}", 0.0, prompt, self.shape.max_tokens)
        loop = asyncio.get_running_loop()
        outcome = await send_one(session, self.url, request, self.model, loop.time)
        self.sent.append(Sent(at, prompt, outcome))


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *rest: object) -> bool:
        return kind is TimeoutError


# --- what the outcomes say ---------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    hit_ratio: float | None
    ttft_p50_ms: float | None
    requests: int


def window(sent: Sequence[Sent]) -> Window:
    ok = [s for s in sent if s.ok]
    prompt = sum(s.outcome.prompt_tokens for s in ok if s.outcome.cached_tokens is not None)
    cached = sum(s.outcome.cached_tokens or 0 for s in ok)
    ttfts = [s.outcome.ttft_s * 1000.0 for s in ok if s.outcome.ttft_s is not None]
    return Window(
        cached / prompt if prompt else None,
        statistics.median(ttfts) if ttfts else None,
        len(sent),
    )


def is_normal(current: Window, baseline: Window) -> bool:
    if current.hit_ratio is None or current.ttft_p50_ms is None:
        return False
    if baseline.hit_ratio is not None and current.hit_ratio < HIT_RATIO_FLOOR * baseline.hit_ratio:
        return False
    if baseline.ttft_p50_ms is not None:
        ceiling = max(TTFT_CEILING * baseline.ttft_p50_ms, baseline.ttft_p50_ms + TTFT_SLACK_MS)
        if current.ttft_p50_ms > ceiling:
            return False
    return True


def recovery_s(
    sent: Sequence[Sent], baseline: Window, fault_at: float, settled_at: float, size: int
) -> float | None:
    """Seconds from ``fault_at`` to the start of the first of two consecutive normal windows of
    ``size`` requests sent after ``settled_at`` (the last disruption); None if never."""
    after = sorted((s for s in sent if s.at >= settled_at), key=lambda s: s.at)
    for start in range(0, max(len(after) - 2 * size + 1, 0)):
        first, second = after[start : start + size], after[start + size : start + 2 * size]
        if is_normal(window(first), baseline) and is_normal(window(second), baseline):
            return max(first[0].at - fault_at, 0.0)
    return None
