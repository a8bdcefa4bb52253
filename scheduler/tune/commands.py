"""``kvsched tune``: search scoring weights and thresholds for a trace in the simulator, and write
the result as a SchedulingPolicy.

kvsched tune --trace PATH [--objective ttft_p50|ttft_p90|ttft_p99|ttft_mean|slo_attainment|goodput]
             [--slo-ttft-ms N] [--slo-tpot-ms N] [--workers N] [--capacity-blocks N]
             [--holdout 0.3] [--tune-minutes 15] [--warmup-minutes 5] [--trials 30] [--jobs 1]
             [--seed 0] [--eval-seeds 3] [--current FILE] [--out FILE] [--pool NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def _load(path: str, block_tokens: int, time_scale: float) -> Any:
    from scheduler.tune.trace import load_trace

    return load_trace(path, block_tokens=block_tokens).time_scaled(time_scale)


def _fmt(value: float, objective: Any) -> str:
    if objective.name == "slo_attainment":
        return f"{value:.1%}"
    if objective.name == "goodput":
        return f"{value:.3f}"
    return f"{value:,.0f}"


def _verdict(summary: dict[str, Any], goal: float) -> str:
    low, high = summary["improvement_interval_95"]
    mean, spread = summary["improvement_mean"], summary["current_spread"]
    runs = len(summary["runs"])
    if summary["improvement_min"] >= goal:
        return f"the tuned policy beats the current one by >= {goal:.0%} on every one of {runs} held-out runs"
    if low >= goal:
        return (
            f"the tuned policy beats the current one by {mean:+.1%} (95% interval {low:+.1%} to {high:+.1%})"
        )
    if low > 0:
        return (
            f"the tuned policy is better by {mean:+.1%} (95% interval {low:+.1%} to {high:+.1%}), short of "
            f"{goal:.0%}"
        )
    if high < 0:
        return (
            "the tuned policy is worse on the held-out part: keep the current one (it fitted the tuning part)"
        )
    return (
        f"within noise: the tuned policy's {mean:+.1%} has a 95% interval of {low:+.1%} to {high:+.1%} over "
        f"{runs} held-out runs (one run of the current policy varies by {spread:.1%} across seeds): the "
        "current policy is as good as this search finds"
    )


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scheduler.server.config import ConfigError
    from scheduler.tune.evaluate import PoolShape
    from scheduler.tune.objectives import OBJECTIVES
    from scheduler.tune.policy import applied, current_config, manifest, render
    from scheduler.tune.search import compare_on_holdout, make_executor, search
    from scheduler.tune.space import apply_params, knobs, policy_spec, searched
    from scheduler.tune.trace import TraceError, split_by_time
    from scheduler.workloads.model import SLOTargets

    try:
        import optuna  # noqa: F401
    except ImportError:
        print("kvsched tune: needs Optuna: pip install 'kvsched[tune]'", file=sys.stderr)
        return EXIT_USAGE
    objective = OBJECTIVES[args.objective]
    slo = SLOTargets(args.slo_ttft_ms, args.slo_tpot_ms)
    if objective.needs_slo and not slo:
        print(
            f"kvsched tune: objective {objective.name} needs --slo-ttft-ms or --slo-tpot-ms", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        current, current_text = current_config(args.current)
        candidate = None if args.evaluate is None else current_config(args.evaluate)[0]
        workload = _load(args.trace, args.block_tokens, args.time_scale)
        split = split_by_time(
            workload,
            holdout=args.holdout,
            tune_s=args.tune_minutes * 60.0 if args.tune_minutes > 0 else None,
            warmup_s=args.warmup_minutes * 60.0,
        )
    except (ConfigError, TraceError, ValueError, OSError) as exc:
        print(f"kvsched tune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pool = PoolShape(args.workers, args.capacity_blocks, slo)
    space = searched(knobs(), slo=objective.needs_slo)
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # pipes and CI logs: whole lines
        console = Console(file=sys.stdout, width=200)
    tune_requests = sum(1 for r in workload.requests if split.tune.scored(r))
    held_requests = sum(1 for r in workload.requests if split.holdout.scored(r))
    console.print(
        f"{workload.name}: {len(workload.requests):,} requests over {workload.duration_s / 60:.0f} min, "
        f"{args.workers} workers; objective {objective.description} ({objective.direction}); "
        f"current policy: {current_text}\n"
        f"tuning on {split.tune.start_s / 60:.0f}-{split.tune.end_s / 60:.0f} min "
        f"({tune_requests:,} requests), "
        f"held out {split.holdout.start_s / 60:.0f}-{split.holdout.end_s / 60:.0f} min ({held_requests:,} "
        f"requests, after {split.holdout.warmup_s / 60:g} min of warm-up); {len(space)} knobs, "
        f"{'no search' if args.evaluate else f'{args.trials} trials'}, {args.jobs} job(s)"
    )
    loader = functools.partial(_load, args.trace, args.block_tokens, args.time_scale)
    seeds = list(range(args.eval_seeds))
    windows = split.holdout_windows(args.eval_splits)
    executor = make_executor(workload, loader, args.jobs)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    result = None
    with executor, Progress(*columns, console=console, disable=args.quiet) as progress:
        if candidate is None:
            trials_task = progress.add_task("trials", total=args.trials)
            result = search(
                workload,
                executor,
                base=current,
                space=space,
                objective=objective,
                window=split.tune,
                pool=pool,
                trials=args.trials,
                jobs=args.jobs,
                seed=args.seed,
                trial_seeds=args.trial_seeds,
                jitter_ms=args.jitter_ms,
                on_trial=lambda _: progress.advance(trials_task),
            )
            spec = policy_spec(apply_params(current, result.best.params, space), space)
        else:
            spec = policy_spec(candidate, space)
        tuned = applied(spec, current)
        held_task = progress.add_task("held-out runs", total=2 * len(seeds) * len(windows))
        comparison = compare_on_holdout(
            executor,
            current=current,
            tuned=tuned,
            objective=objective,
            windows=windows,
            pool=pool,
            seeds=seeds,
            jitter_ms=args.jitter_ms,
            on_run=lambda: progress.advance(held_task),
        )
    summary = comparison.as_dict()
    verdict = _verdict(summary, args.goal)
    if result is not None:
        console.print(
            f"tuning window: current {_fmt(result.baseline.value, objective)}, best "
            f"{_fmt(result.best.value, objective)} (trial {result.best.number}); {len(result.trials)} trials "
            f"in {result.wall_s:.0f} s ({result.failed} failed)"
        )
    for run, gain in zip(comparison.runs, comparison.improvements(), strict=True):
        window = windows[run.window]
        console.print(
            f"held-out {window.start_s / 60:.0f}-{window.end_s / 60:.0f} min, seed {run.seed}: current "
            f"{_fmt(run.current_value, objective)}, tuned {_fmt(run.tuned_value, objective)} ({gain:+.1%})"
        )
    console.print(
        f"improvement over the current policy on the held-out part: {summary['improvement_mean']:+.1%} "
        f"(95% interval {summary['improvement_interval_95'][0]:+.1%} to "
        f"{summary['improvement_interval_95'][1]:+.1%}; runs {summary['improvement_min']:+.1%} to "
        f"{summary['improvement_max']:+.1%}); the current policy's own spread across seeds: "
        f"{summary['current_spread']:.1%}\nverdict: {verdict}"
    )
    header = (
        f"kvsched tune --trace {args.trace} --objective {objective.name} --workers {args.workers}\n"
        f"held-out improvement over {current_text}: {summary['improvement_mean']:+.1%} "
        f"(seeds {', '.join(f'{g:+.1%}' for g in comparison.improvements())}); {verdict}"
    )
    document = manifest(spec, name=args.name or args.pool, pool=args.pool, namespace=args.namespace)
    Path(args.out).write_text(render(document, header), encoding="utf-8")
    console.print(f"policy: {args.out} (kubectl apply -f {args.out})")
    if args.json:
        out = {
            "trace": args.trace,
            "objective": objective.name,
            "workers": args.workers,
            "split": {"tune": split.tune.as_dict(), "holdout": split.holdout.as_dict()},
            "tuning": None
            if result is None
            else {
                "trials": [{"number": t.number, "value": t.value, "params": t.params} for t in result.trials],
                "baseline": result.baseline.value,
                "best": result.best.value,
                "best_params": result.best.params,
                "wall_s": result.wall_s,
            },
            "holdout": summary,
            "verdict": verdict,
            "policy": document,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


def register(subparsers: Any) -> None:
    from scheduler.tune.objectives import OBJECTIVES

    tune = subparsers.add_parser(
        "tune",
        help="search scoring weights and thresholds for a trace in the simulator; write a SchedulingPolicy",
        description="Tune kvsched's scoring weights (every registered scorer), picker and saturation "
        "thresholds on the first part of a trace in the virtual-time simulator (Optuna, seeded TPE), "
        "measure the result against the current policy on the held-out last part, and write it as a "
        "SchedulingPolicy for kubectl apply.",
    )
    tune.add_argument("--trace", required=True, help="Mooncake JSONL trace or a kvsched audit log")
    tune.add_argument("--objective", choices=sorted(OBJECTIVES), default="ttft_p50")
    tune.add_argument("--slo-ttft-ms", type=float, help="TTFT objective of every request")
    tune.add_argument("--slo-tpot-ms", type=float, help="TPOT objective of every request")
    tune.add_argument("--workers", type=int, default=8, help="simulated pool size (default 8)")
    tune.add_argument("--capacity-blocks", type=int, help="KV blocks of 16 tokens per worker")
    tune.add_argument("--block-tokens", type=int, default=16, help="tokens per 512-token trace block")
    tune.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (<1: more load)")
    tune.add_argument(
        "--holdout", type=float, default=0.3, help="held-out share of the trace, its last part (default 0.3)"
    )
    tune.add_argument(
        "--tune-minutes",
        type=float,
        default=15.0,
        help="tune on the trace's first N minutes (0: everything before the held-out part; default 15)",
    )
    tune.add_argument(
        "--warmup-minutes", type=float, default=5.0, help="replayed, unscored, before the held-out part"
    )
    tune.add_argument("--trials", type=int, default=30, help="simulated runs of the tuning window")
    tune.add_argument("--jobs", type=int, default=1, help="trials run in parallel processes")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    tune.add_argument(
        "--trial-seeds",
        type=int,
        default=1,
        help="runs averaged per trial (seeds > 0 jitter arrivals): steadier tail objectives, N x the cost",
    )
    tune.add_argument(
        "--eval-seeds", type=int, default=3, help="held-out runs per policy (seeds 1.. jitter arrivals)"
    )
    tune.add_argument(
        "--eval-splits", type=int, default=1, help="held-out part cut into N windows, each compared"
    )
    tune.add_argument("--jitter-ms", type=float, default=100.0, help="arrival jitter of seeds > 0")
    tune.add_argument(
        "--evaluate",
        metavar="FILE",
        help="no search: compare this SchedulingPolicy (or serve config) with the current policy on the "
        "held-out part",
    )
    tune.add_argument("--goal", type=float, default=0.10, help="improvement to call a win (default 0.10)")
    tune.add_argument(
        "--current", help="the policy to beat: a SchedulingPolicy or serve config (default: defaults)"
    )
    tune.add_argument("--out", default="schedulingpolicy.yaml", help="SchedulingPolicy file to write")
    tune.add_argument("--pool", default="llama", help="the InferencePool the policy names (poolRef)")
    tune.add_argument("--name", help="the policy's name (default: the pool's)")
    tune.add_argument("--namespace", help="the policy's namespace")
    tune.add_argument("--json", help="write the trials, the held-out comparison and the policy here")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.set_defaults(func=_run)
