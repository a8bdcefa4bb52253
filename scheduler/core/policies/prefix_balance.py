"""``prefix_balance``: SGLang's cache-aware router, over kvsched's prefix index.

Follows sgl-router's ``CacheAwarePolicy.select_worker`` (sgl-project/sglang,
``sgl-router/src/policies/cache_aware.rs``, commit 026f853b) with the router's defaults
(``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5):

1. load imbalanced (max - min > 64 and max > 1.5 x min, load = requests ahead): the least
   loaded;
2. else the longest prefix match, when it covers more than 30% of the prompt;
3. else the endpoint with the most free cache: the fewest blocks in the index (SGLang's
   "smallest tree").

SGLang matches characters in an approximate tree of the requests it routed; here the match
is kvsched's block-level index of what the engines report caching. Fallbacks are the others,
least loaded first.
"""

from __future__ import annotations

from scheduler.core.policies.base import OrderingPolicy, PolicyInput, by_load, requests_ahead
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import EndpointState

SGLANG_CACHE_THRESHOLD = 0.3
SGLANG_BALANCE_ABS_THRESHOLD = 64
SGLANG_BALANCE_REL_THRESHOLD = 1.5


class PrefixBalance(OrderingPolicy):
    def order(self, candidates: list[EndpointState], data: PolicyInput) -> list[str]:
        least_loaded = by_load(candidates)
        loads = [requests_ahead(s) for s in candidates]
        high, low = max(loads), min(loads)
        if high - low > SGLANG_BALANCE_ABS_THRESHOLD and high > SGLANG_BALANCE_REL_THRESHOLD * low:
            return least_loaded
        best = max(candidates, key=lambda s: (_matched(data, s.name), -requests_ahead(s), s.name))
        prompt_blocks = data.request.prompt_blocks
        if prompt_blocks and _matched(data, best.name) / prompt_blocks > SGLANG_CACHE_THRESHOLD:
            primary = best.name
        else:
            primary = min(
                candidates, key=lambda s: (data.cached_blocks(s.name), requests_ahead(s), s.name)
            ).name
        return [primary] + [name for name in least_loaded if name != primary]


def _matched(data: PolicyInput, name: str) -> int:
    match = data.matches.get(name)
    return match.total_blocks if match else 0


register_policy(
    "prefix_balance",
    PrefixBalance,
    description="SGLang's cache-aware router: longest prefix unless load is imbalanced.",
)
