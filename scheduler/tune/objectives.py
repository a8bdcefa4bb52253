"""What ``kvsched tune`` optimises: a figure of a replay report and which way is better.

Latency objectives read ``objective_latency_ms`` (``evaluate.latency_with_failures``: a request
flow control refused counts as the worst TTFT); SLO objectives the report's attainment over all
requests and goodput. Kept free of the simulator's imports, so the command line can list the
names without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True, slots=True)
class Objective:
    name: str
    description: str
    direction: Direction
    needs_slo: bool
    value: Callable[[Mapping[str, Any]], float]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b

    def improvement(self, baseline: float, tuned: float) -> float:
        """Relative gain of ``tuned`` over ``baseline`` (positive: better), in the objective's sense."""
        if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(tuned):
            return 0.0 if baseline == tuned else (math.inf if self.better(tuned, baseline) else -math.inf)
        gain = (
            (baseline - tuned) / baseline if self.direction == "minimize" else (tuned - baseline) / baseline
        )
        return float(gain)


def _latency(key: str, percentile: str) -> Callable[[Mapping[str, Any]], float]:
    def value(report: Mapping[str, Any]) -> float:
        return float(report["objective_latency_ms"][key][percentile])

    return value


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("ttft_p50", "TTFT p50 (ms)", "minimize", False, _latency("ttft", "p50")),
        Objective("ttft_p90", "TTFT p90 (ms)", "minimize", False, _latency("ttft", "p90")),
        Objective("ttft_p99", "TTFT p99 (ms)", "minimize", False, _latency("ttft", "p99")),
        Objective("ttft_mean", "TTFT mean (ms)", "minimize", False, _latency("ttft", "mean")),
        Objective(
            "slo_attainment",
            "share of requests within their SLO (all requests)",
            "maximize",
            True,
            lambda report: float(report.get("slo_attainment_all", 0.0)),
        ),
        Objective(
            "goodput",
            "requests within SLO per second",
            "maximize",
            True,
            lambda report: float(report.get("goodput_rps", 0.0)),
        ),
    )
}
