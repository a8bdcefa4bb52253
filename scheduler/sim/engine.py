"""A simulated vLLM v1 engine: continuous batching over a prefix-cached KV block pool.

Pure and time-explicit: no clocks, no I/O, no randomness. A driver (the live HTTP worker
in real time, or a discrete-event simulator in virtual time) adds requests and calls
``step(now)`` whenever ``next_step_time()`` says the engine can run; each step executes
one engine iteration at once and returns when it ends (``StepResult.end``, from the
latency model), the tokens it produced at that time and the KV events it caused.

Scheduling follows vLLM v1's ``Scheduler.schedule`` with chunked prefill: a per-step
token budget (``max_num_batched_tokens``) is spent on one decode token per running
request first, then on the next prefill chunk of running requests, then on admitting
waiting requests in FCFS order (up to ``max_num_seqs`` running). A waiting request's
leading cached full blocks are hits (at most ``prompt_len - 1`` tokens: the last prompt
token is always recomputed, as in vLLM); its prefill starts after them.

There is no preemption. Instead admission reserves a request's worst-case block count
(prompt plus ``max_tokens``) against the free queue, so a running request can always grow
and the engine never deadlocks; a request that could not fit even into an empty pool is
rejected up front.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from scheduler.core import blockhash_ref
from scheduler.core.events import KVEvent
from scheduler.sim.blockpool import BlockPool, KVBlock
from scheduler.sim.latency import LatencyModel, StepShape, attention_pairs
from scheduler.sim.tokenizer import filler_token_id

# vLLM v1 histogram buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# Llama-3-8B bf16 on an 80 GB H100 at vLLM's default gpu_memory_utilization 0.9:
# 72 GiB - 16.06 GB weights - ~3 GB activations/CUDA graphs = ~58 GB of KV cache at
# 131,072 bytes per token = ~443k tokens = ~27.7k blocks of 16.
DEFAULT_CAPACITY_BLOCKS = 27_000


def _hash_module() -> Any:
    try:
        return importlib.import_module("scheduler._native.blockhash")
    except ImportError:
        return blockhash_ref


_HASHING = _hash_module()


class RequestRejected(ValueError):
    """The request can never run on this engine (too long, empty, bad parameters)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Llama-3-8B's context window.
    max_model_len: int = 8192
    # vLLM's NONE_HASH seed (its PYTHONHASHSEED) and --prefix-caching-hash-algo.
    hash_seed: str = blockhash_ref.VLLM_DEFAULT_SEED
    hash_algo: blockhash_ref.VllmHashAlgo = "sha256_cbor"
    latency: LatencyModel = field(default_factory=LatencyModel)

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "capacity_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.hash_algo not in blockhash_ref.VLLM_HASH_ALGOS:
            raise ValueError(f"hash_algo must be one of {', '.join(blockhash_ref.VLLM_HASH_ALGOS)}")


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class SimRequest:
    """One request's state and timings (engine time, seconds)."""

    __slots__ = (
        "arrival",
        "blocks",
        "digests",
        "final_blocks",
        "finish_time",
        "first_token_time",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "output_token_ids",
        "prompt_len",
        "request_id",
        "scheduled_time",
        "status",
        "token_ids",
        "token_times",
        "wire_hashes",
    )

    def __init__(self, request_id: str, prompt: list[int], max_tokens: int, arrival: float, block_size: int):
        self.request_id = request_id
        self.prompt_len = len(prompt)
        self.token_ids = prompt  # prompt followed by generated tokens
        self.output_token_ids: list[int] = []
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.blocks: list[KVBlock] = []
        self.num_cached_blocks = 0
        self.digests: list[bytes] = []
        self.wire_hashes: list[int] = []
        # KV of the last generated token is never computed.
        self.final_blocks = -(-(self.prompt_len + max_tokens - 1) // block_size)
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_len

    @property
    def completion_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival

    def __repr__(self) -> str:
        return (
            f"SimRequest({self.request_id!r}, {self.status.value}, prompt={self.prompt_len}, "
            f"out={len(self.output_token_ids)}/{self.max_tokens}, computed={self.num_computed_tokens})"
        )


class Histogram:
    """Prometheus-style histogram state: per-bucket counts (non-cumulative), sum, count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        bounds = self.bounds
        lo, hi = 0, len(bounds)
        while lo < hi:  # first bound >= value (Prometheus buckets are "le")
            mid = (lo + hi) // 2
            if bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        self.counts[lo] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class EngineMetrics:
    """Cumulative counters and histograms, named after vLLM's Prometheus metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass(slots=True)
class GeneratedToken:
    request: SimRequest
    index: int  # position among the request's output tokens
    token_id: int
    finished: bool


@dataclass(slots=True)
class StepResult:
    start: float
    end: float
    shape: StepShape
    # When the step's first iteration ends: first tokens exist from then on. Equal to
    # ``end`` unless token_scale stretches the step with further decode iterations.
    first_token_at: float = 0.0
    tokens: list[GeneratedToken] = field(default_factory=list)
    finished: list[SimRequest] = field(default_factory=list)
    events: list[KVEvent] = field(default_factory=list)
    admitted: list[SimRequest] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        output_token: Callable[[int], int] = filler_token_id,
    ) -> None:
        self.config = config or EngineConfig()
        self.pool = BlockPool(self.config.capacity_blocks, self.config.block_size)
        self.latency = self.config.latency
        self.metrics = EngineMetrics()
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.requests: dict[str, SimRequest] = {}
        self.busy_until = -math.inf
        self._output_token = output_token
        self._none_hash: bytes = blockhash_ref.vllm_none_hash(self.config.hash_seed, self.config.hash_algo)
        # Blocks that running requests may still allocate before they finish.
        self._reserved = 0

    # -- driver interface --------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def is_busy(self, now: float) -> bool:
        return now < self.busy_until

    def next_step_time(self) -> float | None:
        """Earliest time the next step may start, or None when there is nothing to do."""
        if not self.has_work:
            return None
        return self.busy_until

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.pool.usage

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], max_tokens: int, now: float
    ) -> SimRequest:
        cfg = self.config
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise RequestRejected("the prompt is empty")
        if max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        total = len(prompt_token_ids) + max_tokens
        if total > cfg.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {cfg.max_model_len} tokens; the request needs "
                f"{total} ({len(prompt_token_ids)} prompt + {max_tokens} max_tokens)"
            )
        request = SimRequest(request_id, list(prompt_token_ids), max_tokens, now, cfg.block_size)
        if request.final_blocks > cfg.capacity_blocks:
            raise RequestRejected(
                f"the request needs {request.final_blocks} KV blocks of {cfg.block_size} tokens but the "
                f"cache holds only {cfg.capacity_blocks}"
            )
        self._extend_hashes(request, len(prompt_token_ids) // cfg.block_size)
        self.requests[request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str, now: float) -> bool:
        """Drop a request (client went away); its blocks are freed like a finished one's."""
        request = self.requests.get(request_id)
        if request is None or request.done:
            return False
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            self._release(request)
        request.status = RequestStatus.ABORTED
        request.finish_time = now
        self.metrics.requests_aborted += 1
        del self.requests[request_id]
        return True

    def step(self, now: float) -> StepResult:
        """Run one engine iteration starting at ``now`` (not before ``busy_until``)."""
        if now < self.busy_until:
            raise ValueError(f"step at {now} but the previous step runs until {self.busy_until}")
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        scheduled: list[SimRequest] = []
        admitted: list[SimRequest] = []
        prefill_tokens = pairs = decode_seqs = decode_context = 0

        # 1. One decode token per running request whose prompt is fully computed.
        for request in self.running:
            if budget <= 0:
                break
            if request.num_computed_tokens >= request.prompt_len:
                self._schedule(request, 1)
                decode_seqs += 1
                decode_context += request.num_computed_tokens
                budget -= 1
                scheduled.append(request)
        # 2. The next prefill chunk of running requests still prefilling.
        for request in self.running:
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            if computed < request.prompt_len:
                n = min(request.prompt_len - computed, budget)
                self._schedule(request, n)
                prefill_tokens += n
                pairs += attention_pairs(n, computed)
                budget -= n
                scheduled.append(request)
        # 3. Admit waiting requests in arrival order while budget, sequences and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            hits = self.pool.longest_prefix(request.digests, (request.prompt_len - 1) // bs)
            evictable_hits = sum(1 for block in hits if block.ref_cnt == 0)
            cost = request.final_blocks - len(hits) + evictable_hits
            if self.pool.num_free - self._reserved < cost:
                break
            self.waiting.popleft()
            self.pool.touch(hits)
            request.blocks = hits
            request.num_cached_blocks = len(hits)
            request.num_computed_tokens = request.num_cached_tokens = len(hits) * bs
            request.status = RequestStatus.RUNNING
            request.scheduled_time = now
            self._reserved += request.final_blocks - len(hits)
            self.metrics.prefix_cache_queries += request.prompt_len
            self.metrics.prefix_cache_hits += request.num_cached_tokens
            self.running.append(request)
            admitted.append(request)
            computed = request.num_computed_tokens
            n = min(request.prompt_len - computed, budget)
            self._schedule(request, n)
            prefill_tokens += n
            pairs += attention_pairs(n, computed)
            budget -= n
            scheduled.append(request)

        shape = StepShape(prefill_tokens, pairs, decode_seqs, decode_context)
        end = now + self.latency.step_time(shape)
        first_end = now + self.latency.first_iteration_time(shape)
        if scheduled:
            self.busy_until = end
        result = StepResult(start=now, end=end, shape=shape, first_token_at=first_end, admitted=admitted)
        self._emit_tokens(scheduled, end, result)
        result.events = self.pool.take_events()
        return result

    # -- internals ---------------------------------------------------------------------

    def _extend_hashes(self, request: SimRequest, num_blocks: int) -> None:
        have = len(request.digests)
        if num_blocks <= have:
            return
        bs = self.config.block_size
        parent = request.digests[-1] if have else self._none_hash
        tokens = request.token_ids[have * bs : num_blocks * bs]
        digests: list[bytes]
        if self.config.hash_algo == "sha256_cbor":  # the kernel's algorithm: the fast path
            digests = _HASHING.vllm_block_digests(tokens, bs, parent)
        else:
            digests = blockhash_ref.vllm_block_digests(tokens, bs, parent, algo=self.config.hash_algo)
        request.digests.extend(digests)
        request.wire_hashes.extend(int.from_bytes(d[-8:], "big") for d in digests)

    def _schedule(self, request: SimRequest, num_new: int) -> None:
        """Give ``request`` the blocks for ``num_new`` more tokens and cache those that fill up."""
        bs = self.config.block_size
        computed = request.num_computed_tokens + num_new
        missing = -(-computed // bs) - len(request.blocks)
        if missing > 0:
            request.blocks.extend(self.pool.allocate(missing))
            self._reserved -= missing
        full = computed // bs
        if full > request.num_cached_blocks:
            self._extend_hashes(request, full)
            self.pool.cache_blocks(
                request.blocks,
                request.digests,
                request.wire_hashes,
                request.num_cached_blocks,
                full,
                request.token_ids,
            )
            request.num_cached_blocks = full
        request.num_computed_tokens = computed

    def _emit_tokens(self, scheduled: list[SimRequest], end: float, result: StepResult) -> None:
        metrics = self.metrics
        finished_any = False
        for request in scheduled:
            if request.num_computed_tokens < len(request.token_ids):
                continue  # prefill chunk that did not reach the end of the prompt
            index = len(request.output_token_ids)
            token = self._output_token(index)
            request.output_token_ids.append(token)
            request.token_ids.append(token)
            at = result.first_token_at if index == 0 else end
            request.token_times.append(at)
            metrics.generation_tokens += 1
            if index == 0:
                request.first_token_time = at
                metrics.prompt_tokens += request.prompt_len
                metrics.ttft.observe(at - request.arrival)
            else:
                metrics.itl.observe(end - request.token_times[-2])
            finished = index + 1 >= request.max_tokens
            result.tokens.append(GeneratedToken(request, index, token, finished))
            if finished:
                request.status = RequestStatus.FINISHED
                request.finish_time = end
                metrics.requests_finished += 1
                metrics.e2e.observe(end - request.arrival)
                self._release(request)
                del self.requests[request.request_id]
                result.finished.append(request)
                finished_any = True
        if finished_any:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]

    def _release(self, request: SimRequest) -> None:
        # Reverse order: a request's tail blocks are the least likely to be shared, so
        # they are evicted first (vLLM's KVCacheManager.free).
        self._reserved -= request.final_blocks - len(request.blocks)
        self.pool.free(reversed(request.blocks))
        request.blocks = []

    def cached_wire_hashes(self) -> Counter[int]:
        return self.pool.cached_wire_hashes()
