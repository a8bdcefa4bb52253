"""Tuned settings as a SchedulingPolicy (``kvsched.io/v1alpha1``) ready for ``kubectl apply``,
and the current policy read from a SchedulingPolicy or a ``kvsched serve`` configuration.

The written spec goes back through the same conversion kvsched applies to a policy in the
cluster (``PolicySettings``), and the configuration it yields is the one measured on the
held-out window: what is applied is what was measured, rounding included.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from scheduler.adapters.kubernetes.policy import SCHEDULING_POLICY, PolicyError, PolicySettings
from scheduler.core.scheduler import SchedulerConfig

API_VERSION = SCHEDULING_POLICY.api_version


def manifest(
    spec: Mapping[str, Any], *, name: str, pool: str, namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": SCHEDULING_POLICY.kind,
        "metadata": metadata,
        "spec": {"poolRef": {"name": pool}, **spec},
    }


def applied(spec: Mapping[str, Any], base: SchedulerConfig) -> SchedulerConfig:
    """What kvsched runs with once this spec is applied over ``base`` (PolicyError if refused)."""
    return PolicySettings.from_spec(spec, "kvsched tune").scheduler_config(base)


def render(document: Mapping[str, Any], header: str = "") -> str:
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + yaml.safe_dump(dict(document), sort_keys=False)


def current_config(path: str | Path | None) -> tuple[SchedulerConfig, str]:
    """The policy to beat: kvsched's defaults, a SchedulingPolicy manifest, or the ``scheduler``
    section of a ``kvsched serve`` configuration file; and a one-line description of it."""
    if path is None:
        return SchedulerConfig(), "kvsched's defaults"
    from scheduler.server.config import ConfigError, load_config, read_config_file

    data = read_config_file(path)
    if data.get("kind") == SCHEDULING_POLICY.kind:
        spec = dict(data.get("spec") or {})
        spec.pop("kvEvents", None)  # the index layout is the pool's, not a tuning matter
        try:
            return applied(spec, SchedulerConfig()), f"SchedulingPolicy {path}"
        except PolicyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return load_config(path).scheduler, f"the scheduler section of {path}"
