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

KV blocks, two ways (``EngineConfig.preemption``):

* reservation (the default): admission reserves a request's worst-case block count (prompt
  plus ``max_tokens``) against the free queue, so a running request can always grow and
  nothing is ever preempted;
* on demand, as vLLM v1 does (``KVCacheManager.allocate_slots`` allocates only the blocks of
  the tokens scheduled now): when a running request cannot get its next block, the most
  recently admitted running request is preempted (FCFS policy: ``self.running.pop()``), frees
  its blocks (still cached, so its resumption may hit them) and goes back to the front of the
  waiting queue to recompute its prompt and output so far; a step that preempted admits no
  waiting request (vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule`` and
  ``_preempt_request``).

Either way a request that could not fit even into an empty pool is rejected up front.
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
    # With token_scale > 1 (a simulated token standing for several real ones): run the real
    # engine's iterations one prefill chunk at a time and let waiting requests join between
    # them, as vLLM's continuous batching does, instead of one step that prefills once and
    # then decodes token_scale - 1 more iterations with nobody admitted (see step()). The
    # virtual-time pool turns it on; the live workers keep whole steps.
    interleave_decode: bool = False
    # LoRA: adapters one batch may use (vLLM's --max-loras; 0: LoRA off, a request naming an
    # adapter is refused) and the engine time to load one that is not in a GPU slot.
    max_loras: int = 0
    lora_load_s: float = 0.0
    # KV blocks on demand with vLLM's preemption (see the module docstring); False: worst-case
    # reservation at admission, no preemption. Not modelled with interleaved scaled steps.
    preemption: bool = False

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
        if self.max_loras < 0 or self.lora_load_s < 0:
            raise ValueError("max_loras and lora_load_s must not be negative")
        if self.preemption and self.interleave_decode and self.latency.token_scale > 1.0:
            raise ValueError("preemption is not modelled with interleaved scaled steps (token_scale > 1)")
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
        "decode_iterations",
        "digests",
        "final_blocks",
        "finish_time",
        "first_token_time",
        "lora",
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
        "transferred_tokens",
        "wire_hashes",
    )

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        arrival: float,
        block_size: int,
        lora: str | None = None,
    ):
        self.request_id = request_id
        self.lora = lora  # the LoRA adapter it names; None: the base model
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
        # Interleaved mode: real decode iterations run since this request's last token.
        self.decode_iterations = 0.0
        self.digests: list[bytes] = []
        self.wire_hashes: list[int] = []
        # KV of the last generated token is never computed.
        self.final_blocks = -(-(self.prompt_len + max_tokens - 1) // block_size)
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None
        # Prompt tokens whose KV a prefill pod computed and sent here (disaggregated serving).
        self.transferred_tokens = 0

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
    # vllm:num_preemptions: running requests preempted for KV blocks (on-demand mode only).
    preemptions: int = 0
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
    # Interleaved mode: a run of pure-decode iterations whose tokens are produced only when
    # ``Engine.finish_decode_run`` is called at ``end`` (``interrupt`` may bring ``end`` forward).
    pending: bool = False


# Iteration counts are whole numbers of real iterations; a fractional token_scale leaves
# remainders that float rounding must not turn into an extra iteration.
_ITERATION_EPSILON = 1e-9


@dataclass(slots=True)
class _DecodeRun:
    """Pure-decode iterations in progress (interleaved mode)."""

    start: float
    per_iteration: float
    iterations: int
    requests: list[SimRequest]
    shape: StepShape


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
        self._decode_run: _DecodeRun | None = None
        # Adapters in GPU slots, least recently used first, and the id each was given when
        # first loaded (vLLM numbers adapters in load order: its lora_int_id).
        self.loaded_loras: dict[str, None] = {}
        self._lora_ids: dict[str, int] = {}
        self._lora_loads = 0  # adapters loaded in the step being built
        self.lora_loads = 0  # adapters loaded, in all

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

    @property
    def running_loras(self) -> frozenset[str]:
        return frozenset(r.lora for r in self.running if r.lora is not None)

    @property
    def waiting_loras(self) -> frozenset[str]:
        return frozenset(r.lora for r in self.waiting if r.lora is not None)

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill ahead of a new arrival: the rest of the running
        prefills and what the cache does not hold now of every waiting prompt (the hits its
        admission would find if it came now)."""
        running = sum(max(r.prompt_len - r.num_computed_tokens, 0) for r in self.running)
        bs = self.config.block_size
        longest_prefix = self.pool.longest_prefix
        return running + sum(
            r.prompt_len - len(longest_prefix(r.digests, (len(r.token_ids) - 1) // bs)) * bs
            for r in self.waiting
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        now: float,
        *,
        lora: str | None = None,
        transferred_tokens: int = 0,
    ) -> SimRequest:
        """Queue a request. ``transferred_tokens``: the KV of that many leading prompt tokens
        arrives from a prefill pod, so the engine computes only the rest (at least the last
        prompt token, whose logits give the first output token)."""
        cfg = self.config
        if lora is not None and not cfg.max_loras:
            raise RequestRejected(f"LoRA adapter {lora!r} requested but LoRA is not enabled (max_loras 0)")
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
        request = SimRequest(request_id, list(prompt_token_ids), max_tokens, now, cfg.block_size, lora)
        request.transferred_tokens = min(max(transferred_tokens, 0), request.prompt_len - 1)
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
        """Run one engine iteration starting at ``now`` (not before ``busy_until``).

        With ``token_scale`` > 1 a step stands for ``token_scale`` real iterations: one that
        prefills (a chunk of each running prefill, then admissions) and decodes one
        simulated token's first real token, then ``token_scale - 1`` pure-decode ones. With
        ``interleave_decode`` it is one real iteration instead when there is prefill work,
        and otherwise a run of pure-decode iterations up to the next simulated token that
        ``interrupt`` can cut short when a request arrives (``_interleaved_step``).
        """
        if now < self.busy_until:
            raise ValueError(f"step at {now} but the previous step runs until {self.busy_until}")
        if self.config.interleave_decode and self.latency.token_scale > 1.0:
            return self._interleaved_step(now)
        budget = self.config.max_num_batched_tokens
        scheduled: list[SimRequest] = []
        admitted: list[SimRequest] = []
        decode_seqs = decode_context = 0
        preempted = self.config.preemption and self._make_room(budget)

        # 1. One decode token per running request whose prompt is fully computed.
        for request in self.running:
            if budget <= 0:
                break
            if _decoding(request):
                self._schedule(request, 1)
                decode_seqs += 1
                decode_context += request.num_computed_tokens
                budget -= 1
                scheduled.append(request)
        # 2. and 3. Prefill chunks of running requests, then admissions (none after a
        # preemption, as in vLLM).
        prefill_tokens, pairs = self._schedule_prefill(budget, now, scheduled, admitted, admit=not preempted)

        shape = StepShape(prefill_tokens, pairs, decode_seqs, decode_context)
        loading = self._take_lora_load_time()
        end = now + loading + self.latency.step_time(shape)
        first_end = now + loading + self.latency.first_iteration_time(shape)
        if scheduled:
            self.busy_until = end
        result = StepResult(start=now, end=end, shape=shape, first_token_at=first_end, admitted=admitted)
        self._emit_tokens(scheduled, end, result)
        result.events = self.pool.take_events()
        return result

    def _schedule_prefill(
        self,
        budget: int,
        now: float,
        scheduled: list[SimRequest],
        admitted: list[SimRequest],
        *,
        admit: bool = True,
    ) -> tuple[int, int]:
        """Spend ``budget`` on the next prefill chunk of running requests, then on admitting
        waiting requests in arrival order while sequences and blocks allow; returns the
        prefill tokens and attention pairs scheduled."""
        cfg = self.config
        bs = cfg.block_size
        prefill_tokens = pairs = 0
        # 2. The next prefill chunk of running requests still prefilling (a resumed request
        # recomputes its output so far too: len(token_ids)).
        for request in self.running:
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            if not _decoding(request):
                n = min(len(request.token_ids) - computed, budget)
                self._schedule(request, n)
                prefill_tokens += n
                pairs += attention_pairs(n, computed)
                budget -= n
                scheduled.append(request)
        # 3. Admit waiting requests in arrival order while budget, sequences and blocks allow;
        # one whose adapter finds no slot stays waiting and the next is tried (vLLM's
        # scheduler skips it the same way: vllm/v1/core/sched/scheduler.py, max_loras).
        passed_over: list[SimRequest] = []
        batch_loras = self.running_loras if cfg.max_loras else frozenset()
        while admit and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            lora = request.lora
            if lora is not None and lora not in batch_loras and len(batch_loras) >= cfg.max_loras:
                passed_over.append(self.waiting.popleft())
                continue
            hits = self.pool.longest_prefix(request.digests, (len(request.token_ids) - 1) // bs)
            if not self._fits(request, hits, budget):
                break
            self.waiting.popleft()
            if lora is not None:
                self._activate_lora(lora, batch_loras)
                batch_loras = batch_loras | {lora}
            self.pool.touch(hits)
            request.blocks = hits
            request.num_cached_blocks = len(hits)
            request.num_computed_tokens = len(hits) * bs
            if request.scheduled_time is None:
                # Set at first admission only, as vLLM does (num_cached_tokens < 0 until then):
                # a resumed request's hits on its own blocks are not prefix-cache hits.
                request.num_cached_tokens = request.num_computed_tokens
            # Received KV needs its blocks like computed KV; _schedule allocates and caches them.
            request.num_computed_tokens = max(request.num_computed_tokens, request.transferred_tokens)
            request.status = RequestStatus.RUNNING
            request.scheduled_time = now
            if not cfg.preemption:
                self._reserved += request.final_blocks - len(hits)
            self.metrics.prefix_cache_queries += request.prompt_len
            self.metrics.prefix_cache_hits += request.num_cached_tokens
            self.running.append(request)
            admitted.append(request)
            computed = request.num_computed_tokens
            n = min(len(request.token_ids) - computed, budget)
            self._schedule(request, n)
            prefill_tokens += n
            pairs += attention_pairs(n, computed)
            budget -= n
            scheduled.append(request)
        self.waiting.extendleft(reversed(passed_over))
        return prefill_tokens, pairs

    def _activate_lora(self, lora: str, in_batch: frozenset[str]) -> None:
        """Put ``lora`` in a GPU slot for the request being admitted: free when it is there
        already; otherwise it loads (``lora_load_s`` on this step) into a free slot or the
        least recently used one no running request uses."""
        loaded = self.loaded_loras
        if lora in loaded:
            del loaded[lora]
        else:
            self._lora_loads += 1
            self.lora_loads += 1
            self._lora_ids.setdefault(lora, len(self._lora_ids) + 1)
            if len(loaded) >= self.config.max_loras:
                victim = next((name for name in loaded if name not in in_batch), None)
                if victim is not None:
                    del loaded[victim]
        loaded[lora] = None

    def _take_lora_load_time(self) -> float:
        loads, self._lora_loads = self._lora_loads, 0
        return loads * self.config.lora_load_s

    def lora_id(self, lora: str) -> int:
        """vLLM's lora_int_id for an adapter this engine has loaded."""
        return self._lora_ids[lora]

    def _fits(self, request: SimRequest, hits: list[KVBlock], budget: int) -> bool:
        """Whether the free blocks cover the request's worst case (its cache hits aside), or
        with ``preemption`` the blocks of what it computes now: its received KV and its first
        chunk of at most ``budget`` tokens (vLLM's allocate_slots check)."""
        evictable_hits = sum(1 for block in hits if block.ref_cnt == 0)
        if not self.config.preemption:
            cost = request.final_blocks - len(hits) + evictable_hits
            return self.pool.num_free - self._reserved >= cost
        bs = self.config.block_size
        computed = max(len(hits) * bs, request.transferred_tokens)
        upto = computed + min(len(request.token_ids) - computed, budget)
        return self.pool.num_free >= -(-upto // bs) - len(hits) + evictable_hits

    def _make_room(self, budget: int) -> bool:
        """Preempt running requests, the most recently admitted first, until the blocks the
        running ones take this step (a decode token each, then their next prefill chunks,
        in the order ``step`` schedules them) fit in the free queue. vLLM does it request by
        request inside its running loop, refunding a victim scheduled earlier in the step;
        planning first gives the same victims. Returns whether any was preempted."""
        bs = self.config.block_size
        running = self.running
        order = [r for r in running if _decoding(r)] + [r for r in running if not _decoding(r)]
        free = self.pool.num_free
        planned: dict[str, tuple[int, int]] = {}  # request id -> (blocks, tokens) this step
        preempted = False
        for request in order:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted for an earlier one
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            tokens = 1 if _decoding(request) else min(len(request.token_ids) - computed, budget)
            need = max(-(-(computed + tokens) // bs) - len(request.blocks), 0)
            while need > free:
                victim = running[-1]
                freed = self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                blocks, refund = planned.pop(victim.request_id, (0, 0))
                free += freed + blocks
                budget += refund
            if request.status is not RequestStatus.RUNNING:
                break  # it could not fit even alone: nothing more runs this step
            free -= need
            budget -= tokens
            planned[request.request_id] = (need, tokens)
        return preempted

    def _preempt(self, request: SimRequest) -> int:
        """Take ``request`` off the running batch, free its blocks and queue it first to
        recompute (vLLM's _preempt_request); returns the blocks that became free."""
        freed = sum(1 for block in request.blocks if block.ref_cnt == 1)
        self.running.remove(request)
        self.pool.free(reversed(request.blocks))
        request.blocks = []
        request.num_cached_blocks = 0
        request.num_computed_tokens = 0
        request.transferred_tokens = 0  # received KV is gone with the blocks
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.metrics.preemptions += 1
        return freed

    def can_admit(self) -> bool:
        """Whether the next step could admit the first waiting request that an adapter slot
        does not hold back."""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        request: SimRequest | None = self.waiting[0]
        if self.config.max_loras:
            batch_loras = self.running_loras
            request = next(
                (
                    r
                    for r in self.waiting
                    if r.lora is None or r.lora in batch_loras or len(batch_loras) < self.config.max_loras
                ),
                None,
            )
        if request is None:
            return False
        bs = self.config.block_size
        hits = self.pool.longest_prefix(request.digests, (len(request.token_ids) - 1) // bs)
        return self._fits(request, hits, self.config.max_num_batched_tokens)

    # -- interleaved decode (token_scale > 1) ------------------------------------------------

    def _interleaved_step(self, now: float) -> StepResult:
        """One real iteration when there is prefill work: the prefill chunks, and one real
        decode token for each decoding request, whose simulated token comes out once it has
        had ``token_scale`` such iterations. Without prefill work, a run of pure-decode
        iterations until the first decoding request's next simulated token is due
        (``pending``: ``finish_decode_run`` produces it, ``interrupt`` may end it sooner).

        This is vLLM's continuous batching at real-token granularity: a request arriving
        while others decode joins at the next iteration, and long prompts keep prefilling at
        a full chunk per iteration while others decode. Whole scaled steps instead make an
        arrival wait up to ``token_scale - 1`` decode iterations (about 0.25 s at scale 32)
        and prefill only one chunk per ``token_scale`` iterations while anything decodes.
        """
        scale = self.latency.token_scale
        decoding = [r for r in self.running if r.num_computed_tokens >= r.prompt_len]
        # Each decoding request takes one real token of the iteration's budget.
        budget = self.config.max_num_batched_tokens - math.ceil(len(decoding) / scale)
        scheduled: list[SimRequest] = []
        admitted: list[SimRequest] = []
        prefill_tokens, pairs = self._schedule_prefill(budget, now, scheduled, admitted)
        context = sum(r.num_computed_tokens for r in decoding)
        shape = StepShape(prefill_tokens, pairs, len(decoding), context)
        if not prefill_tokens:
            if not decoding:
                return StepResult(start=now, end=now, shape=shape, first_token_at=now)
            return self._start_decode_run(now, decoding, shape)
        end = now + self._take_lora_load_time() + self.latency.first_iteration_time(shape)
        self.busy_until = end
        for request in decoding:
            request.decode_iterations += 1.0
            if request.decode_iterations >= scale - _ITERATION_EPSILON:
                request.decode_iterations -= scale
                self._schedule(request, 1)
                scheduled.append(request)
        result = StepResult(start=now, end=end, shape=shape, first_token_at=end, admitted=admitted)
        self._emit_tokens(scheduled, end, result)
        result.events = self.pool.take_events()
        return result

    def _start_decode_run(self, now: float, decoding: list[SimRequest], shape: StepShape) -> StepResult:
        scale = self.latency.token_scale
        remaining = min(scale - r.decode_iterations for r in decoding)
        iterations = max(1, math.ceil(remaining - _ITERATION_EPSILON))
        per_iteration = self.latency.decode_iteration_time(shape)
        self._decode_run = _DecodeRun(now, per_iteration, iterations, decoding, shape)
        self.busy_until = end = now + iterations * per_iteration
        return StepResult(start=now, end=end, shape=shape, first_token_at=end, pending=True)

    def interrupt(self, now: float) -> float | None:
        """A request arrived during a pure-decode run: end the run at the iteration boundary
        after ``now`` so the next step can admit it. Returns the run's new end, or None when
        there is no run to shorten (none running, or it ends by then anyway)."""
        run = self._decode_run
        if run is None or now >= self.busy_until:
            return None
        done = max(1, math.ceil((now - run.start) / run.per_iteration - _ITERATION_EPSILON))
        if done >= run.iterations:
            return None
        # The run was as long as the first due token allowed, so nobody's token comes out
        # in the iterations it keeps.
        run.iterations = done
        self.busy_until = run.start + done * run.per_iteration
        return self.busy_until

    def finish_decode_run(self) -> StepResult:
        """The pending decode run has ended (at ``busy_until``): its tokens and KV events."""
        run = self._decode_run
        if run is None:
            raise RuntimeError("no decode run is pending")
        self._decode_run = None
        scale = self.latency.token_scale
        scheduled: list[SimRequest] = []
        for request in run.requests:
            if request.status is not RequestStatus.RUNNING:
                continue
            request.decode_iterations += run.iterations
            if request.decode_iterations >= scale - _ITERATION_EPSILON:
                request.decode_iterations -= scale
                self._schedule(request, 1)
                scheduled.append(request)
        end = run.start + run.iterations * run.per_iteration
        result = StepResult(start=run.start, end=end, shape=run.shape, first_token_at=end)
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
        # vLLM hashes a LoRA request's blocks with the adapter's name as each block's extra
        # key (vllm/v1/core/kv_cache_utils.py, _gen_lora_extra_hash_keys).
        extra = None if request.lora is None else [(request.lora,)] * (num_blocks - have)
        if self.config.hash_algo == "sha256_cbor":  # the kernel's algorithm: the fast path
            digests = _HASHING.vllm_block_digests(tokens, bs, parent, extra)
        else:
            digests = blockhash_ref.vllm_block_digests(tokens, bs, parent, extra, algo=self.config.hash_algo)
        request.digests.extend(digests)
        request.wire_hashes.extend(int.from_bytes(d[-8:], "big") for d in digests)

    def _schedule(self, request: SimRequest, num_new: int) -> None:
        """Give ``request`` the blocks for ``num_new`` more tokens and cache those that fill up."""
        bs = self.config.block_size
        computed = request.num_computed_tokens + num_new
        missing = -(-computed // bs) - len(request.blocks)
        if missing > 0:
            request.blocks.extend(self.pool.allocate(missing))
            if not self.config.preemption:
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
                lora=None if request.lora is None else (self._lora_ids[request.lora], request.lora),
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
        if not self.config.preemption:
            self._reserved -= request.final_blocks - len(request.blocks)
        self.pool.free(reversed(request.blocks))
        request.blocks = []

    def cached_wire_hashes(self) -> Counter[int]:
        return self.pool.cached_wire_hashes()

    def cached_prefix_blocks(self, prompt_token_ids: Sequence[int]) -> int:
        """How many leading full blocks of this prompt the cache holds now (changes nothing)."""
        bs = self.config.block_size
        tokens = list(prompt_token_ids[: len(prompt_token_ids) // bs * bs])
        if self.config.hash_algo == "sha256_cbor":
            digests = _HASHING.vllm_block_digests(tokens, bs, self._none_hash)
        else:
            digests = blockhash_ref.vllm_block_digests(
                tokens, bs, self._none_hash, algo=self.config.hash_algo
            )
        return len(self.pool.longest_prefix(digests, len(digests)))


def _decoding(request: SimRequest) -> bool:
    """Whether ``request`` computes one token next: its prompt and all but its last output
    token are computed (a resumed request recomputes its output first, like a prompt)."""
    computed = request.num_computed_tokens
    return computed >= request.prompt_len and computed >= len(request.token_ids) - 1
