"""``kvsched sweep``: one workload at several load levels in the simulator, every policy at each.

A load multiplier k replays the workload with arrivals compressed by 1/k (k = 2 is twice
the trace's request rate, same requests). Each (k, policy) run is the deterministic
simulation ``kvsched replay --simulate`` makes, so a sweep is reproducible from its seed.
The result is ``{"multipliers": [...], "policies": [...], "runs": {k: {policy: report}}}``
(reports without their per-request samples), a table, and a PNG of SLO attainment and TTFT
p50/p99 against load, one line per policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scheduler.core.policies import POLICIES
from scheduler.workloads.model import SLOTargets, Workload
from scheduler.workloads.mooncake import ARRIVAL_STEP_HELP

DEFAULT_MULTIPLIERS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
DEFAULT_POLICIES: tuple[str, ...] = (
    "kvsched",
    "round_robin",
    "least_loaded",
    "queue_only",
    "cache_only",
)
PLOT_FILE = "sweep.png"


def run_sweep(
    workload: Workload,
    *,
    policies: Sequence[str],
    multipliers: Sequence[float],
    workers: int,
    slo: SLOTargets,
    seed: int = 0,
    capacity_blocks: int | None = None,
) -> dict[str, Any]:
    from scheduler.replay.simulate import simulate

    runs: dict[str, dict[str, Any]] = {}
    for multiplier in multipliers:
        scaled = workload.time_scaled(1.0 / multiplier)
        level: dict[str, Any] = {}
        for policy in policies:
            report = simulate(
                scaled,
                policy=policy,
                workers=workers,
                capacity_blocks=capacity_blocks,
                seed=seed,
                slo=slo,
            )
            report.pop("samples", None)
            report["load_multiplier"] = multiplier
            level[policy] = report
        runs[f"{multiplier:g}"] = level
    return {
        "workload": workload.name,
        "workers": workers,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "multipliers": list(multipliers),
        "policies": list(policies),
        "runs": runs,
        "summary": summarize(runs, policies),
    }


def summarize(runs: dict[str, dict[str, Any]], policies: Sequence[str]) -> dict[str, Any]:
    """The headline comparison: at the lowest load where every baseline's SLO attainment is
    under 80%, kvsched's attainment and its lead over the best baseline, in points."""
    summary: dict[str, Any] = {"threshold_load": None}
    baselines = [p for p in policies if p != "kvsched"]
    if "kvsched" not in policies or not baselines:
        return summary
    for key, level in runs.items():
        if "slo_attainment" not in level["kvsched"]:
            return summary
        best = max(level[p]["slo_attainment"] for p in baselines)
        if best < 0.8:
            mine = level["kvsched"]["slo_attainment"]
            summary.update(
                threshold_load=float(key),
                kvsched_attainment=mine,
                best_baseline_attainment=best,
                best_baseline=max(baselines, key=lambda p: level[p]["slo_attainment"]),
                lead_points=100.0 * (mine - best),
            )
            return summary
    return summary


def save_sweep_plot(sweep: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(figure)
    attainment_ax, p50_ax, p99_ax = figure.subplots(1, 3)
    multipliers = sweep["multipliers"]
    for policy in sweep["policies"]:
        reports = [sweep["runs"][f"{m:g}"][policy] for m in multipliers]
        if all("slo_attainment" in r for r in reports):
            attainment_ax.plot(
                multipliers, [100 * r["slo_attainment"] for r in reports], marker="o", label=policy
            )
        p50_ax.plot(multipliers, [r["ttft_ms"]["p50"] for r in reports], marker="o", label=policy)
        p99_ax.plot(multipliers, [r["ttft_ms"]["p99"] for r in reports], marker="o", label=policy)
    slo = sweep["slo"]
    objectives = [
        f"{name} {slo[key]:g} ms" for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")) if slo[key]
    ]
    attainment_ax.set_title(f"SLO attainment ({', '.join(objectives)})")
    attainment_ax.set_ylabel("% of completed requests")
    attainment_ax.axhline(80, color="grey", linestyle=":", linewidth=1)
    p50_ax.set_title("TTFT p50")
    p99_ax.set_title("TTFT p99")
    for ax in (p50_ax, p99_ax):
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")
    for ax in (attainment_ax, p50_ax, p99_ax):
        ax.set_xlabel("load (x the trace's request rate)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{sweep['workload']}: {sweep['workers']} workers")
    figure.tight_layout()
    out = path / PLOT_FILE
    figure.savefig(out, dpi=110)
    return out


def print_sweep(sweep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=120)
    table = Table(title=f"{sweep['workload']}: load sweep, {sweep['workers']} workers")
    for column in ("load", "policy", "SLO met", "goodput/s", "TTFT p50 ms", "TTFT p99 ms", "hit ratio"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for key, level in sweep["runs"].items():
        for policy, report in level.items():
            attainment = report.get("slo_attainment")
            table.add_row(
                f"x{key}",
                policy,
                "-" if attainment is None else f"{attainment:.1%}",
                f"{report.get('goodput_rps', 0.0):.2f}",
                f"{report['ttft_ms']['p50'] or 0:,.0f}",
                f"{report['ttft_ms']['p99'] or 0:,.0f}",
                "-" if report.get("hit_ratio") is None else f"{report['hit_ratio']:.3f}",
            )
    console.print(table)
    summary = sweep["summary"]
    if summary.get("threshold_load") is not None:
        console.print(
            f"at x{summary['threshold_load']:g} every baseline is under 80% SLO attainment: kvsched "
            f"{summary['kvsched_attainment']:.1%} vs {summary['best_baseline']} "
            f"{summary['best_baseline_attainment']:.1%} ({summary['lead_points']:+.1f} points)"
        )


def _multipliers(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("give positive load multipliers, e.g. 0.5,1,2")
    return values


def _run(args: argparse.Namespace) -> int:
    from scheduler.replay.commands import load_workload

    if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        print("kvsched sweep: give --slo-ttft-ms and/or --slo-tpot-ms", file=sys.stderr)
        return 2
    args.rate = args.requests = None
    args.time_scale = 1.0
    workload = load_workload(args)
    sweep = run_sweep(
        workload,
        policies=args.policy or DEFAULT_POLICIES,
        multipliers=args.loads,
        workers=args.workers,
        slo=SLOTargets(args.slo_ttft_ms, args.slo_tpot_ms),
        seed=args.seed,
        capacity_blocks=args.capacity_blocks,
    )
    print_sweep(sweep)
    if args.json:
        Path(args.json).write_text(json.dumps(sweep, indent=1) + "\n")
        print(f"report: {args.json}")
    if args.plot_dir:
        print(f"plot: {save_sweep_plot(sweep, args.plot_dir)}")
    return 0


def register(subparsers: Any) -> None:
    sweep = subparsers.add_parser(
        "sweep", help="simulate a trace at several load levels under several policies (SLO attainment)"
    )
    sweep.add_argument("--trace", required=True, help="Mooncake JSONL trace")
    sweep.add_argument(
        "--block-tokens", type=int, default=16, help="tokens standing for each 512-token trace block"
    )
    sweep.add_argument("--limit", type=int, help="first N requests only")
    sweep.add_argument("--arrival-step-ms", type=float, help=ARRIVAL_STEP_HELP)
    sweep.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    sweep.add_argument(
        "--loads",
        type=_multipliers,
        default=list(DEFAULT_MULTIPLIERS),
        help="comma-separated load multipliers of the trace's rate (default 0.5,0.75,1,1.25,1.5,2)",
    )
    sweep.add_argument(
        "--policy",
        action="append",
        choices=POLICIES.names(),
        help="policy (repeatable; default: a standard set)",
    )
    sweep.add_argument("--workers", type=int, default=8)
    sweep.add_argument("--capacity-blocks", type=int, help="KV blocks of 16 tokens per worker")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--slo-ttft-ms", type=float, help="TTFT objective of every request")
    sweep.add_argument("--slo-tpot-ms", type=float, help="TPOT objective of every request (real tokens)")
    sweep.add_argument("--json", help="write the sweep here")
    sweep.add_argument("--plot-dir", help="write sweep.png here")
    sweep.set_defaults(func=_run)
