"""The infinite-cache ceiling: the share of prompt blocks already seen, as the same whole
prefix, in any earlier request. No router can hit more than this."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.workloads.model import WorkloadRequest


def oracle_hit_ratio(requests: Sequence[WorkloadRequest], block_tokens: int) -> float:
    """Blocks are ``block_tokens`` long; a trailing partial block counts as a block of its
    own (its identity is its tokens), which is how Mooncake's hash ids count them."""
    seen: set[int] = set()
    hits = total = 0
    for request in sorted(requests, key=lambda r: r.arrival_s):
        tokens = request.prompt_token_ids
        key = 0
        prefix_alive = True
        for start in range(0, len(tokens), block_tokens):
            key = hash((key, tuple(tokens[start : start + block_tokens])))
            total += 1
            if prefix_alive and key in seen:
                hits += 1
            else:
                prefix_alive = False
            seen.add(key)
    return hits / total if total else 0.0


def pooled_lru_hit_ratio(
    requests: Sequence[WorkloadRequest], block_tokens: int, capacity_blocks: int
) -> float:
    """Hit ratio of one LRU cache holding the whole pool's capacity: the ceiling for any
    router over workers whose caches add up to ``capacity_blocks`` (a router can at best
    make the pool behave like one shared cache)."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for request in sorted(requests, key=lambda r: r.arrival_s):
        tokens = request.prompt_token_ids
        keys = []
        key = 0
        for start in range(0, len(tokens), block_tokens):
            key = hash((key, tuple(tokens[start : start + block_tokens])))
            keys.append(key)
        matched = 0
        for key in keys:
            if key not in cache:
                break
            matched += 1
        hits += matched
        total += len(keys)
        for key in keys:
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hits / total if total else 0.0
