"""``discovery.kubernetes`` of the ``kvsched serve`` configuration file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PoolAPIVersion = Literal["inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2"]
ObjectiveAPIVersion = Literal["llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"]


def _both_objective_apis() -> list[ObjectiveAPIVersion]:
    return ["llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"]


class KubernetesDiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(
        None,
        description="Namespace of the pools, pods, policies and objectives; unset = pool.namespace, "
        "else $POD_NAMESPACE, else the service account's namespace.",
    )
    pools: list[str] = Field(
        default_factory=list,
        description="InferencePools to serve, by name; unset = [pool.name]. The first one's "
        "SchedulingPolicy wins when several pools have one.",
    )
    pool_api_version: PoolAPIVersion | None = Field(
        None,
        description="InferencePool API to watch; unset = pool.group's "
        "(default inference.networking.k8s.io/v1).",
    )
    api_server: str | None = Field(
        None,
        description="API server URL; unset = from the in-cluster service account or the kubeconfig.",
    )
    kubeconfig: str | None = Field(
        None, description="kubeconfig file; unset = $KUBECONFIG or ~/.kube/config."
    )
    context: str | None = Field(None, description="kubeconfig context; unset = its current context.")
    in_cluster: bool | None = Field(
        None,
        description="Use the pod's service account; unset = when running in a pod and neither "
        "kubeconfig nor api_server is set.",
    )
    policies: bool = Field(
        True, description="Apply the served pools' SchedulingPolicy (kvsched.io/v1alpha1)."
    )
    objectives: bool = Field(True, description="Read priorities from the served pools' InferenceObjectives.")
    objective_api_versions: list[ObjectiveAPIVersion] = Field(
        default_factory=_both_objective_apis,
        description="InferenceObjective APIs to watch; an object in the first wins over a namesake "
        "in the next.",
    )
    watch_timeout_s: float = Field(
        300.0,
        ge=1,
        le=3600,
        description="Server-side timeout of each watch (each picks at random up to twice this).",
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, le=60, description="First retry delay after a failed list or watch."
    )
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="Longest retry delay (doubling, jittered).")

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, value: list[str]) -> list[str]:
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"pools named twice: {', '.join(duplicates)}")
        if any(not name for name in value):
            raise ValueError("a pool name is empty")
        return value
