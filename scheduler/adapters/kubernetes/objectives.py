"""InferenceObjective watch: the priorities requests name in ``x-llm-d-inference-objective``.

InferenceObjective moved from ``inference.networking.x-k8s.io/v1alpha2`` to
``llm-d.ai/v1alpha2`` (shared PROTOCOLS.md §4); clusters may serve either or both, so both are
watched (a group whose CRD is not installed is retried quietly). Fields: ``spec.priority``
(int, negative = sheddable; absent = 0) and ``spec.poolRef`` (name, group). Objectives of
pools this kvsched does not serve are ignored. A name present in both groups takes the
``llm-d.ai`` object, the newer API. The table is rebuilt whole on any change and handed to
``Scheduler.set_objectives``, so a pick reads one consistent version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scheduler.adapters.kubernetes.client import KubeClient, ResourceType
from scheduler.adapters.kubernetes.reflector import Backoff, Reflector, Snapshot
from scheduler.core.objectives import Objective, ObjectiveTable

log = logging.getLogger(__name__)

OBJECTIVE_LLMD = ResourceType("llm-d.ai", "v1alpha2", "inferenceobjectives", "InferenceObjective")
OBJECTIVE_X_K8S = ResourceType(
    "inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives", "InferenceObjective"
)
# In order of preference when one name exists in several groups.
OBJECTIVE_RESOURCES = {resource.api_version: resource for resource in (OBJECTIVE_LLMD, OBJECTIVE_X_K8S)}


def parse_objective(obj: Mapping[str, Any], pools: Sequence[str]) -> Objective | None:
    """The objective, or None when it belongs to no served pool or is unusable (logged)."""
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    name = str(metadata.get("name", ""))
    ref = spec.get("poolRef") or {}
    pool = ref.get("name") if isinstance(ref, Mapping) else None
    if pool not in pools:
        return None
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        log.warning("InferenceObjective %s: spec.priority %r is not an integer; ignored", name, priority)
        return None
    return Objective(name=name, priority=priority, pool=f"{metadata.get('namespace', '')}/{pool}")


def objective_table(snapshots: Sequence[Snapshot], pools: Sequence[str]) -> ObjectiveTable:
    """One table from the snapshots of each group, the preferred group first."""
    found: dict[str, Objective] = {}
    for snapshot in snapshots:
        for key in sorted(snapshot):
            objective = parse_objective(snapshot[key], pools)
            if objective is not None:
                found.setdefault(objective.name, objective)
    return ObjectiveTable.of(found[name] for name in sorted(found))


class InferenceObjectiveWatcher:
    """Watches InferenceObjectives of the served pools and replaces the Scheduler's table."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pools: Sequence[str],
        set_objectives: Callable[[ObjectiveTable], None],
        *,
        api_versions: Sequence[str] = tuple(OBJECTIVE_RESOURCES),
        backoff: Backoff | None = None,
        watch_timeout_s: float | None = None,
    ) -> None:
        self.pools = tuple(pools)
        self.set_objectives = set_objectives
        options: dict[str, Any] = {"backoff": backoff}
        if watch_timeout_s is not None:
            options["watch_timeout_s"] = watch_timeout_s
        unknown = [version for version in api_versions if version not in OBJECTIVE_RESOURCES]
        if unknown:
            raise ValueError(f"unknown InferenceObjective API versions: {unknown}")
        self._snapshots: dict[str, Snapshot] = {}
        self.reflectors = [
            Reflector(client, OBJECTIVE_RESOURCES[version], namespace, self._on_change_of(version), **options)
            for version in api_versions
        ]
        self.order = list(api_versions)
        self.table: ObjectiveTable | None = None

    def start(self) -> None:
        for reflector in self.reflectors:
            reflector.start()

    async def stop(self) -> None:
        for reflector in self.reflectors:
            await reflector.stop()

    def _on_change_of(self, version: str) -> Callable[[Snapshot], None]:
        def on_change(snapshot: Snapshot) -> None:
            self._snapshots[version] = snapshot
            table = objective_table([self._snapshots.get(v, {}) for v in self.order], self.pools)
            if table != self.table:
                self.table = table
                self.set_objectives(table)
                log.info("inference objectives: %d", len(table.objectives))

        return on_change
