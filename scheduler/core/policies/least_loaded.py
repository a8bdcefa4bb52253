"""``least_loaded``: fewest requests ahead (scraped waiting + kvsched's in-flight), blind to cache.

Ties go to fewer in-flight prefill tokens, then to the name. The "shortest queue" half of
SGLang's cache-aware router (``prefix_balance``), on its own.
"""

from __future__ import annotations

from scheduler.core.policies.base import OrderingPolicy, PolicyInput, by_load
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import EndpointState


class LeastLoaded(OrderingPolicy):
    def order(self, candidates: list[EndpointState], data: PolicyInput) -> list[str]:
        return by_load(candidates)


register_policy("least_loaded", LeastLoaded, description="Fewest requests ahead, blind to the cache.")
