"""``kvsched bench policies``: kvsched against every baseline policy, workload by workload.

Every (workload, load level, policy) is one deterministic virtual-time simulation (the
machinery of ``kvsched replay --simulate``: simulated vLLM engines, the real Scheduler
deciding, same seed same result); ``policies_suite.py`` says which workloads and how a load
level is set. Runs are independent, so ``jobs`` processes run them side by side; nothing is
cached between invocations.

Per run: TTFT p50/p99, the prefix-cache hit ratio and its ratio to the capacity ceiling
(the hit ratio of one LRU cache as large as the whole pool, ``oracle.pooled_lru_hits``), and
for policies that predict latencies the TTFT MAPE overall and by the serving engine's load
regime at arrival (idle / loaded / saturated, ``sim/virtual.py::load_regime``). Per row,
kvsched's TTFT against the best baseline's and the goals: p50 at most the best baseline's,
p99 at most 0.9x the best baseline's, hit ratio at least 0.97x the ceiling, TTFT MAPE at
most 0.15.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from scheduler.bench.policies_suite import (
    ENGINE_BLOCK_SIZE,
    LOAD_LEVELS,
    SIZES,
    WORKLOADS,
    LoadLevel,
    Size,
    WorkloadSpec,
    build_workload,
    capacity_blocks,
    offered_utilisation,
    pool_capacity_blocks,
)
from scheduler.core.scheduler import SchedulerConfig
from scheduler.replay.report import (
    build_report,
    mean_absolute_percentage_error,
    scored_ttft_predictions,
    ttft_prediction_pairs,
    ttft_source,
)
from scheduler.sim.virtual import LOAD_REGIMES, VirtualPool, VirtualPoolConfig
from scheduler.workloads.model import RequestOutcome, Workload
from scheduler.workloads.oracle import pooled_lru_hits

KVSCHED = "kvsched"
BASELINES = (
    "round_robin",
    "random",
    "least_loaded",
    "prefix_balance",
    "queue_only",
    "cache_only",
    "dynamo",
    "llmd",
    "vllm_router_kv_aware",
)
POLICIES = (KVSCHED, *BASELINES)

# The goals, per row.
P50_VS_BEST = 1.0
P99_VS_BEST = 0.9
HIT_VS_CEILING = 0.97
MAX_TTFT_MAPE = 0.15


def default_data_dir() -> Path:
    """``../shared/data/mooncake`` beside the checkout."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mooncake"


@dataclass(frozen=True, slots=True)
class Task:
    workload: WorkloadSpec
    level: LoadLevel
    policy: str
    size: Size
    seed: int
    data_dir: Path

    @property
    def label(self) -> str:
        return f"{self.workload.name}/{self.level.name}/{self.policy}"


# --- one run ------------------------------------------------------------------------------------


def _row_facts(workload: Workload, workers: int) -> dict[str, Any]:
    hits = pooled_lru_hits(workload.requests, workload.block_tokens, pool_capacity_blocks(workload, workers))
    blocks = sum(len(r.prompt_token_ids) // workload.block_tokens for r in workload.requests)
    return {
        "requests": len(workload.requests),
        "duration_s": workload.duration_s,
        "offered_utilisation": offered_utilisation(workload, workers),
        "capacity_ceiling_hit_ratio": sum(hits) / blocks if blocks else 0.0,
        "capacity_ceiling_hits": sum(hits),
        "prompt_blocks": blocks,
        # A trace whose recorded arrival steps were spread over each step (None: as recorded).
        "arrival_step_ms": workload.meta.get("arrival_step_ms"),
    }


def mape_by_regime(outcomes: Sequence[RequestOutcome]) -> dict[str, Any]:
    """TTFT MAPE of the trained model's TTFT predictions (as ``build_report`` scores them:
    against the TTFT from the routing decision), over all of them and per load regime, with
    the count of each; ``from_arrival`` is the overall figure against the TTFT from the
    request's arrival, flow control's wait included; ``scope`` says which predictions were
    scored and ``answered_by`` how many TTFTs of completed requests each source answered."""
    scored, scope = scored_ttft_predictions(outcomes)
    answered = Counter(source for o in outcomes if o.ok and (source := ttft_source(o)) is not None)
    out: dict[str, Any] = {
        "all": _mape(scored),
        "scored": len(scored),
        "counts": {},
        "scope": scope,
        "answered_by": dict(answered),
    }
    for regime in LOAD_REGIMES:
        group = [o for o in scored if o.load_regime == regime]
        out[regime] = _mape(group)
        out["counts"][regime] = len(group)
    out["from_arrival"] = mean_absolute_percentage_error(
        [(o.predicted_ttft_ms or 0.0, (o.ttft_s or 0.0) * 1000.0) for o in scored]
    )
    return out


def _mape(outcomes: Sequence[RequestOutcome]) -> float | None:
    return mean_absolute_percentage_error(ttft_prediction_pairs(outcomes))


def ttft_percentiles_ms(outcomes: Sequence[RequestOutcome]) -> dict[str, float]:
    """TTFT p50/p99 over every request, a failed one counting as never served (infinite):
    a policy that refuses requests must not look faster for it. Linear interpolation
    between the two closest ranks, as numpy's default; infinite where it reaches a failure."""
    return _percentiles(
        sorted((o.ttft_s * 1000.0 if o.ok and o.ttft_s is not None else math.inf) for o in outcomes)
    )


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 of sorted ``values`` (infinite where a rank reaches an infinite one)."""
    values = values or [math.inf]
    out = {}
    for q in (50, 99):
        position = q / 100.0 * (len(values) - 1)
        low, high = values[math.floor(position)], values[math.ceil(position)]
        out[f"p{q}"] = (
            math.inf if math.isinf(high) else low + (high - low) * (position - math.floor(position))
        )
    return out


def decisions_digest(outcomes: Sequence[RequestOutcome]) -> str:
    """A digest of which endpoint served each request: equal digests, equal decisions."""
    text = "\n".join(f"{o.request_id}={o.endpoint}" for o in outcomes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=2)
def _row_workload(
    spec: WorkloadSpec, level: LoadLevel, size: Size, seed: int, data_dir: Path
) -> tuple[Workload, dict[str, Any]]:
    # Within one process the policies of a row share its workload and ceiling (a process
    # runs a row's policies back to back when it can; nothing outlives the process).
    workload = build_workload(spec, level, size, seed, data_dir)
    return workload, _row_facts(workload, size.workers)


def run_task(task: Task) -> dict[str, Any]:
    """One simulation: the run's figures (no per-request samples)."""
    started = time.perf_counter()
    workload, facts = _row_workload(task.workload, task.level, task.size, task.seed, task.data_dir)
    workers = task.size.workers
    pool = VirtualPoolConfig(
        workers=workers,
        block_size=ENGINE_BLOCK_SIZE,
        capacity_blocks=capacity_blocks(workload),
        token_scale=workload.token_scale,
        # The latency model retrains on the predictor's own cadence, as the live server's does
        # (PredictorConfig: when the samples double, every 2,000 or every 30 s). The pool's
        # default floor of 120 virtual seconds between fits, there to save wall time, left a
        # short row (10-70 virtual seconds) only the doublings: on chat saturated the last
        # model was trained on 7,044 of 10,431 requests while the load kept growing.
        min_train_interval_s=0.0,
    )
    config = SchedulerConfig(policy=task.policy, seed=task.seed)
    simulation = VirtualPool(pool, config)
    outcomes = simulation.run(workload.requests)
    predictor = simulation.scheduler.predictor.stats
    report = build_report(
        outcomes,
        policy=task.policy,
        mode="simulate",
        workers=workers,
        oracle_hit_ratio=None,
        token_scale=workload.token_scale,
    )
    ceiling = facts["capacity_ceiling_hit_ratio"]
    hit = report["hit_ratio"]
    return {
        "workload": task.workload.name,
        "level": task.level.name,
        "policy": task.policy,
        **facts,
        "completed": report["completed"],
        "failed": report["failed"],
        # Over every request, failed ones infinite (``ttft_percentiles_ms``); the report's own
        # figures cover completed requests only.
        "ttft_ms": ttft_percentiles_ms(outcomes),
        "ttft_ms_completed": {key: report["ttft_ms"][key] for key in ("p50", "p99")},
        "tpot_ms_p50": report["tpot_ms"]["p50"],
        "hit_ratio": hit,
        "hit_vs_ceiling": hit / ceiling if hit is not None and ceiling else None,
        "ttft_mape": mape_by_regime(outcomes),
        # Models the latency predictor installed, and what answers its TTFT at the end.
        "predictor": {"trainings": predictor.trainings, "ttft_source": predictor.ttft_source},
        "decisions": decisions_digest(outcomes),
        "wall_s": time.perf_counter() - started,
        "seed": task.seed,
        "prompt_tokens": report["prompt_tokens"],
        "cached_tokens": report["cached_tokens"],
        # What pool_seeds needs to pool this run with other seeds' (dropped once pooled).
        "samples": {
            "ttft_ms": [round(v * 1000.0, 3) for o in outcomes if o.ok and (v := o.ttft_s) is not None]
        },
    }


# --- many runs ----------------------------------------------------------------------------------


def tasks_for(
    *,
    workloads: Sequence[str] | None = None,
    levels: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
    size: str = "full",
    seed: int = 0,
    data_dir: Path | None = None,
    seeds: int = 1,
) -> list[Task]:
    """The runs of a benchmark, largest workloads first (so parallel runs finish together)."""
    specs = [spec for spec in WORKLOADS if workloads is None or spec.name in workloads]
    chosen_levels = [level for level in LOAD_LEVELS if levels is None or level.name in levels]
    unknown = set(workloads or ()) - {spec.name for spec in WORKLOADS}
    unknown |= set(levels or ()) - {level.name for level in LOAD_LEVELS}
    unknown |= set(policies or ()) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown workload, load level or policy: {', '.join(sorted(unknown))}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    directory = data_dir or default_data_dir()
    return [
        Task(spec, level, policy, SIZES[size], run_seed, directory)
        for spec in specs
        for level in chosen_levels
        # A seed's policies back to back: they share the row's workload in a process.
        for run_seed in range(seed, seed + seeds)
        for policy in (policies or POLICIES)
    ]


def run_tasks(
    tasks: Sequence[Task], *, jobs: int = 1, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every task's result, in task order; ``jobs`` > 1 runs them in that many processes."""
    say = progress or (lambda _: None)
    results: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()

    def done(position: int, result: dict[str, Any]) -> None:
        results[position] = result
        elapsed = time.perf_counter() - started
        count = f"[{len(results):3d}/{len(tasks)}]"
        say(f"{count} {tasks[position].label}: {result['wall_s']:.1f} s (all: {elapsed:.0f} s)")

    if jobs <= 1:
        for position, task in enumerate(tasks):
            done(position, run_task(task))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_task, task): position for position, task in enumerate(tasks)}
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [results[position] for position in range(len(tasks))]


# --- rows and goals -----------------------------------------------------------------------------


def pool_seeds(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (workload, level, policy): a run alone as it is, several seeds' runs of
    it pooled (every request of them in the percentiles, hit ratios and prediction errors;
    each run kept in ``per_seed``). A p99 of one short row is its 9th-104th slowest request
    and moves between seeds by more than the goals' margins."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["workload"], result["level"], result["policy"]), []).append(result)
    pooled = []
    for runs in groups.values():
        pooled.append(_pooled(runs) if len(runs) > 1 else {**runs[0], "samples": None})
    return pooled


def _weighted(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    """The mean of the values given, each weighted (None values and zero weights left out)."""
    kept = [(value, weight) for value, weight in pairs if value is not None and weight > 0]
    total = sum(weight for _, weight in kept)
    return sum(value * weight for value, weight in kept) / total if total else None


def _pooled(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    failed = sum(run["failed"] for run in runs)
    completed = [v for run in runs for v in run["samples"]["ttft_ms"]]
    # ttft_percentiles_ms over the pooled requests: completed ones and the failed as infinite.
    values = sorted(completed) + [math.inf] * failed
    percentiles = _percentiles(values)
    prompt = sum(run["prompt_tokens"] for run in runs)
    cached = sum(run["cached_tokens"] for run in runs)
    blocks = sum(run["prompt_blocks"] for run in runs)
    ceiling = sum(run["capacity_ceiling_hits"] for run in runs) / blocks if blocks else 0.0
    hit = cached / prompt if prompt else None
    mape: dict[str, Any] = {
        "all": _weighted((run["ttft_mape"]["all"], run["ttft_mape"]["scored"]) for run in runs),
        "scored": sum(run["ttft_mape"]["scored"] for run in runs),
        "counts": {},
        "scope": first["ttft_mape"]["scope"],
        "answered_by": dict(sum((Counter(run["ttft_mape"]["answered_by"]) for run in runs), Counter())),
        "from_arrival": _weighted(
            (run["ttft_mape"]["from_arrival"], run["ttft_mape"]["scored"]) for run in runs
        ),
    }
    for regime in LOAD_REGIMES:
        mape[regime] = _weighted(
            (run["ttft_mape"][regime], run["ttft_mape"]["counts"][regime]) for run in runs
        )
        mape["counts"][regime] = sum(run["ttft_mape"]["counts"][regime] for run in runs)
    return {
        "workload": first["workload"],
        "level": first["level"],
        "policy": first["policy"],
        "requests": sum(run["requests"] for run in runs),
        "duration_s": sum(run["duration_s"] for run in runs),
        "offered_utilisation": _weighted((run["offered_utilisation"], run["requests"]) for run in runs),
        "capacity_ceiling_hit_ratio": ceiling,
        "capacity_ceiling_hits": sum(run["capacity_ceiling_hits"] for run in runs),
        "prompt_blocks": blocks,
        "arrival_step_ms": first["arrival_step_ms"],
        "completed": sum(run["completed"] for run in runs),
        "failed": failed,
        "ttft_ms": percentiles,
        "ttft_ms_completed": _percentiles(sorted(completed)) if completed else {"p50": None, "p99": None},
        # Not pooled: the runs' TPOT percentiles are in per_seed.
        "tpot_ms_p50": None,
        "hit_ratio": hit,
        "hit_vs_ceiling": hit / ceiling if hit is not None and ceiling else None,
        "ttft_mape": mape,
        "predictor": None,
        "decisions": hashlib.sha256("".join(run["decisions"] for run in runs).encode()).hexdigest()[:16],
        "wall_s": sum(run["wall_s"] for run in runs),
        "seed": [run["seed"] for run in runs],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "samples": None,
        "per_seed": [{**run, "samples": None} for run in runs],
    }


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (workload, level): every policy's figures, kvsched against the best
    baseline, and which goals hold."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        row = rows.setdefault(
            (result["workload"], result["level"]),
            {
                "workload": result["workload"],
                "level": result["level"],
                "requests": result["requests"],
                "offered_utilisation": result["offered_utilisation"],
                "capacity_ceiling_hit_ratio": result["capacity_ceiling_hit_ratio"],
                "arrival_step_ms": result["arrival_step_ms"],
                # A list where seeds were pooled (pool_seeds).
                "seed": result.get("seed"),
                "policies": {},
            },
        )
        row["policies"][result["policy"]] = result
    for row in rows.values():
        row.update(_versus_best(row["policies"]))
    return list(rows.values())


def _versus_best(policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    own = policies.get(KVSCHED)
    baselines = {
        name: r for name, r in policies.items() if name != KVSCHED and r["ttft_ms"]["p50"] is not None
    }
    if own is None or not baselines or own["ttft_ms"]["p50"] is None:
        return {"goals": {}}
    best_p50 = min(baselines, key=lambda name: baselines[name]["ttft_ms"]["p50"])
    best_p99 = min(baselines, key=lambda name: baselines[name]["ttft_ms"]["p99"])
    p50_ratio = own["ttft_ms"]["p50"] / baselines[best_p50]["ttft_ms"]["p50"]
    p99_ratio = own["ttft_ms"]["p99"] / baselines[best_p99]["ttft_ms"]["p99"]
    mape = own["ttft_mape"]["all"]
    hit_vs_ceiling = own["hit_vs_ceiling"]
    return {
        "best_p50": best_p50,
        "best_p99": best_p99,
        "p50_vs_best": p50_ratio,
        "p99_vs_best": p99_ratio,
        "goals": {
            "p50_le_best": p50_ratio <= P50_VS_BEST,
            "p99_le_0.9_best": p99_ratio <= P99_VS_BEST,
            "hit_ge_0.97_ceiling": hit_vs_ceiling is not None and hit_vs_ceiling >= HIT_VS_CEILING,
            "mape_le_0.15": mape is not None and mape <= MAX_TTFT_MAPE,
        },
    }


# --- the tables ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "failed" if math.isinf(value) else format(value, spec)


def policy_table(row: dict[str, Any]) -> str:
    """Markdown: every policy of one row."""
    step = row["arrival_step_ms"]
    spread = f", the trace's {step:,.0f} ms arrival steps spread" if step else ""
    seeds = row.get("seed")
    if isinstance(seeds, list):
        spread += f", seeds {seeds[0]}-{seeds[-1]} pooled"
    lines = [
        f"**{row['workload']}, {row['level']}** ({row['requests']:,} requests, offered utilisation "
        f"{row['offered_utilisation']:.2f}, capacity ceiling {row['capacity_ceiling_hit_ratio']:.3f}"
        f"{spread})",
        "",
        "| policy | TTFT p50 ms | TTFT p99 ms | failed | hit ratio | x ceiling "
        "| TTFT MAPE | idle | loaded | saturated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in row["policies"].items():
        mape = r["ttft_mape"]
        lines.append(
            f"| {name} | {_fmt(r['ttft_ms']['p50'], ',.0f')} | {_fmt(r['ttft_ms']['p99'], ',.0f')} "
            f"| {r['failed']} | {_fmt(r['hit_ratio'], '.3f')} | {_fmt(r['hit_vs_ceiling'], '.2f')} "
            f"| {_fmt(mape['all'], '.1%')} | {_fmt(mape['idle'], '.1%')} | {_fmt(mape['loaded'], '.1%')} "
            f"| {_fmt(mape['saturated'], '.1%')} |"
        )
    return "\n".join(lines)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: kvsched per row against the best baseline, and the goals."""
    lines = [
        "| workload | load | kvsched p50 / best | kvsched p99 / best | hit x ceiling | TTFT MAPE "
        "(idle / loaded / saturated) | goals met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        own = row["policies"].get(KVSCHED)
        if own is None or not row["goals"]:
            continue
        mape = own["ttft_mape"]
        goals = row["goals"]
        met = sum(goals.values())
        missed = ", ".join(goal for goal, ok in goals.items() if not ok)
        lines.append(
            f"| {row['workload']} | {row['level']} "
            f"| {_fmt(row['p50_vs_best'], '.2f')} ({row['best_p50']}) "
            f"| {_fmt(row['p99_vs_best'], '.2f')} ({row['best_p99']}) "
            f"| {_fmt(own['hit_vs_ceiling'], '.2f')} "
            f"| {_fmt(mape['all'], '.1%')} ({_fmt(mape['idle'], '.0%')} / {_fmt(mape['loaded'], '.0%')} / "
            f"{_fmt(mape['saturated'], '.0%')}) "
            f"| {met}/{len(goals)}{': not ' + missed if missed else ''} |"
        )
    return "\n".join(lines)
