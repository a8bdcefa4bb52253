"""``kvsched replay``: load-test replay against a live endpoint, or in the virtual-time simulator.

kvsched replay (--trace PATH [--block-tokens N] | --workload NAME [--seed S] [--rate R]
                [--requests N]) (--target URL | --simulate [--policy P ...])
               [--time-scale X] [--limit N] [--concurrency C] [--model NAME]
               [--api completions|chat] [--policy-label NAME] [--slo-ttft-ms N] [--slo-tpot-ms N]
               [--json FILE] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.core.policies import DEFAULT_POLICY, POLICIES
from scheduler.core.scheduler import SchedulerConfig, SpeculativeConfig
from scheduler.replay.report import comparison_table
from scheduler.workloads.model import SLOTargets, Workload
from scheduler.workloads.mooncake import ARRIVAL_STEP_HELP

DEFAULT_SIM_WORKERS = 8
# Where the virtual-time simulator may take over the whole command.
SIMULATOR_MODULE = "scheduler.sim.virtual"


def client_tokenizer(args: argparse.Namespace) -> Any:
    """The client's tokenizer for text workloads (default: the simulated model's files)."""
    from scheduler.replay.text import ClientTokenizer
    from scheduler.workloads.generators import TEXT_GENERATORS

    if args.trace or args.workload not in TEXT_GENERATORS:
        return None
    if args.tokenizer_dir is None:
        from scheduler.sim.tokenizer import MODEL_DIR

        return ClientTokenizer(MODEL_DIR)
    return ClientTokenizer(args.tokenizer_dir)


def load_workload(args: argparse.Namespace, tokenizer: Any = None) -> Workload:
    from scheduler.replay.text import text_workload
    from scheduler.workloads.generators import generate
    from scheduler.workloads.mooncake import load_mooncake

    if args.trace:
        workload = load_mooncake(
            args.trace,
            block_tokens=args.block_tokens,
            limit=args.limit,
            arrival_step_ms=args.arrival_step_ms,
            seed=args.seed,
        )
    elif tokenizer is not None:
        workload = text_workload(
            args.workload, tokenizer, seed=args.seed, rate=args.rate, requests=args.requests
        ).limited(args.limit)
    else:
        workload = generate(args.workload, seed=args.seed, rate=args.rate, requests=args.requests)
        workload = workload.limited(args.limit)
    return workload.time_scaled(args.time_scale)


def print_table(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]], *, title: str = ""
) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout)
    # Pipes and CI logs get a table wide enough for every column.
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=160)
    console.print(comparison_table(reports, title=title))


def write_outputs(reports: dict[str, dict[str, Any]], args: argparse.Namespace, *, title: str) -> None:
    from scheduler.replay.plots import save_plots

    print_table(reports, title=title)
    if args.json:
        document: Any = next(iter(reports.values())) if len(reports) == 1 else reports
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
        print(f"report: {args.json}")
    if args.plot_dir:
        for path in save_plots(reports, args.plot_dir, title=title):
            print(f"plot: {path}")
    if args.html:
        from scheduler.replay.html import render_html

        Path(args.html).write_text(render_html(reports, title=title), encoding="utf-8")
        print(f"page: {args.html}")


def slo_targets(args: argparse.Namespace) -> SLOTargets:
    return SLOTargets(args.slo_ttft_ms, args.slo_tpot_ms)


def _simulate(args: argparse.Namespace, workload: Workload, tokenizer: Any = None) -> int:
    try:
        simulator = importlib.import_module(SIMULATOR_MODULE)
    except ImportError as exc:
        print(f"kvsched replay: --simulate needs the virtual-time simulator ({exc})", file=sys.stderr)
        return 2
    run_from_args = getattr(simulator, "run_from_args", None)
    if callable(run_from_args):
        return int(run_from_args(args) or 0)
    from scheduler.replay.simulate import simulate, simulate_seeds

    workers = args.workers or DEFAULT_SIM_WORKERS
    replica_counts = args.replicas or [1]
    syncs = {"off": [False], "on": [True], "both": [False, True]}[args.sync]
    runs = [
        (policy, replicas, sync)
        for policy in args.policy or [DEFAULT_POLICY]
        for replicas in replica_counts
        for sync in (syncs if replicas > 1 else [False])
    ]
    settings: dict[str, Any] = {
        "workers": workers,
        "capacity_blocks": args.capacity_blocks,
        "slo": slo_targets(args),
        "kv_event_delay_s": args.kv_event_delay_ms,
        "scheduler_config": SchedulerConfig(speculative=SpeculativeConfig(enabled=args.speculative == "on")),
        "replica_spread": args.replica_spread,
        "sync_delay_s": args.sync_delay_ms / 1000.0,
        "sync_loss": args.sync_loss,
        "scrape_interval_s": args.scrape_interval,
    }
    several = len(runs) > len(args.policy or [1])
    if args.seeds > 1:
        # Every seed's own workload (arrivals, prompts and draws), one pooled report per run.
        workloads = [(args.seed, workload)] + [
            (seed, load_workload(argparse.Namespace(**{**vars(args), "seed": seed}), tokenizer))
            for seed in range(args.seed + 1, args.seed + args.seeds)
        ]
        reports = {
            replica_label(policy, replicas, sync, several=several): simulate_seeds(
                workloads, policy=policy, replicas=replicas, sync=sync, **settings
            )
            for policy, replicas, sync in runs
        }
        write_outputs(
            reports,
            args,
            title=f"{workload.name}: {len(workload.requests)} requests x seeds {args.seed}-"
            f"{args.seed + args.seeds - 1} pooled, {workers} workers",
        )
        print_seed_spread(reports)
        return 0
    reports = {
        replica_label(policy, replicas, sync, several=several): simulate(
            workload, policy=policy, seed=args.seed, replicas=replicas, sync=sync, **settings
        )
        for policy, replicas, sync in runs
    }
    write_outputs(
        reports, args, title=f"{workload.name}: {len(workload.requests)} requests, {workers} workers"
    )
    return 0


def print_seed_spread(reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Each pooled run's TTFT p50 / p99 seed by seed: how far one seed's figures move."""
    for label, report in reports.items():
        runs = report.get("per_seed") or []
        spread = ", ".join(
            f"{run['seed']}: {run['ttft_ms']['p50']:.0f} / {run['ttft_ms']['p99']:.0f}"
            for run in runs
            if run.get("ttft_ms", {}).get("p50") is not None
        )
        print(f"{label}: TTFT p50 / p99 ms by seed: {spread}")


def replica_label(policy: str, replicas: int, sync: bool, *, several: bool) -> str:
    """A simulated run's name in the comparison: the policy, and its replicas when they vary."""
    if not several:
        return policy
    return f"{policy} x{replicas}" + (" sync" if sync else "")


async def _live(workload: Workload, args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    from rich.progress import Progress

    from scheduler.replay.live import replay_live
    from scheduler.replay.report import build_report
    from scheduler.workloads.oracle import workload_ceilings

    with Progress(disable=args.quiet or not sys.stdout.isatty()) as progress:
        task = progress.add_task(f"replaying {workload.name}", total=len(workload.requests))
        outcomes = await replay_live(
            workload,
            args.target,
            model=args.model,
            api=args.api,
            concurrency=args.concurrency,
            progress=lambda _: progress.advance(task),
            slo=slo_targets(args),
            count_tokens=None if tokenizer is None else tokenizer.count,
        )
    ceilings = workload_ceilings(workload.requests, workload.block_tokens)
    return build_report(
        outcomes,
        policy=args.policy_label,
        mode="live",
        workers=args.workers,
        oracle_hit_ratio=ceilings.pop("oracle_hit_ratio"),
        # A live server's tokens are its own: latencies and token rates are reported as served,
        # whatever real tokens a scaled trace's tokens stand for.
        token_scale=1.0,
        extra={
            **ceilings,
            "workload": workload.name,
            "workload_token_scale": workload.token_scale,
            "target": args.target,
            "api": args.api,
        },
    )


def _run(args: argparse.Namespace) -> int:
    if args.trace and (args.rate is not None or args.requests is not None):
        print("kvsched replay: --rate and --requests shape generated workloads; use --limit", file=sys.stderr)
        return 2
    if bool(args.simulate) == bool(args.target):
        print("kvsched replay: give either --target URL (live) or --simulate", file=sys.stderr)
        return 2
    if args.target and args.seeds > 1:
        print("kvsched replay: --seeds pools simulated runs; a live replay runs once", file=sys.stderr)
        return 2
    if args.target and args.policy:
        print(
            "kvsched replay: live, the target picks endpoints; name the run with --policy-label",
            file=sys.stderr,
        )
        return 2
    tokenizer = client_tokenizer(args)
    workload = load_workload(args, tokenizer)
    if args.simulate:
        return _simulate(args, workload, tokenizer)
    report = asyncio.run(_live(workload, args, tokenizer))
    workers = f", {args.workers} workers" if args.workers else ""
    write_outputs(
        {args.policy_label: report},
        args,
        title=f"{workload.name}: {len(workload.requests)} requests to {args.target}{workers}",
    )
    return 0


def read_reports(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Reports from ``kvsched replay --json`` files: one report, or several keyed by label."""
    runs: dict[str, dict[str, Any]] = {}
    for path in paths:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise ValueError(f"{path}: not a replay report")
        found = {document.get("policy", Path(path).stem): document} if "ttft_ms" in document else document
        for label, report in found.items():
            if not isinstance(report, dict) or "ttft_ms" not in report:
                raise ValueError(f"{path}: {label!r} is not a replay report")
            key = str(label)
            while key in runs:
                key += "'"
            runs[key] = report
    return runs


def _report(args: argparse.Namespace) -> int:
    from scheduler.replay.html import render_html

    try:
        runs = read_reports(args.reports)
    except (OSError, ValueError) as exc:
        print(f"kvsched report: {exc}", file=sys.stderr)
        return 2
    first = next(iter(runs.values()))
    title = args.title or f"{first.get('workload', 'replay')}: {', '.join(runs)}"
    Path(args.html).write_text(render_html(runs, title=title), encoding="utf-8")
    print(f"page: {args.html}")
    return 0


def _delay_range(text: str) -> tuple[float, float]:
    """``MIN[:MAX]`` milliseconds as (least, most) seconds."""
    low, _, high = text.partition(":")
    try:
        least, most = float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN[:MAX] milliseconds") from None
    if least < 0 or most < least:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX")
    return least / 1000.0, most / 1000.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least 1")
    return value


def register(subparsers: Any) -> None:
    replay = subparsers.add_parser(
        "replay", help="replay a trace or generated workload, live against a URL or in the simulator"
    )
    source = replay.add_argument_group("workload (one of --trace, --workload)").add_mutually_exclusive_group(
        required=True
    )
    source.add_argument("--trace", help="Mooncake JSONL trace")
    source.add_argument(
        "--workload", help="generated workload: default, chat, rag, agentic, burst, shared_prefix (text)"
    )
    shape = replay.add_argument_group("workload shape")
    shape.add_argument(
        "--block-tokens",
        type=int,
        default=16,
        help="trace: tokens standing for each 512-token trace block (default 16, i.e. 1/32 scale)",
    )
    shape.add_argument("--seed", type=int, default=0, help="generator seed (and the simulator's)")
    shape.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        metavar="N",
        help="simulate: run seeds SEED .. SEED+N-1, each with its own workload, and report every "
        "request of them pooled (each seed's figures too): a p99 of one run moves between seeds",
    )
    shape.add_argument("--arrival-step-ms", type=float, help=ARRIVAL_STEP_HELP)
    shape.add_argument(
        "--rate", type=float, help="generated: arrival rate of new sessions/queries per second"
    )
    shape.add_argument("--requests", type=int, help="generated: number of requests")
    shape.add_argument("--limit", type=int, help="first N requests only")
    shape.add_argument(
        "--tokenizer-dir",
        help="text workloads: the client's tokenizer directory, to build and count prompts and to count "
        "streamed tokens (default: the simulated model's, which kvsched sim prints)",
    )
    shape.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply arrival times (<1 = more load)"
    )
    target = replay.add_argument_group("target")
    target.add_argument(
        "--target", help="live: base URL of an OpenAI-compatible endpoint (gateway or server)"
    )
    target.add_argument("--model", help="live: model name to send (default: the first of /v1/models)")
    target.add_argument(
        "--api", choices=("completions", "chat"), default="completions", help="live: API to call"
    )
    target.add_argument("--concurrency", type=int, default=256, help="live: most requests in flight")
    target.add_argument(
        "--policy-label", "--label", default="live", help="live: the run's name in the report (its policy)"
    )
    target.add_argument("--simulate", action="store_true", help="virtual-time simulation instead of a target")
    target.add_argument(
        "--workers", type=int, help="simulate: workers (default 8); live: noted in the report"
    )
    target.add_argument(
        "--policy", action="append", choices=POLICIES.names(), help="simulate: routing policy (repeatable)"
    )
    target.add_argument("--capacity-blocks", type=int, help="simulate: KV blocks of 16 tokens per worker")
    target.add_argument(
        "--scrape-interval",
        type=float,
        help="simulate: seconds between two scrapes of each engine's figures (default 0.05)",
    )
    target.add_argument(
        "--kv-event-delay-ms",
        type=_delay_range,
        metavar="MIN[:MAX]",
        help="simulate: time from an engine's KV event to the index, drawn from MIN to MAX (default 1)",
    )
    target.add_argument(
        "--speculative",
        choices=("on", "off"),
        default="on",
        help="simulate: count kvsched's recent placements before their KV events arrive (default on)",
    )
    replicas = replay.add_argument_group("replicas (simulate)")
    replicas.add_argument(
        "--replicas",
        type=int,
        action="append",
        help="kvsched replicas behind the gateway, each seeing every KV event and scrape "
        "(repeatable, default 1)",
    )
    replicas.add_argument(
        "--replica-spread",
        choices=("round_robin", "random"),
        default="round_robin",
        help="how the gateway spreads requests over the replicas",
    )
    replicas.add_argument(
        "--sync",
        choices=("off", "on", "both"),
        default="off",
        help="replicas share their in-flight load (both: one run each way)",
    )
    replicas.add_argument("--sync-delay-ms", type=float, default=2.0, help="the sync channel's one-way delay")
    replicas.add_argument("--sync-loss", type=float, default=0.0, help="share of sync messages lost")
    slo = replay.add_argument_group("objectives")
    slo.add_argument(
        "--slo-ttft-ms",
        type=float,
        help="TTFT objective of every request (sent as x-llm-d-slo-ttft-ms); adds slo_attainment "
        "and goodput_rps to the report",
    )
    slo.add_argument(
        "--slo-tpot-ms", type=float, help="TPOT objective of every request (x-llm-d-slo-tpot-ms)"
    )
    output = replay.add_argument_group("output")
    output.add_argument("--json", help="write the report (several: {policy: report}) to this file")
    output.add_argument("--plot-dir", help="write PNG plots here")
    output.add_argument("--html", metavar="FILE", help="write the report as a self-contained HTML page")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=_run)

    report = subparsers.add_parser(
        "report",
        help="render replay reports (kvsched replay --json) as a self-contained HTML page with plots",
    )
    report.add_argument("reports", nargs="+", metavar="REPORT.json", help="a report, or {label: report}")
    report.add_argument("--html", required=True, metavar="FILE", help="the page to write")
    report.add_argument("--title", default="", help="the page's title (default: the workload's)")
    report.set_defaults(func=_report)
