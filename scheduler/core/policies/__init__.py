"""Routing policies, by name: kvsched's own scoring pipeline and the policies it is compared with.

One module per policy, each registering itself (``register_policy``); importing this package
registers them all, in the order listings show them. ``SchedulerConfig.policy`` names one.
"""

from scheduler.core.policies.base import (
    OrderingPolicy,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
)
from scheduler.core.policies.registry import POLICIES, PolicySpec, create_policy, register_policy

# The built-in policies register themselves on import, in the order listings show them.
# isort: off
from scheduler.core.policies import kvsched
from scheduler.core.policies import round_robin, random_pick, least_loaded, prefix_balance
from scheduler.core.policies import queue_only, cache_only

# isort: on

DEFAULT_POLICY = "kvsched"

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "OrderingPolicy",
    "PolicyInput",
    "PolicySetup",
    "PolicySpec",
    "Routing",
    "RoutingPolicy",
    "cache_only",
    "create_policy",
    "kvsched",
    "least_loaded",
    "prefix_balance",
    "queue_only",
    "random_pick",
    "register_policy",
    "round_robin",
]
