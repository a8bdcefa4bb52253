"""``round_robin``: each request to the next endpoint in name order, blind to cache and load.

The classic baseline (sgl-router ``sgl-router/src/policies/round_robin.rs`` and Dynamo's
``--router-mode round-robin`` do the same): a counter over the healthy endpoints, sorted by
name so that the order does not depend on discovery order. Fallbacks follow the primary in
the same cycle.
"""

from __future__ import annotations

from scheduler.core.policies.base import OrderingPolicy, PolicyInput, PolicySetup
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import EndpointState


class RoundRobin(OrderingPolicy):
    def __init__(self, setup: PolicySetup) -> None:
        super().__init__(setup)
        self._next = 0  # requests routed so far: the next one starts this far into the cycle

    def order(self, candidates: list[EndpointState], data: PolicyInput) -> list[str]:
        names = sorted(s.name for s in candidates)
        start = self._next % len(names)
        self._next += 1
        return names[start:] + names[:start]


register_policy("round_robin", RoundRobin, description="Each request to the next endpoint by name.")
