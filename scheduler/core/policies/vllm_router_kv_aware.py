"""``vllm_router_kv_aware``: vllm-router's ``kv_aware`` policy, from KV events.

Follows vllm-project/router ``src/policies/kv_aware.rs`` (``KvAwarePolicy``, commit 71af9941)
with ``src/kv_index/scorer.rs`` and ``src/kv_index/index.rs`` (commit 2ec0ff0c), and
``KvAwareConfig::default`` (``enable_speculative`` true, ``speculative_ttl`` 2 s):

1. one healthy worker: that one;
2. a prompt shorter than one full block: the least loaded (``min_by_key(load)``: the first
   of the least loaded, in worker order);
3. otherwise each worker's score is the number of leading prompt blocks it holds without a
   gap (``PrefixScorer``), counting speculative entries that have not expired; the best is
   ``max_by_key(score)``, which in Rust returns the *last* of equal maxima in worker order;
   when that best score is 0 (no worker holds the first block) the least loaded instead;
4. speculative indexing: the blocks from the best score on are recorded as held by the
   chosen worker for 2 s, so requests with the same prefix that arrive before its KV events
   follow it; an entry is not added where the worker already holds the block, and adding
   one again restarts its 2 s.

A worker's ``load`` is the router's count of requests it sent there that have not finished:
kvsched's in-flight count (this Scheduler routes by this policy alone). There are no
thresholds: cache hits win outright, load decides only when no worker holds the first
block. Block presence is kvsched's index (longest prefix per worker); a speculative entry
extends it from its end. The router's own index would also remove a speculative entry on
a ``BlockRemoved`` for that worker; here it lives out its 2 s. Fallbacks after the chosen
worker: the rest by load.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from scheduler.core.policies.base import (
    NO_HEALTHY_ENDPOINT,
    Explanation,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
    eligible,
)
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import NO_ELIGIBLE_IN_SUBSET, EndpointState

VLLM_ROUTER_SPECULATIVE_TTL_S = 2.0


def first_least_loaded(candidates: Sequence[EndpointState]) -> int:
    """Rust's ``min_by_key``: the first of the minima."""
    loads = [s.inflight_requests for s in candidates]
    return loads.index(min(loads))


def last_best(scores: Sequence[int]) -> int:
    """Rust's ``max_by_key``: the last of the maxima."""
    best = max(scores)
    return len(scores) - 1 - list(reversed(scores)).index(best)


class VllmRouterKVAware(RoutingPolicy):
    def __init__(self, setup: PolicySetup, speculative_ttl_s: float = VLLM_ROUTER_SPECULATIVE_TTL_S) -> None:
        self.ttl_s = speculative_ttl_s
        self._speculative: dict[str, dict[int, float]] = {}  # worker -> block key -> expires at
        self._expiries: deque[tuple[float, str, list[int]]] = deque()  # insertion order = expiry order

    def score(self, name: str, keys: list[int], data: PolicyInput) -> int:
        match = data.matches.get(name)
        held = match.total_blocks if match is not None else 0
        speculative = self._speculative.get(name)
        if speculative:
            now = data.now
            while held < len(keys) and speculative.get(keys[held], -1.0) >= now:
                held += 1
        return held

    def route(self, data: PolicyInput) -> Routing:
        candidates = eligible(data.endpoints, data.request.subset)
        if not candidates:
            reason = NO_ELIGIBLE_IN_SUBSET if data.request.subset is not None else NO_HEALTHY_ENDPOINT
            return Routing([], reason, {"policy": "vllm_router_kv_aware"})
        self._expire(data.now)
        keys = [int(key) for key in data.block_keys]
        scores: list[int] = []
        if len(candidates) == 1:
            chosen, why = 0, "single worker"
        elif not keys:
            chosen, why = first_least_loaded(candidates), "prompt under one block: least load"
        else:
            scores = [self.score(s.name, keys, data) for s in candidates]
            best = last_best(scores)
            if scores[best] == 0:
                chosen, why = first_least_loaded(candidates), "no cache hits: least load"
            else:
                chosen, why = best, "longest prefix"
            if scores[best] < len(keys):
                self._insert(candidates[chosen].name, keys[scores[best] :], data)
        primary = candidates[chosen]
        rest = sorted((s for s in candidates if s is not primary), key=lambda s: s.inflight_requests)
        order = [s.name for s in [primary, *rest]][: data.wanted]
        explanation: Explanation = {"policy": "vllm_router_kv_aware", "why": why, "order": order}
        if scores:
            explanation["prefix_blocks"] = dict(zip([s.name for s in candidates], scores, strict=True))
        return Routing(order, "", explanation)

    def _insert(self, name: str, keys: list[int], data: PolicyInput) -> None:
        """``KVBlockIndex::speculative_insert`` for the blocks the worker does not hold yet."""
        match = data.matches.get(name)
        real = match.total_blocks if match is not None else 0
        expires_at = data.now + self.ttl_s
        entries = self._speculative.setdefault(name, {})
        # Keys before the worker's real prefix are held for real: no speculative entry there.
        start = max(real - (len(data.block_keys) - len(keys)), 0)
        added = keys[start:]
        for key in added:
            entries[key] = expires_at
        if added:
            self._expiries.append((expires_at, name, added))

    def _expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] < now:
            expires_at, name, keys = expiries.popleft()
            entries = self._speculative[name]
            for key in keys:
                # A later insert refreshed it: that one expires later.
                if entries.get(key) == expires_at:
                    del entries[key]


register_policy(
    "vllm_router_kv_aware",
    VllmRouterKVAware,
    description="vllm-router's kv_aware: longest cached prefix from KV events, else least load.",
)
