"""The search: Optuna's TPE sampler over the space in ``space.py``, each trial one simulated
run of the tuning window, then the current and the tuned policy on the held-out window.

Trials run in worker processes when ``jobs > 1`` (the simulator is pure Python: threads would
share one core through the GIL). Optuna's ask/tell interface hands out ``jobs`` trials at a
time; the sampler's ``constant_liar`` option keeps parallel asks from proposing the same point.
The first trial is the current policy, so the search starts from it and its tuning-window
figure is the one to beat.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from scheduler.core.scheduler import SchedulerConfig
from scheduler.tune.evaluate import DEFAULT_JITTER_MS, PoolShape, run_window
from scheduler.tune.objectives import Objective
from scheduler.tune.space import Knob, Params, apply_params, params_of, suggest
from scheduler.tune.trace import Window
from scheduler.workloads.model import Workload

log = logging.getLogger(__name__)

# Optuna needs a finite value to rank a trial; a run whose latency percentile is a failure
# (more policy failures than the percentile's share) is worse than any real one.
_WORST_LATENCY_MS = 1e9

# The workload a worker process replays, loaded once by its initializer.
_WORKER_WORKLOAD: Workload | None = None


def _init_worker(loader: Callable[[], Workload]) -> None:
    global _WORKER_WORKLOAD
    _WORKER_WORKLOAD = loader()


def _run_in_worker(
    config: SchedulerConfig, window: Window, pool: PoolShape, seed: int, jitter_ms: float
) -> dict[str, Any]:
    assert _WORKER_WORKLOAD is not None, "worker process without a workload"
    return run_window(_WORKER_WORKLOAD, config, window, pool, seed=seed, jitter_ms=jitter_ms)


class _Inline(Executor):
    """``jobs == 1``: runs each call at once, in this process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller through the future, as a pool would
            future.set_exception(exc)
        return future


def make_executor(workload: Workload, loader: Callable[[], Workload], jobs: int) -> Executor:
    """``jobs`` worker processes holding the workload, started now. With fork (Linux) they
    inherit the loaded workload and the parent's registered scorers and policies; with spawn
    each loads it again (``loader`` must then be picklable: a module-level function or a
    ``functools.partial`` of one)."""
    global _WORKER_WORKLOAD
    _WORKER_WORKLOAD = workload
    if jobs <= 1:
        return _Inline()
    if "fork" in multiprocessing.get_all_start_methods():
        executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
    else:
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(loader,))
    # A forking pool starts every process at its first task: do it now, before any other
    # thread (a progress bar's) exists, so no child inherits a lock another thread held.
    executor.submit(int).result()
    return executor


@dataclass(slots=True)
class TrialRecord:
    number: int
    params: Params
    value: float
    report: dict[str, Any]


@dataclass(slots=True)
class SearchResult:
    objective: Objective
    baseline: TrialRecord
    best: TrialRecord
    trials: list[TrialRecord] = field(default_factory=list)
    failed: int = 0
    wall_s: float = 0.0


def objective_value(objective: Objective, report: dict[str, Any]) -> float:
    value = objective.value(report)
    if math.isfinite(value):
        return value
    return _WORST_LATENCY_MS if objective.direction == "minimize" else 0.0


def search(
    workload: Workload,
    executor: Executor,
    *,
    base: SchedulerConfig,
    space: Sequence[Knob],
    objective: Objective,
    window: Window,
    pool: PoolShape,
    trials: int,
    jobs: int,
    seed: int,
    trial_seeds: int = 1,
    jitter_ms: float = DEFAULT_JITTER_MS,
    on_trial: Callable[[TrialRecord | None], None] = lambda _: None,
) -> SearchResult:
    """``trials`` points (the first one ``base`` itself), each scored by the mean objective of
    ``trial_seeds`` simulated runs of ``window`` (seed 0 as traced, the others jittered: a
    tail percentile of one run of a short window is noisy enough to be fitted), best kept."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=jobs > 1)
    study = optuna.create_study(direction=objective.direction, sampler=sampler)
    study.enqueue_trial(params_of(base, space))
    records: list[TrialRecord] = []
    failed = 0
    started = time.perf_counter()
    remaining = trials
    while remaining > 0:
        batch = []
        for _ in range(min(jobs, remaining)):
            trial = study.ask()
            params = suggest(trial, space)
            try:
                config = apply_params(base, params, space)
            except ValueError as exc:  # a point the configuration refuses: no run to make
                log.warning("trial %d: %s", trial.number, exc)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failed += 1
                on_trial(None)
                continue
            runs = [
                executor.submit(_run_in_worker, config, window, pool, run_seed, jitter_ms)
                for run_seed in range(trial_seeds)
            ]
            batch.append((trial, params, runs))
        remaining -= jobs
        for trial, params, runs in batch:
            try:
                reports = [future.result() for future in runs]
            except Exception:
                log.exception("trial %d failed in the simulator", trial.number)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failed += 1
                on_trial(None)
                continue
            value = sum(objective_value(objective, report) for report in reports) / len(reports)
            study.tell(trial, value)
            record = TrialRecord(trial.number, params, value, reports[0])
            records.append(record)
            on_trial(record)
    if not records:
        raise RuntimeError("every trial failed; see the log")
    baseline = next((r for r in records if r.number == 0), records[0])
    best = records[0]
    for record in records[1:]:
        if objective.better(record.value, best.value):
            best = record
    return SearchResult(objective, baseline, best, records, failed, time.perf_counter() - started)


# Student's t 0.975 quantiles by degrees of freedom (any statistics table); 1.96 beyond 30.
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
_T_975 |= {10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile_975(degrees: int) -> float:
    """Two-sided 95% Student's t quantile (the table's entry at or below ``degrees``)."""
    if degrees > 30:
        return 1.96
    return _T_975[max(d for d in _T_975 if d <= degrees)]


@dataclass(slots=True)
class HoldoutRun:
    window: int  # which part of the held-out span
    seed: int
    current: dict[str, Any]
    tuned: dict[str, Any]
    current_value: float
    tuned_value: float


@dataclass(slots=True)
class Comparison:
    """The current and the tuned policy on the held-out part: per window of it, per seed."""

    objective: Objective
    windows: list[Window]
    runs: list[HoldoutRun]

    def improvements(self) -> list[float]:
        return [self.objective.improvement(r.current_value, r.tuned_value) for r in self.runs]

    def current_spread(self) -> float:
        """The noise of one measurement: the current policy's relative spread (max - min over
        the mean) across seeds, the largest over the windows (windows differ in load, seeds
        only in arrival jitter)."""
        spreads = [0.0]
        for window in range(len(self.windows)):
            values = [r.current_value for r in self.runs if r.window == window]
            mean = sum(values) / len(values) if values else 0.0
            if len(values) > 1 and mean:
                spreads.append((max(values) - min(values)) / mean)
        return max(spreads)

    def interval(self) -> tuple[float, float]:
        """95% interval of the mean improvement: the runs are paired (same window, same seed,
        same arrivals), so their differences are what varies; Student's t for few runs."""
        gains = self.improvements()
        mean = sum(gains) / len(gains)
        if len(gains) < 2:
            return mean, mean
        half = t_quantile_975(len(gains) - 1) * statistics.stdev(gains) / math.sqrt(len(gains))
        return mean - half, mean + half

    def as_dict(self) -> dict[str, Any]:
        gains = self.improvements()
        low, high = self.interval()
        return {
            "objective": self.objective.name,
            "improvement_interval_95": [low, high],
            "windows": [w.as_dict() for w in self.windows],
            "runs": [
                {
                    "window": r.window,
                    "seed": r.seed,
                    "current": r.current_value,
                    "tuned": r.tuned_value,
                    "improvement": gain,
                    # What the objective does not show: the other figures of the same runs.
                    "current_report": _headline(r.current),
                    "tuned_report": _headline(r.tuned),
                }
                for r, gain in zip(self.runs, gains, strict=True)
            ],
            "improvement_mean": sum(gains) / len(gains),
            "improvement_min": min(gains),
            "improvement_max": max(gains),
            "current_spread": self.current_spread(),
        }


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("requests", "completed", "failed", "ttft_ms", "hit_ratio", "slo_attainment_all", "goodput_rps")
    return {key: report[key] for key in keys if key in report}


def compare_on_holdout(
    executor: Executor,
    *,
    current: SchedulerConfig,
    tuned: SchedulerConfig,
    objective: Objective,
    windows: Sequence[Window],
    pool: PoolShape,
    seeds: Sequence[int],
    jitter_ms: float = DEFAULT_JITTER_MS,
    on_run: Callable[[], None] = lambda: None,
) -> Comparison:
    """Both policies on every held-out window, once per seed (seed 0: the trace's own times)."""
    futures = [
        (
            index,
            seed,
            executor.submit(_run_in_worker, current, window, pool, seed, jitter_ms),
            executor.submit(_run_in_worker, tuned, window, pool, seed, jitter_ms),
        )
        for index, window in enumerate(windows)
        for seed in seeds
    ]
    runs = []
    for index, seed, current_future, tuned_future in futures:
        current_report = current_future.result()
        on_run()
        tuned_report = tuned_future.result()
        on_run()
        runs.append(
            HoldoutRun(
                index,
                seed,
                current_report,
                tuned_report,
                objective_value(objective, current_report),
                objective_value(objective, tuned_report),
            )
        )
    return Comparison(objective, list(windows), runs)
