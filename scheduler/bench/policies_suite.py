"""The workloads and load levels of ``kvsched bench policies``, and how a load level is set.

Rows are workloads at a load level. A load level is an *offered utilisation*: the GPU time
the row's requests need, over the pool's GPU time while they arrive. A request needs the
latency model's marginal cost (``scheduler/sim/latency.py``: linear layers and attention per
prefill token, linear layers, per-sequence overhead and KV reads per decode token; the
per-iteration floor of overhead and weight reads is shared by everything batched with it,
so it is left out) of

* prefilling the part of its prompt one pooled LRU cache as large as the whole pool would
  not have held (``pooled_lru_hits``: the capacity ceiling's cache hits, the best any
  router can do), in chunks of ``max_num_batched_tokens``, and
* decoding its output tokens.

Utilisation 1 is the pool's compute fully busy with a perfect router; iteration floors,
imbalance and cache misses make the real knee come earlier. ``moderate`` is 0.3 and
``saturated`` 0.6 ("near saturation": measured on the conversation trace, round-robin's
TTFT p99 there is several times its moderate one while the best routers still keep up).
A Mooncake trace reaches a level by compressing its arrival times (same requests); a
generated workload by its arrival rate, with as many requests as arrive in ``duration_s``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scheduler.sim.latency import LatencyModel, attention_pairs
from scheduler.workloads.generators import GENERATORS, generate
from scheduler.workloads.model import Workload
from scheduler.workloads.mooncake import load_mooncake
from scheduler.workloads.oracle import pooled_lru_hits

# Real tokens of KV cache per worker and the engine's block: as `kvsched replay --simulate`.
CAPACITY_TOKENS = 1024 * 512
ENGINE_BLOCK_SIZE = 16
PREFILL_CHUNK_TOKENS = 8192  # vLLM's max_num_batched_tokens, the simulated engines' budget
TRACE_BLOCK_TOKENS = 16  # each 512-token Mooncake block replayed as 16 tokens (scale 32)


@dataclass(frozen=True, slots=True)
class LoadLevel:
    name: str
    utilisation: float  # offered work / pool GPU time (module docstring)


MODERATE = LoadLevel("moderate", 0.3)
SATURATED = LoadLevel("saturated", 0.6)
LOAD_LEVELS = (MODERATE, SATURATED)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str  # the row's label
    kind: Literal["trace", "generated"]
    source: str  # trace file name in the data directory, or generator name
    description: str = ""
    # Generated workloads: requests per unit of the generator's rate (a chat session makes
    # one request a turn, an agent one a step, a RAG query one).
    requests_per_arrival: int = 1
    # Traces: the step in which the trace records arrival times (``load_mooncake``), whose
    # requests are spread over it; None replays the recorded times.
    arrival_step_ms: float | None = None


WORKLOADS = (
    WorkloadSpec(
        "conversation",
        "trace",
        "conversation_trace.jsonl",
        "Mooncake conversation trace: 12,031 Kimi requests, multi-turn chat, long prompts",
        arrival_step_ms=3000.0,
    ),
    WorkloadSpec(
        "synthetic",
        "trace",
        "synthetic_trace.jsonl",
        "Mooncake synthetic trace: 3,993 requests with heavier prefix reuse",
    ),
    WorkloadSpec("chat", "generated", "chat", "6-turn sessions over 4 shared system prompts", 6),
    WorkloadSpec("rag", "generated", "rag", "few-shot preamble + one of 24 Zipf-popular documents", 1),
    WorkloadSpec("agentic", "generated", "agentic", "8-step agent loops over a 2k-token tool prompt", 8),
)


@dataclass(frozen=True, slots=True)
class Size:
    """How big a run is: the full benchmark, or a tiny one for tests."""

    name: str
    workers: int
    trace_limit: int | None  # first N requests of a trace
    duration_s: float  # generated workloads: arrivals over this long


FULL = Size("full", workers=8, trace_limit=None, duration_s=30.0)
# The full pool on the traces' first 2,000 requests (the conversation trace's first ~10
# minutes, the synthetic trace's first half) and 10 s of generated arrivals: about a fifth
# of the full run's simulation work, for a machine the full run would keep busy for hours.
SHORT = Size("short", workers=8, trace_limit=2000, duration_s=10.0)
TINY = Size("tiny", workers=2, trace_limit=60, duration_s=4.0)
SIZES = {size.name: size for size in (FULL, SHORT, TINY)}


def capacity_blocks(workload: Workload) -> int:
    """Engine blocks of 16 workload tokens per worker holding CAPACITY_TOKENS real tokens."""
    return max(1, math.ceil(CAPACITY_TOKENS / (ENGINE_BLOCK_SIZE * workload.token_scale)))


def pool_capacity_blocks(workload: Workload, workers: int) -> int:
    """The whole pool's KV capacity in the workload's own blocks (the ceiling's cache size)."""
    return capacity_blocks(workload) * workers * ENGINE_BLOCK_SIZE // workload.block_tokens


def offered_work_s(workload: Workload, workers: int, model: LatencyModel | None = None) -> float:
    """GPU seconds the workload's requests need with the capacity ceiling's cache hits."""
    model = model or LatencyModel()
    scale = workload.token_scale
    hits = pooled_lru_hits(workload.requests, workload.block_tokens, pool_capacity_blocks(workload, workers))
    total = 0.0
    for request, hit in zip(workload.requests, hits, strict=True):
        context = hit * workload.block_tokens * scale
        todo = len(request.prompt_token_ids) * scale - context
        while todo > 0:
            chunk = min(todo, PREFILL_CHUNK_TOKENS)
            total += model.linear_per_token_s * chunk + model.attn_per_pair_s * attention_pairs(
                int(chunk), int(context)
            )
            context += chunk
            todo -= chunk
        # Each output token: its linear layers and per-sequence cost, and one read of the
        # KV cache so far (the prompt and half the output, on average).
        tokens = request.max_tokens * scale
        mean_context = len(request.prompt_token_ids) * scale + tokens / 2
        per_token = model.linear_per_token_s + model.per_seq_s + model.kv_read_per_token_s * mean_context
        total += tokens * per_token
    return total


def offered_utilisation(workload: Workload, workers: int) -> float:
    duration = workload.duration_s
    return offered_work_s(workload, workers) / (workers * duration) if duration > 0 else math.inf


def _trace(spec: WorkloadSpec, data_dir: Path, size: Size, seed: int) -> Workload:
    path = data_dir / spec.source
    if not path.exists():
        raise FileNotFoundError(f"{spec.name}: trace {path} not found (give --data-dir)")
    return load_mooncake(
        path,
        block_tokens=TRACE_BLOCK_TOKENS,
        limit=size.trace_limit,
        arrival_step_ms=spec.arrival_step_ms,
        seed=seed,
    )


def _generated(spec: WorkloadSpec, seed: int, size: Size, rate: float) -> Workload:
    requests = max(8, round(rate * spec.requests_per_arrival * size.duration_s))
    return generate(spec.source, seed=seed, rate=rate, requests=requests)


def build_workload(spec: WorkloadSpec, level: LoadLevel, size: Size, seed: int, data_dir: Path) -> Workload:
    """The row's workload at ``level``: deterministic for (spec, level, size, seed)."""
    workers = size.workers
    if spec.kind == "trace":
        base = _trace(spec, data_dir, size, seed)
        # Utilisation is inversely proportional to the duration: compress time to reach it.
        return base.time_scaled(offered_utilisation(base, workers) / level.utilisation)
    rate = float(inspect.signature(GENERATORS[spec.source]).parameters["rate"].default)
    # Utilisation grows about linearly with the rate (more sessions share the same cache,
    # so not exactly, and a short draw is noisy): a few fixed-point steps, keeping the draw
    # that came closest. Full-size rows land within 5%.
    best: tuple[float, Workload] | None = None
    for _ in range(5):
        workload = _generated(spec, seed, size, rate)
        utilisation = offered_utilisation(workload, workers)
        miss = abs(utilisation / level.utilisation - 1.0)
        if best is None or miss < best[0]:
            best = (miss, workload)
        rate *= level.utilisation / utilisation
    assert best is not None
    return best[1]
