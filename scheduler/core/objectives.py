"""Inference objectives: the per-workload priority and latency targets a request names.

A request selects an objective by name (the ``x-llm-d-inference-objective`` header); the
objective supplies its priority (negative = sheddable under saturation) and default SLOs
that the request's own SLO headers override. The table is replaced whole whenever its
source changes (the Kubernetes InferenceObjective watch, or static configuration), so a
pick always reads one consistent version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Objective:
    name: str
    priority: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # The InferencePool (namespace/name) the objective belongs to; None: any pool.
    pool: str | None = None

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


DEFAULT_OBJECTIVE = Objective(name="")


@dataclass(frozen=True, slots=True)
class ResolvedObjective:
    """What one request is held to: its priority and SLOs after header overrides."""

    name: str
    priority: int
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    known: bool  # the named objective exists (False: unknown name or none given)
    pool: str | None = None  # the InferencePool ("namespace/name") the objective belongs to

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(frozen=True, slots=True)
class ObjectiveTable:
    """Objectives by name; unknown names resolve to the default (priority 0, no SLOs)."""

    objectives: Mapping[str, Objective] = field(default_factory=dict)
    default: Objective = DEFAULT_OBJECTIVE

    @classmethod
    def of(cls, objectives: Iterable[Objective], default: Objective = DEFAULT_OBJECTIVE) -> ObjectiveTable:
        return cls({objective.name: objective for objective in objectives}, default)

    def resolve(
        self,
        name: str | None,
        slo_ttft_ms: float | None = None,
        slo_tpot_ms: float | None = None,
    ) -> ResolvedObjective:
        objective = self.objectives.get(name) if name else None
        base = objective if objective is not None else self.default
        return ResolvedObjective(
            name=name or "",
            priority=base.priority,
            slo_ttft_ms=slo_ttft_ms if slo_ttft_ms is not None else base.slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms if slo_tpot_ms is not None else base.slo_tpot_ms,
            known=objective is not None,
            pool=base.pool,
        )
