"""Everything kvsched watches in Kubernetes, started and stopped together.

The InferencePool source feeds endpoint sets to the serving process like any
``EndpointSource``; the SchedulingPolicy watcher applies the served pools' policy through a
``PolicyTarget``; the InferenceObjective watcher replaces the Scheduler's objective table.
All of it shares one ``KubeClient`` (one connection pool, one set of credentials).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from scheduler.adapters.discovery import EndpointDefaults
from scheduler.adapters.kubernetes.client import KubeClient, ResourceType
from scheduler.adapters.kubernetes.objectives import InferenceObjectiveWatcher
from scheduler.adapters.kubernetes.policy import PolicyTarget, SchedulingPolicyWatcher
from scheduler.adapters.kubernetes.pools import POOL_V1, InferencePoolSource
from scheduler.adapters.kubernetes.reflector import Backoff
from scheduler.core.objectives import ObjectiveTable


class KubernetesDiscovery:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pools: Sequence[str],
        defaults: EndpointDefaults,
        *,
        pool_resource: ResourceType = POOL_V1,
        policy_target: PolicyTarget | None = None,
        set_objectives: Callable[[ObjectiveTable], None] | None = None,
        objective_api_versions: Sequence[str] | None = None,
        backoff: Backoff | None = None,
        watch_timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.pools = tuple(pools)
        self.source = InferencePoolSource(
            client,
            namespace,
            pools,
            defaults,
            pool_resource=pool_resource,
            backoff=backoff,
            watch_timeout_s=watch_timeout_s,
        )
        self.policies = (
            None
            if policy_target is None
            else SchedulingPolicyWatcher(
                client,
                namespace,
                pools,
                policy_target,
                pool_group=pool_resource.group,
                backoff=backoff,
                watch_timeout_s=watch_timeout_s,
            )
        )
        objective_options = {} if objective_api_versions is None else {"api_versions": objective_api_versions}
        self.objectives = (
            None
            if set_objectives is None
            else InferenceObjectiveWatcher(
                client,
                namespace,
                pools,
                set_objectives,
                backoff=backoff,
                watch_timeout_s=watch_timeout_s,
                **objective_options,
            )
        )

    def start(self) -> None:
        """Start every watch (each in its thread); results arrive on the running loop."""
        self.source.start()
        if self.policies is not None:
            self.policies.start()
        if self.objectives is not None:
            self.objectives.start()

    async def stop(self) -> None:
        stops = [self.source.stop()]
        if self.policies is not None:
            stops.append(self.policies.stop())
        if self.objectives is not None:
            stops.append(self.objectives.stop())
        await asyncio.gather(*stops)
        await asyncio.to_thread(self.client.close)
