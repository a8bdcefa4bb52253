"""Ceilings for prefix-cache hit ratios: what no router can beat.

A block's identity is its whole prefix (the chained identity vLLM's block hashes and
Mooncake's hash ids both have): block ``i`` of a request matches an earlier block only
when blocks ``0..i`` all match.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from scheduler.workloads.model import WorkloadRequest


def prefix_block_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """One key per full block of ``block_size`` tokens, each standing for the whole prefix up
    to and including that block. A trailing partial block has none: engines cache full blocks only."""
    if block_size < 1:
        raise ValueError("block_size must be positive")
    keys: list[int] = []
    key = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        # hash() of a tuple of ints is deterministic (no per-process salt, unlike str).
        key = hash((key, tuple(tokens[start : start + block_size])))
        keys.append(key)
    return keys


def _in_arrival_order(requests: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
    return sorted(requests, key=lambda r: r.arrival_s)


def _seen_share(chains: Iterable[Sequence[int]]) -> float:
    seen: set[int] = set()
    hits = total = 0
    for keys in chains:
        total += len(keys)
        for key in keys:
            # Keys are chained, so a seen key implies its whole prefix was seen too.
            if key not in seen:
                break
            hits += 1
        seen.update(keys)
    return hits / total if total else 0.0


def oracle_hit_ratio(requests: Sequence[WorkloadRequest], block_size: int) -> float:
    """The infinite-cache hit ratio: the share of full prompt blocks of ``block_size`` tokens
    whose whole prefix already appeared in an earlier request (by arrival). A ceiling for the
    token hit ratio (cached prompt tokens / prompt tokens) of any router over any cache."""
    return _seen_share(prefix_block_keys(r.prompt_token_ids, block_size) for r in _in_arrival_order(requests))


def trace_oracle_hit_ratio(requests: Sequence[WorkloadRequest]) -> float:
    """The same ceiling at the source trace's granularity: the share of trace blocks (Mooncake
    hash ids, a trailing partial block included) already seen. This is how the published
    Mooncake figures count (0.366 conversation, 0.640 synthetic)."""
    chains: list[Sequence[int]] = []
    for request in _in_arrival_order(requests):
        if request.block_ids is None:
            raise ValueError(f"request {request.request_id} has no trace block ids")
        chains.append(request.block_ids)
    return _seen_share(chains)


def workload_ceilings(requests: Sequence[WorkloadRequest], block_size: int) -> dict[str, float]:
    """Report keys for a workload's ceilings: ``oracle_hit_ratio`` at ``block_size`` tokens and,
    for a trace whose every request carries block ids, ``trace_oracle_hit_ratio``."""
    ceilings = {"oracle_hit_ratio": oracle_hit_ratio(requests, block_size)}
    if requests and all(r.block_ids is not None for r in requests):
        ceilings["trace_oracle_hit_ratio"] = trace_oracle_hit_ratio(requests)
    return ceilings


def pooled_lru_hits(requests: Sequence[WorkloadRequest], block_size: int, capacity_blocks: int) -> list[int]:
    """Per request (in the order given), the full blocks one LRU cache holding the whole
    pool's capacity would have served from cache: every prompt, in arrival order, hits its
    leading cached blocks and then is cached whole, least recently used blocks evicted."""
    cache: OrderedDict[int, None] = OrderedDict()
    position = {id(request): i for i, request in enumerate(requests)}
    hits = [0] * len(requests)
    for request in _in_arrival_order(requests):
        keys = prefix_block_keys(request.prompt_token_ids, block_size)
        hit = 0
        for key in keys:
            if key not in cache:
                break
            hit += 1
        hits[position[id(request)]] = hit
        for key in keys:
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hits


def pooled_lru_hit_ratio(requests: Sequence[WorkloadRequest], block_size: int, capacity_blocks: int) -> float:
    """Hit ratio (share of full blocks) of one LRU cache holding the whole pool's capacity:
    the ceiling for any router over workers whose caches add up to ``capacity_blocks`` (a
    router can at best make the pool behave like one shared cache)."""
    total = sum(len(r.prompt_token_ids) // block_size for r in requests)
    return sum(pooled_lru_hits(requests, block_size, capacity_blocks)) / total if total else 0.0
