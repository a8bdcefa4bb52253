"""The workloads of ``kvsched bench peers``, as text, and their floor.

Every router in the comparison gets the same requests at the same arrival times, as text
``/v1/completions`` prompts: sglang-router 0.3.2 reads only text (a token-id prompt gets HTTP
422 from its ``/v1/completions``), and routers that tokenise text themselves are what is being
compared. Token-id workloads become text through the simulated model's single-token words:
id ``t`` becomes the word ``words[t % len(words)]``, each after a space, so every id is one
token of the worker's tokenizer and two prompts share a text prefix exactly where they share
an id prefix. A prompt's ids (``prompt_token_ids``) are then the client's own count of that
text with the pool's tokenizer files, the ids the workers cache.

Workloads:

* ``rag_tenants`` (the default): a multi-tenant RAG service. Each tenant has its own few-shot
  preamble and its own documents (Zipf popularity within the tenant); tenants' queries
  arrive as independent Poisson streams. At the defaults (8 tenants x 12 documents of 2,048
  tokens behind a 512-token preamble) the documents alone are 196k tokens, 12.3k blocks of
  16: more than a worker's cache (``DEFAULT_CAPACITY_BLOCKS``, 4,096 blocks) and more than
  the pool's four caches together hold, so where a router sends a tenant decides what stays
  cached.
* the built-in generators of ``scheduler/workloads/generators.py``: ``chat``, ``rag``,
  ``agentic`` and ``shared_prefix``.

The floor (``floor``) is what no router can beat: each request alone on an idle engine
(no queueing) with one infinite cache shared by the whole pool, TTFT from the same engine
and latency model the workers run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from scheduler.bench.peer_names import BUILTIN_WORKLOADS, DEFAULT_WORKLOAD, WORKLOADS
from scheduler.replay.text import ClientTokenizer
from scheduler.sim.engine import Engine, EngineConfig, RequestRejected
from scheduler.workloads.generators import TEXT_GENERATORS, generate, rag
from scheduler.workloads.model import Workload

# rag_tenants at its defaults: 600 queries at 13 req/s (46 s), the size of the live
# comparison in the shared measurements (600 streamed completions at 12.7 req/s).
RAG_TENANTS_REQUESTS = 600
RAG_TENANTS_RATE = 13.0
RAG_TENANTS = 8
RAG_TENANT_DOCUMENTS = 12
RAG_DOCUMENT_TOKENS = 2048
RAG_PREAMBLE_TOKENS = 512
RAG_ANSWER_TOKENS = (16, 64)


def rag_tenants(
    *,
    seed: int = 0,
    requests: int | None = None,
    rate: float | None = None,
    tenants: int = RAG_TENANTS,
    documents: int = RAG_TENANT_DOCUMENTS,
) -> Workload:
    """``requests`` queries, Poisson arrivals at ``rate`` per second, each from a tenant drawn
    uniformly; a tenant's queries are a ``rag`` workload of its own (one preamble, its own
    documents), taken in order."""
    total = RAG_TENANTS_REQUESTS if requests is None else requests
    total_rate = RAG_TENANTS_RATE if rate is None else rate
    if tenants < 1 or total < 1 or not total_rate > 0:
        raise ValueError("rag_tenants needs tenants, requests and a positive rate")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / total_rate, size=total))
    owners = rng.integers(0, tenants, size=total)
    queues = [
        iter(
            rag(
                seed=seed * 1000 + tenant,
                requests=int((owners == tenant).sum()) or 1,
                documents=documents,
                document_tokens=RAG_DOCUMENT_TOKENS,
                preambles=1,
                preamble_tokens=RAG_PREAMBLE_TOKENS,
                answer_tokens=RAG_ANSWER_TOKENS,
            ).requests
        )
        for tenant in range(tenants)
    ]
    merged = [
        dataclasses.replace(
            next(queues[int(owner)]),
            request_id=f"t{int(owner)}-{i}",
            arrival_s=float(at),
            session_id=f"tenant-{int(owner)}",
        )
        for i, (at, owner) in enumerate(zip(arrivals, owners, strict=True))
    ]
    return Workload(
        "rag_tenants",
        merged,
        block_tokens=16,
        meta={"generator": "rag_tenants", "seed": seed, "tenants": tenants, "documents": documents},
    )


def as_text(workload: Workload, tokenizer: ClientTokenizer, words: Sequence[str]) -> Workload:
    """``workload`` with every token-id prompt written as single-token words (module docstring),
    its ids recounted by ``tokenizer``."""
    vocabulary = list(words)
    if not vocabulary:
        raise ValueError("no single-token words to write prompts with")
    size = len(vocabulary)
    requests = [
        r
        if r.prompt_text is not None
        else dataclasses.replace(
            r, prompt_text="".join(" " + vocabulary[t % size] for t in r.prompt_token_ids)
        )
        for r in workload.requests
    ]
    return Workload(
        workload.name, requests, workload.token_scale, workload.block_tokens, dict(workload.meta)
    ).with_token_ids(tokenizer.prompt_ids)


def load_workload(
    name: str,
    tokenizer: ClientTokenizer,
    *,
    seed: int = 0,
    requests: int | None = None,
    rate: float | None = None,
) -> Workload:
    """Workload ``name`` as text at its base ``rate`` (each generator's own default when None)."""
    words = tokenizer.single_token_words()
    if name == DEFAULT_WORKLOAD:
        base = rag_tenants(seed=seed, requests=requests, rate=rate)
    elif name in BUILTIN_WORKLOADS:
        base = generate(
            name, seed=seed, rate=rate, requests=requests, words=words if name in TEXT_GENERATORS else None
        )
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return as_text(base, tokenizer, words)


def at_rate(workload: Workload, factor: float) -> Workload:
    """The same requests with arrivals ``factor`` times as dense (2 = twice the rate)."""
    if not factor > 0:
        raise ValueError("the rate factor must be positive")
    scaled = workload.time_scaled(1.0 / factor)
    scaled.meta["rate_factor"] = factor
    return scaled


def offered_rate(workload: Workload) -> float:
    """Requests per second over the workload's span of arrivals."""
    span = workload.duration_s
    return (len(workload.requests) - 1) / span if span > 0 else float("inf")


# --- the floor --------------------------------------------------------------------------------


def floor(workload: Workload, engine: EngineConfig, speed: float = 1.0) -> dict[str, Any]:
    """Each request alone on an idle engine whose cache holds every earlier prompt; TTFTs in
    real milliseconds of engines running at ``speed`` (engine seconds per real second).

    One engine with room for every block stands for one infinite cache shared by the pool;
    each request is run to its first token before the next is added, so nothing queues.
    Hits follow the engine's own rules (whole blocks, the last prompt token recomputed),
    so the hit ratio is on the workers' counters' scale.
    """
    blocks = sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // engine.block_size) for r in workload.requests)
    infinite = Engine(dataclasses.replace(engine, capacity_blocks=max(blocks, 1)))
    ttfts: list[float] = []
    now = 0.0
    for request in sorted(workload.requests, key=lambda r: r.arrival_s):
        try:
            sim = infinite.add_request(request.request_id, list(request.prompt_token_ids), 1, now)
        except RequestRejected:
            continue
        while sim.first_token_time is None:
            start = infinite.next_step_time()
            if start is None:
                break
            now = infinite.step(max(start, now)).end
        if sim.ttft is not None:
            ttfts.append(sim.ttft)
        now += 1.0  # idle between requests: the next one finds the engine free
    metrics = infinite.metrics
    ms = np.asarray(ttfts) * 1000.0 / speed
    return {
        "requests": len(ttfts),
        "ttft_ms": {
            "p50": float(np.percentile(ms, 50)) if ttfts else None,
            "p99": float(np.percentile(ms, 99)) if ttfts else None,
        },
        "hit_ratio": metrics.prefix_cache_hits / metrics.prefix_cache_queries
        if metrics.prefix_cache_queries
        else None,
    }


def prompt_stats(workload: Workload) -> dict[str, float]:
    """Prompt sizes, and what tokenising one costs here with the tokenizer ``kvsched serve``
    loads (CPU time in this process): whole, as a router that tokenises each text prompt pays
    it, and as kvsched's routing pays it (the pieces of earlier prompts reused, the prompts in
    arrival order)."""
    from scheduler.adapters.tokenizer import HFTokenizer
    from scheduler.sim.tokenizer import MODEL_DIR

    tokenizer = HFTokenizer.from_dir(MODEL_DIR)
    whole, routed = [], []
    for request in workload.requests[:300]:
        text = request.prompt_text or ""
        started = time.process_time()
        tokenizer.encode(text, True)
        middle = time.process_time()
        tokenizer.pieces.ids(text, add_special_tokens=True)
        whole.append((middle - started) * 1e3)
        routed.append((time.process_time() - middle) * 1e3)
    lengths = [len(r.prompt_token_ids) for r in workload.requests]
    return {
        "prompt_tokens_mean": float(np.mean(lengths)) if lengths else 0.0,
        "prompt_tokens_max": float(max(lengths, default=0)),
        "tokenize_cpu_ms_p50": float(np.percentile(whole, 50)) if whole else 0.0,
        "tokenize_routed_cpu_ms_mean": float(np.mean(routed)) if routed else 0.0,
        "tokenize_whole_cpu_ms_mean": float(np.mean(whole)) if whole else 0.0,
    }
