"""Prefix-index benchmark: ingest rate, lookup latency, hashing rate and memory per block.

The synthetic fleet mimics production prefix sharing: a few system prompts shared by
everyone, sessions that extend one of them with their own history, each session's
blocks cached on one to three workers. Events travel through the real wire codec
(encode once, then decode + apply is timed), and lookups hash a 512-block prompt that
shares a random-length prefix with an indexed session.

The same run measures the pure-Python reference (kernels' twin) on a smaller fleet, so
the native figures come with a baseline from the same machine and moment.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.codec.kvevents import decode_batch, encode_batch
from scheduler.core.events import BlockStored, EventBatch
from scheduler.core.index import Backend, IndexConfig, PrefixIndex

BLOCK_SIZE = 16
VOCAB = 128_000
ROOT_PROMPTS = 64
ROOT_BLOCKS = 32
EVENTS_PER_BATCH = 8


@dataclass(frozen=True, slots=True)
class Session:
    root: int
    tokens: np.ndarray  # the session's own blocks, flattened (root prefix excluded)
    hashes: np.ndarray  # engine hashes of those blocks


@dataclass(slots=True)
class Fleet:
    workers: int
    root_tokens: list[np.ndarray]
    root_hashes: list[np.ndarray]
    sessions: list[Session]
    placements: list[tuple[int, ...]]  # workers holding each session

    @property
    def unique_blocks(self) -> int:
        return ROOT_PROMPTS * ROOT_BLOCKS + sum(len(s.hashes) for s in self.sessions)


def build_fleet(workers: int, blocks: int, seed: int) -> Fleet:
    rng = np.random.default_rng(seed)
    counter = 0

    def take_hashes(n: int) -> np.ndarray:
        # Engine hashes: unique uint64s (splitmix64 of a counter), equal for equal content.
        nonlocal counter
        x = np.arange(counter + 1, counter + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        counter += n
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return x

    root_tokens = [rng.integers(1, VOCAB, size=ROOT_BLOCKS * BLOCK_SIZE) for _ in range(ROOT_PROMPTS)]
    root_hashes = [take_hashes(ROOT_BLOCKS) for _ in range(ROOT_PROMPTS)]
    sessions: list[Session] = []
    placements: list[tuple[int, ...]] = []
    # At least one session, so every fleet has prompts to look up beyond the shared roots.
    remaining = max(blocks - ROOT_PROMPTS * ROOT_BLOCKS, 64)
    while remaining > 0:
        length = min(remaining, int(rng.integers(64, 449)))
        sessions.append(
            Session(
                root=int(rng.integers(ROOT_PROMPTS)),
                tokens=rng.integers(1, VOCAB, size=length * BLOCK_SIZE),
                hashes=take_hashes(length),
            )
        )
        copies = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        placements.append(
            tuple(int(w) for w in rng.choice(workers, size=min(copies, workers), replace=False))
        )
        remaining -= length
    return Fleet(workers, root_tokens, root_hashes, sessions, placements)


def _events_for(fleet: Fleet, rng: np.random.Generator) -> Iterator[tuple[int, BlockStored]]:
    """(worker, event) pairs: roots first, then sessions in chunks of 1-64 blocks as prefill emits them."""
    for worker in range(fleet.workers):
        for tokens, hashes in zip(fleet.root_tokens, fleet.root_hashes, strict=True):
            yield worker, BlockStored(hashes.tolist(), None, tokens.tolist(), BLOCK_SIZE)
    for session, holders in zip(fleet.sessions, fleet.placements, strict=True):
        parent = int(fleet.root_hashes[session.root][-1])
        start = 0
        n = len(session.hashes)
        while start < n:
            size = min(n - start, int(rng.integers(1, 65)))
            hashes = session.hashes[start : start + size].tolist()
            tokens = session.tokens[start * BLOCK_SIZE : (start + size) * BLOCK_SIZE].tolist()
            for worker in holders:
                yield worker, BlockStored(hashes, parent, tokens, BLOCK_SIZE)
            parent = hashes[-1]
            start += size


def encode_fleet(fleet: Fleet, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """Wire payloads per worker, in publish order, and the number of block events they hold."""
    rng = np.random.default_rng(seed + 1)
    pending: dict[int, list[BlockStored]] = {}
    payloads: list[tuple[str, bytes]] = []
    block_events = 0
    for worker, event in _events_for(fleet, rng):
        block_events += len(event.block_hashes)
        queue = pending.setdefault(worker, [])
        queue.append(event)
        if len(queue) == EVENTS_PER_BATCH:
            payloads.append((f"worker-{worker}", encode_batch(EventBatch(0.0, list(queue), 0))))
            queue.clear()
    for worker, queue in pending.items():
        if queue:
            payloads.append((f"worker-{worker}", encode_batch(EventBatch(0.0, list(queue), 0))))
    return payloads, block_events


def make_queries(fleet: Fleet, prompt_blocks: int, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 2)
    queries = []
    for _ in range(count):
        session = fleet.sessions[int(rng.integers(len(fleet.sessions)))]
        shared = int(rng.integers(0, len(session.hashes) + 1))
        prefix = np.concatenate([fleet.root_tokens[session.root], session.tokens[: shared * BLOCK_SIZE]])
        prefix = prefix[: prompt_blocks * BLOCK_SIZE]
        fresh = rng.integers(1, VOCAB, size=prompt_blocks * BLOCK_SIZE - len(prefix))
        queries.append(np.concatenate([prefix, fresh]).tolist())
    return queries


def _percentile_us(samples_ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64), q)) / 1000.0


def measure(
    backend: Backend, workers: int, blocks: int, prompt_blocks: int, lookups: int, seed: int
) -> dict[str, Any]:
    fleet = build_fleet(workers, blocks, seed)
    payloads, block_events = encode_fleet(fleet, seed)
    queries = make_queries(fleet, prompt_blocks, lookups, seed)
    index = PrefixIndex(IndexConfig(block_size=BLOCK_SIZE, backend=backend, max_workers=max(workers, 1)))

    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for worker, payload in payloads:
            index.apply_batch(worker, decode_batch(payload).batch)
        ingest_s = time.perf_counter() - start

        lookup_ns: list[int] = []
        matched = 0
        for tokens in queries:
            t0 = time.perf_counter_ns()
            matches = index.match(index.request_keys(tokens))
            lookup_ns.append(time.perf_counter_ns() - t0)
            matched += max((m.total_blocks for m in matches.values()), default=0)

        start = time.perf_counter()
        for tokens in queries:
            np.asarray(index.request_keys(tokens))  # keys are hashed lazily: force all
        hash_s = time.perf_counter() - start
    finally:
        gc.enable()

    total_lookup_s = sum(lookup_ns) / 1e9
    return {
        "backend": backend,
        "workers": workers,
        "indexed_blocks": index.num_blocks,
        "block_events": block_events,
        "prompt_blocks": prompt_blocks,
        "lookups": len(queries),
        "events_per_s": block_events / ingest_s,
        "lookups_per_s": len(queries) / total_lookup_s,
        "lookup_p50_us": _percentile_us(lookup_ns, 50),
        "lookup_p99_us": _percentile_us(lookup_ns, 99),
        "hash_tokens_per_s": len(queries) * prompt_blocks * BLOCK_SIZE / hash_s,
        "bytes_per_block": index.bytes_per_block(),
        "mean_matched_blocks": matched / max(len(queries), 1),
    }


def run(
    workers: int, blocks: int, prompt_blocks: int, lookups: int, reference_blocks: int, seed: int
) -> dict[str, Any]:
    native = measure("native", workers, blocks, prompt_blocks, lookups, seed)
    reference = measure(
        "reference", workers, min(blocks, reference_blocks), prompt_blocks, max(lookups // 10, 50), seed
    )
    report = dict(native)
    report["reference"] = reference
    report["speedup_vs_reference"] = {
        "events": native["events_per_s"] / reference["events_per_s"],
        "lookups": native["lookups_per_s"] / reference["lookups_per_s"],
        "hash_tokens": native["hash_tokens_per_s"] / reference["hash_tokens_per_s"],
    }
    report["goals"] = {
        "lookup_p99_le_50us": native["lookup_p99_us"] <= 50.0,
        "events_per_s_ge_1M": native["events_per_s"] >= 1_000_000,
        "lookups_ge_20x_reference": report["speedup_vs_reference"]["lookups"] >= 20.0,
    }
    return report
