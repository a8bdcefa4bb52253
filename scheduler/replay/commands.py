"""``kvsched replay``: load-test replay against a live endpoint or in the virtual-time simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from scheduler.core.baselines import BASELINE_POLICIES

POLICIES = ("kvsched", *BASELINE_POLICIES)


def load_workload(args: argparse.Namespace) -> Any:
    from scheduler.workloads.generators import generate
    from scheduler.workloads.mooncake import load_mooncake

    if args.trace:
        workload = load_mooncake(args.trace, block_tokens=args.block_tokens, limit=args.limit)
    else:
        workload = generate(args.workload, seed=args.seed).limited(args.limit)
    return workload.time_scaled(args.time_scale)


def _ms(summary: dict[str, float | None], key: str) -> str:
    value = summary.get(key)
    return "-" if value is None else f"{value:,.0f}"


def print_table(reports: dict[str, dict[str, Any]], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "policy",
        "done",
        "failed",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "hit ratio",
        "oracle",
        "req/s",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, report in reports.items():
        hit = report.get("hit_ratio")
        oracle = report.get("oracle_hit_ratio")
        table.add_row(
            policy,
            str(report["completed"]),
            str(report["failed"]),
            _ms(report["ttft_ms"], "p50"),
            _ms(report["ttft_ms"], "p99"),
            _ms(report["tpot_ms"], "p50"),
            "-" if hit is None else f"{hit:.3f}",
            "-" if oracle is None else f"{oracle:.3f}",
            f"{report['throughput_rps']:.2f}",
        )
    Console(file=sys.stdout, width=max(Console().width, 110)).print(table)


def _run(args: argparse.Namespace) -> int:
    from scheduler.replay.plots import save_plots

    if not args.trace and not args.workload:
        print("kvsched replay: give --trace PATH or --workload NAME", file=sys.stderr)
        return 2
    if bool(args.simulate) == bool(args.target):
        print("kvsched replay: give either --target URL (live) or --simulate", file=sys.stderr)
        return 2
    workload = load_workload(args)
    policies = args.policy or ["kvsched"]
    reports: dict[str, dict[str, Any]] = {}
    if args.simulate:
        from scheduler.replay.simulate import simulate

        for policy in policies:
            reports[policy] = simulate(
                workload,
                policy=policy,
                workers=args.workers,
                capacity_blocks=args.capacity_blocks,
                seed=args.seed,
            )
    else:
        reports[args.label] = asyncio.run(_live(workload, args))
    title = f"{workload.name}: {len(workload.requests)} requests, {args.workers} workers"
    print_table(reports, title=title)
    if args.json:
        document: Any = next(iter(reports.values())) if len(reports) == 1 else reports
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    if args.plot_dir:
        for path in save_plots(reports, args.plot_dir, title=title):
            print(f"plot: {path}")
    return 0


async def _live(workload: Any, args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import Progress

    from scheduler.replay.live import replay_live
    from scheduler.replay.report import build_report
    from scheduler.workloads.oracle import oracle_hit_ratio

    with Progress(disable=args.quiet or not sys.stdout.isatty()) as progress:
        task = progress.add_task("replaying", total=len(workload.requests))
        outcomes = await replay_live(
            workload,
            args.target,
            model=args.model,
            concurrency=args.concurrency,
            progress=lambda _: progress.advance(task),
        )
    return build_report(
        outcomes,
        policy=args.label,
        mode="live",
        workers=args.workers,
        oracle_hit_ratio=oracle_hit_ratio(workload.requests, workload.block_tokens),
        token_scale=workload.token_scale,
        extra={"workload": workload.name, "target": args.target},
    )


def register(subparsers: Any) -> None:
    replay = subparsers.add_parser(
        "replay", help="replay a trace or generated workload, live against a URL or in the simulator"
    )
    source = replay.add_argument_group("workload")
    source.add_argument("--trace", help="Mooncake JSONL trace")
    source.add_argument(
        "--block-tokens", type=int, default=16, help="tokens per 512-token trace block (scales down)"
    )
    source.add_argument("--workload", help="generated workload: default, chat, rag, agentic")
    source.add_argument("--seed", type=int, default=0)
    source.add_argument("--limit", type=int, help="first N requests only")
    source.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply arrival times (<1 = more load)"
    )
    target = replay.add_argument_group("target")
    target.add_argument(
        "--target", help="live: base URL of an OpenAI-compatible endpoint (gateway or server)"
    )
    target.add_argument("--model", default="default", help="live: model name to send")
    target.add_argument("--concurrency", type=int, default=256, help="live: most requests in flight")
    target.add_argument("--label", default="live", help="live: name of this run in the report (its policy)")
    target.add_argument(
        "--simulate", action="store_true", help="virtual-time simulation instead of a live target"
    )
    target.add_argument("--workers", type=int, default=8)
    target.add_argument("--policy", action="append", choices=POLICIES, help="simulate: policy (repeatable)")
    target.add_argument("--capacity-blocks", type=int, help="simulate: KV blocks of 16 tokens per worker")
    output = replay.add_argument_group("output")
    output.add_argument("--json", help="write the report (or {policy: report}) to this file")
    output.add_argument("--plot-dir", help="write PNG plots here")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.set_defaults(func=_run)
