"""The policy registry: every routing policy ``SchedulerConfig.policy`` can name.

Adding a policy (a peer's algorithm, an ablation) is one module under
``scheduler/core/policies/`` (the package imports every module in it) with a
``RoutingPolicy`` subclass and one line::

    register_policy("least_loaded", LeastLoaded, description="Fewest requests ahead.")

The module's docstring cites the source it follows (repository, file, version) and that
source's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.core.policies.base import PolicySetup, RoutingPolicy
from scheduler.core.registry import Registry


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str  # snake_case; what SchedulerConfig.policy and --policy name
    factory: Callable[[PolicySetup], RoutingPolicy]  # builds the one instance a Scheduler uses
    description: str  # one line, for listings


POLICIES: Registry[PolicySpec] = Registry("policy")


def register_policy(
    name: str, factory: Callable[[PolicySetup], RoutingPolicy], *, description: str
) -> PolicySpec:
    """Register a routing policy under ``name``; a name registered before is refused."""
    if not description or "\n" in description:
        raise ValueError(f"policy {name!r}: the description must be one line")
    return POLICIES.add(PolicySpec(name, factory, description))


def create_policy(setup: PolicySetup) -> RoutingPolicy:
    """The policy registered as ``setup.name``, built for ``setup``."""
    return POLICIES[setup.name].factory(setup)
