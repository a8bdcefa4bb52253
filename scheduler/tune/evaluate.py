"""One policy on one window of a trace in the virtual-time simulator, and the objective of it.

The run is ``kvsched replay --simulate``'s (same pool model, same Scheduler), restricted to the
window's requests: those of the warm-up are replayed and not scored. Seed 0 replays the trace's
own arrival times; seed s > 0 also moves every arrival by up to ``jitter_ms`` (uniform, seeded):
the same trace measured again, which is how the noise of a comparison is measured (in
``max_score`` mode the picker draws no random numbers, so the seed alone would change nothing).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.core.scheduler import SchedulerConfig
from scheduler.replay.report import build_report
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig
from scheduler.tune.trace import Window
from scheduler.workloads.model import RequestOutcome, SLOTargets, Workload, WorkloadRequest

DEFAULT_JITTER_MS = 100.0
# Failures that say something about the policy (refused, queued too long, nowhere to go);
# an engine refusing a request longer than its whole cache fails it under every policy.
_POLICY_FAILURES = ("http ", "no_endpoints", "shed")


@dataclass(frozen=True, slots=True)
class PoolShape:
    """The simulated pool: what ``kvsched replay --simulate`` takes as --workers and --capacity-blocks."""

    workers: int = 8
    capacity_blocks: int | None = None
    slo: SLOTargets = field(default_factory=SLOTargets)


def jittered(requests: list[WorkloadRequest], seed: int, jitter_ms: float) -> list[WorkloadRequest]:
    if seed == 0 or jitter_ms <= 0:
        return requests
    rng = random.Random(seed)
    spread = jitter_ms / 1000.0
    moved = [
        dataclasses.replace(r, arrival_s=max(0.0, r.arrival_s + rng.uniform(-spread, spread)))
        for r in requests
    ]
    return sorted(moved, key=lambda r: r.arrival_s)


def _policy_failure(outcome: RequestOutcome) -> bool:
    return not outcome.ok and outcome.error.startswith(_POLICY_FAILURES)


def latency_with_failures(outcomes: list[RequestOutcome]) -> dict[str, dict[str, float]]:
    """TTFT percentiles over every scored request, a policy failure counted as the worst TTFT:
    a tuner must not buy a better median by refusing requests."""
    values = [o.ttft_s * 1000.0 for o in outcomes if o.ok and o.ttft_s is not None]
    values += [math.inf] * sum(1 for o in outcomes if _policy_failure(o))
    if not values:
        return {"ttft": {"p50": math.inf, "p90": math.inf, "p99": math.inf, "mean": math.inf}}
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    # "higher" never interpolates towards an infinite neighbour: a percentile is a real sample.
    summary = {f"p{p}": float(np.percentile(ordered, p, method="higher")) for p in (50, 90, 99)}
    summary["mean"] = float(ordered.mean())
    return {"ttft": summary}


def run_window(
    workload: Workload,
    config: SchedulerConfig,
    window: Window,
    pool: PoolShape,
    *,
    seed: int = 0,
    jitter_ms: float = DEFAULT_JITTER_MS,
) -> dict[str, Any]:
    """The replay report of the window's scored requests, plus ``objective_latency_ms``."""
    from scheduler.replay.simulate import DEFAULT_CAPACITY_TOKENS, ENGINE_BLOCK_SIZE, capacity_blocks_for

    requests = jittered(window.replayed(workload.requests), seed, jitter_ms)
    scored_ids = {r.request_id for r in workload.requests if window.scored(r)}
    blocks = pool.capacity_blocks or capacity_blocks_for(workload, DEFAULT_CAPACITY_TOKENS)
    pool_config = VirtualPoolConfig(
        workers=pool.workers,
        block_size=ENGINE_BLOCK_SIZE,
        capacity_blocks=blocks,
        token_scale=workload.token_scale,
        slo=pool.slo,
    )
    outcomes = VirtualPool(pool_config, config.model_copy(update={"seed": seed})).run(requests)
    scored = [o for o in outcomes if o.request_id in scored_ids]
    report = build_report(
        scored,
        policy=config.policy,
        mode="simulate",
        workers=pool.workers,
        oracle_hit_ratio=None,
        token_scale=workload.token_scale,
        extra={"seed": seed, "window": window.as_dict(), "capacity_blocks_per_worker": blocks},
    )
    report.pop("samples", None)
    report["objective_latency_ms"] = latency_with_failures(scored)
    return report
