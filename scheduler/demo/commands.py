"""``kvsched demo``: the main job on the embedded default (simulated pool, kvsched, real Envoy)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any


def _hold(args: argparse.Namespace) -> int:
    import signal

    from scheduler.demo.run import hold_stack

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await hold_stack(args.hold, workers=args.workers, speed=args.speed, stop=stop)

    asyncio.run(run())
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.hold:
        return _hold(args)
    from scheduler.demo.run import run_demo
    from scheduler.replay.commands import print_table
    from scheduler.replay.plots import save_plots
    from scheduler.replay.text import ClientTokenizer, text_workload
    from scheduler.sim.tokenizer import MODEL_DIR
    from scheduler.workloads.generators import TEXT_GENERATORS, generate

    tokenizer = ClientTokenizer(MODEL_DIR) if args.workload in TEXT_GENERATORS else None
    workload = (
        generate(args.workload, seed=args.seed)
        if tokenizer is None
        else text_workload(args.workload, tokenizer, seed=args.seed)
    )
    workload = workload.limited(args.requests).time_scaled(args.time_scale / args.speed)
    reports = asyncio.run(
        run_demo(
            workload,
            workers=args.workers,
            speed=args.speed,
            count_tokens=None if tokenizer is None else tokenizer.count,
        )
    )
    print_table(
        reports,
        title=f"kvsched demo: {len(workload.requests)} requests through Envoy, {args.workers} workers",
    )
    kv, rr = reports["kvsched"], reports["round_robin"]
    if kv["ttft_ms"]["p50"] and rr["ttft_ms"]["p50"]:
        print(
            f"kvsched vs round-robin: TTFT p50 x{kv['ttft_ms']['p50'] / rr['ttft_ms']['p50']:.2f}, "
            f"p99 x{kv['ttft_ms']['p99'] / rr['ttft_ms']['p99']:.2f}, "
            f"hit ratio {kv['hit_ratio']:.3f} vs {rr['hit_ratio']:.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "demo.json"
    json_path.write_text(json.dumps(reports, indent=1) + "\n")
    print(f"reports: {json_path}")
    for path in save_plots(reports, out, title="kvsched demo"):
        print(f"plot: {path}")
    failed = sum(r["failed"] for r in reports.values())
    return 1 if failed else 0


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="simulated pool + kvsched + real Envoy: kvsched vs round-robin")
    demo.add_argument("--workers", type=int, default=8)
    demo.add_argument(
        "--workload", default="default", help="default, chat, rag, agentic, or shared_prefix (text prompts)"
    )
    demo.add_argument("--requests", type=int, help="first N requests of the workload")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated engines run this much faster than real time (above 1 the loopback stack's own "
        "overhead weighs on the measured latencies)",
    )
    demo.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival gaps (<1 = more load)")
    demo.add_argument("--json", help='write {"kvsched": report, "round_robin": report} here')
    demo.add_argument(
        "--hold",
        choices=("kvsched", "round_robin"),
        help="start the stack with this policy, print its gateway URL, model and tokenizer directory as "
        "one JSON line, and serve until interrupted (for your own load generator)",
    )
    demo.add_argument("--out", default="kvsched-demo", help="directory for the JSON report and the PNG")
    demo.set_defaults(func=_demo)
