"""Prefill/decode disaggregation: pod roles, and the settings that turn it on.

A disaggregated pool runs prefill pods, which compute a prompt's KV cache and hand it over,
and decode pods, which receive it and generate the output. Roles come from the pod label
llm-d uses, with llm-d's rules (llm-d/llm-d-inference-scheduler ``pkg/plugins/filter/pd_role.go``):
label ``llm-d.ai/role``; prefill candidates carry ``prefill``, ``both`` or ``prefill-decode``
(an unlabelled pod is never a prefill pod); decode candidates carry ``decode``, ``both`` or
``prefill-decode``, or no label at all. The Scheduler picks a decode pod among the decode
candidates with decode weights (requests running there, free KV cache) and a prefill pod among
the prefill candidates with the pipeline's own weights (cache overlap, prefill queue), through
the one scoring pipeline either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.core.scoring.config import ScorerWeights

__all__ = [
    "ROLE_LABEL",
    "DisaggregationConfig",
    "dedicated_prefill",
    "serves_decode",
    "serves_prefill",
]

ROLE_LABEL = "llm-d.ai/role"
_PREFILL_ROLES = frozenset({"prefill", "both", "prefill-decode"})
_DECODE_ROLES = frozenset({"decode", "both", "prefill-decode"})


def serves_prefill(labels: Mapping[str, str]) -> bool:
    """A prefill candidate: labelled prefill, both or prefill-decode."""
    return labels.get(ROLE_LABEL) in _PREFILL_ROLES


def serves_decode(labels: Mapping[str, str]) -> bool:
    """A decode candidate: labelled decode, both or prefill-decode, or not labelled."""
    role = labels.get(ROLE_LABEL)
    return role is None or role in _DECODE_ROLES


def dedicated_prefill(labels: Mapping[str, str]) -> bool:
    """Labelled prefill only: its presence makes a pool disaggregated."""
    return labels.get(ROLE_LABEL) == "prefill"


class DisaggregationConfig(BaseModel):
    """When a request gets a prefill pod of its own, and how its decode pod is scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False,
        description="Give requests a prefill pod and a decode pod when the pool has pods labelled "
        f"{ROLE_LABEL}=prefill; off, or with no such pod, every pod serves a request whole.",
    )
    # llm-d's prefix-based P/D decider defaults nonCachedTokens to 0, i.e. always disaggregate
    # (llm-d/llm-d-inference-scheduler pkg/plugins/profile/prefix_based_pd_decider.go,
    # PrefixBasedPDDeciderPluginFactory); kvsched keeps that default.
    non_cached_tokens_threshold: int = Field(
        0,
        ge=0,
        description="A prompt with fewer tokens than this not cached on its decode pod skips the "
        "prefill pod (the decode pod computes it itself); 0: every request uses a prefill pod. "
        "llm-d's prefix-based-pd-decider nonCachedTokens, same default.",
    )
    decode_weights: ScorerWeights = Field(
        default_factory=lambda: ScorerWeights.only(queue_depth=1.0, kv_utilization=1.0),
        description="Scorer weights of the decode pod's pick: by default requests running or "
        "waiting there (queue_depth) and free KV cache (kv_utilization) only, since the prompt's "
        "KV arrives from the prefill pod. Scorers left out weigh 0 here, not their defaults.",
    )

    @field_validator("decode_weights", mode="before")
    @classmethod
    def _others_off(cls, value: Any) -> Any:
        # A decode pick weighs only what it is told to: a prefix or prefill-queue weight there
        # would pull decodes towards the prompt's cache, which the prefill pod already used.
        if isinstance(value, Mapping) and not isinstance(value, ScorerWeights):
            return ScorerWeights.only(**{str(name): float(weight) for name, weight in value.items()})
        return value
