"""Routing policies, by name: kvsched's own scoring pipeline and the policies it is compared with.

One module per policy, each registering itself (``register_policy``). Importing this package
imports every module in it but ``base`` and ``registry``, so a new policy is one file here
(and its test), with no list to edit: ``kvsched`` first, the rest by module name.
``SchedulerConfig.policy`` names one.
"""

import importlib
import pkgutil

from scheduler.core.policies.base import (
    OrderingPolicy,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
)
from scheduler.core.policies.registry import POLICIES, PolicySpec, create_policy, register_policy

DEFAULT_POLICY = "kvsched"
_NOT_POLICIES = frozenset({"base", "registry"})


def _import_policy_modules() -> None:
    names = [module.name for module in pkgutil.iter_modules(__path__) if module.name not in _NOT_POLICIES]
    for name in sorted(names, key=lambda name: (name != DEFAULT_POLICY, name)):
        importlib.import_module(f"{__name__}.{name}")


_import_policy_modules()

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "OrderingPolicy",
    "PolicyInput",
    "PolicySetup",
    "PolicySpec",
    "Routing",
    "RoutingPolicy",
    "create_policy",
    "register_policy",
]
