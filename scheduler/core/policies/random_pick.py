"""``random``: a uniformly random order of the healthy endpoints, blind to cache and load.

Drawn from the Scheduler's seeded rng (a shuffle of the names in sorted order), so a
simulation replays identically for one seed.
"""

from __future__ import annotations

from scheduler.core.policies.base import OrderingPolicy, PolicyInput
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import EndpointState


class RandomPick(OrderingPolicy):
    def order(self, candidates: list[EndpointState], data: PolicyInput) -> list[str]:
        names = sorted(s.name for s in candidates)
        data.rng.shuffle(names)
        return names


register_policy("random", RandomPick, description="A uniformly random endpoint.")
