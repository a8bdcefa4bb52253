"""``kvsched bench ...``: benchmarks runnable from the README."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _print_index_table(report: dict[str, Any]) -> None:
    ref = report["reference"]
    rows = [
        ("block events/s (decode+apply)", "events_per_s", "{:,.0f}"),
        ("lookups/s (hash+walk)", "lookups_per_s", "{:,.0f}"),
        ("lookup p50 (us)", "lookup_p50_us", "{:.1f}"),
        ("lookup p99 (us)", "lookup_p99_us", "{:.1f}"),
        ("hashed tokens/s", "hash_tokens_per_s", "{:,.0f}"),
        ("bytes per block", "bytes_per_block", "{:.0f}"),
        ("indexed blocks", "indexed_blocks", "{:,}"),
    ]
    print(f"{'':32} {'native':>16} {'reference':>16} {'ratio':>8}")
    for label, key, fmt in rows:
        ratio = report[key] / ref[key] if ref[key] else float("nan")
        print(f"{label:32} {fmt.format(report[key]):>16} {fmt.format(ref[key]):>16} {ratio:>7.1f}x")
    for goal, met in report["goals"].items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")


def _bench_index(args: argparse.Namespace) -> int:
    from scheduler.bench.index_bench import run

    report = run(
        workers=args.workers,
        blocks=args.blocks,
        prompt_blocks=args.prompt_blocks,
        lookups=args.lookups,
        reference_blocks=args.reference_blocks,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(report))
    else:
        _print_index_table(report)
    return 0


def _bench_epp(args: argparse.Namespace) -> int:
    from scheduler.bench.epp_bench import format_report, run

    report = run(
        rate=args.rate,
        prompt_tokens=args.prompt_tokens,
        requests=args.requests,
        concurrency=args.concurrency,
        workers=args.workers,
        seed=args.seed,
        prompt_bytes=args.prompt_bytes,
        envoy_concurrency=args.envoy_concurrency,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    return 0


def _bench_predictor(args: argparse.Namespace) -> int:
    from scheduler.bench.predictor_bench import run

    report = run(
        candidates=args.candidates,
        iterations=args.iterations,
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['candidates']} candidates, {report['trees_per_target']} trees per target "
        f"(depth {report['max_depth']}), TTFT and TPOT together"
    )
    print(f"{'predict latency (us)':32} {'p50':>10} {'p99':>10}")
    for label, key in (
        ("compiled trees" + ("" if report["native"] else " (numpy: not built)"), "compiled_us"),
        ("LatencyPredictor.predict", "predict_us"),
        ("xgboost inplace_predict", "xgboost_us"),
        ("numpy fallback", "numpy_us"),
        ("feature rows (builder)", "features_us"),
    ):
        print(f"{label:32} {report[key]['p50']:>10.1f} {report[key]['p99']:>10.1f}")
    print(
        f"compiled vs xgboost: {report['speedup_vs_xgboost_p50']:.1f}x faster at p50 "
        f"(max relative difference {report['max_relative_difference_vs_xgboost']:.1e})"
    )
    print(
        f"held-out MAPE: TTFT {report['mape_ttft']:.1%} (prior {report['prior_mape_ttft']:.1%}), "
        f"TPOT {report['mape_tpot']:.1%} (prior {report['prior_mape_tpot']:.1%})"
    )
    for goal, met in report["goals"].items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    return 0


def _bench_policies(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from scheduler.bench.policies import policy_table, run_tasks, summarise, summary_table, tasks_for

    try:
        tasks = tasks_for(
            workloads=args.workload,
            levels=args.load,
            policies=args.policy,
            size=args.size,
            seed=args.seed,
            data_dir=Path(args.data_dir) if args.data_dir else None,
        )
    except ValueError as exc:
        print(f"kvsched bench policies: {exc}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} simulations, {args.jobs} at a time", file=sys.stderr)
    results = run_tasks(tasks, jobs=args.jobs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows = summarise(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    for row in rows:
        print(policy_table(row) + "\n")
    print(summary_table(rows))
    if args.plot:
        from scheduler.bench.policies_plot import save_plot

        print(f"plot: {save_plot(rows, args.plot)}")
    return 0


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (figures as ratios against an in-run baseline)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    index = kinds.add_parser("index", help="prefix index: ingest, lookup latency, hashing, memory")
    index.add_argument("--workers", type=int, default=64)
    index.add_argument("--blocks", type=int, default=1_000_000, help="unique blocks to index")
    index.add_argument("--prompt-blocks", type=int, default=512, help="blocks per lookup prompt")
    index.add_argument("--lookups", type=int, default=2000)
    index.add_argument(
        "--reference-blocks",
        type=int,
        default=200_000,
        help="fleet size for the pure-Python baseline (it is slow; ratios are per operation)",
    )
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--json", action="store_true", help="print one JSON object")
    index.set_defaults(func=_bench_index)
    epp = kinds.add_parser("epp", help="latency Envoy + kvsched add over a direct request; picks per second")
    epp.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="requests per second (both paths together); 0 = closed loop of --concurrency clients",
    )
    epp.add_argument(
        "--prompt-bytes",
        type=int,
        default=None,
        help="chat prompts of this many bytes instead of token-id prompts (220000 with --concurrency "
        "150 is the large-prompt goal)",
    )
    epp.add_argument(
        "--envoy-concurrency", type=int, default=None, help="Envoy worker threads (default: one per core)"
    )
    epp.add_argument("--prompt-tokens", type=int, default=8192)
    epp.add_argument("--requests", type=int, default=2000)
    epp.add_argument("--concurrency", type=int, default=64)
    epp.add_argument("--workers", type=int, default=8)
    epp.add_argument("--seed", type=int, default=0)
    epp.add_argument("--json", action="store_true", help="print one JSON object")
    epp.set_defaults(func=_bench_epp)
    predictor = kinds.add_parser(
        "predictor", help="TTFT/TPOT predictor: batched predict latency against xgboost, held-out MAPE"
    )
    predictor.add_argument("--candidates", type=int, default=64, help="feature rows per predict call")
    predictor.add_argument("--iterations", type=int, default=5000, help="timed predict calls")
    predictor.add_argument("--train-samples", type=int, default=10_000)
    predictor.add_argument("--test-samples", type=int, default=2_000)
    predictor.add_argument("--seed", type=int, default=0)
    predictor.add_argument("--json", action="store_true", help="print one JSON object")
    predictor.set_defaults(func=_bench_predictor)
    policies = kinds.add_parser(
        "policies",
        help="kvsched against every baseline policy in the simulator: Mooncake traces and generated "
        "workloads, each at a moderate and a near-saturation load",
    )
    policies.add_argument("--jobs", type=int, default=1, help="simulations run side by side (processes)")
    policies.add_argument(
        "--size", choices=("full", "tiny"), default="full", help="tiny: a few hundred requests a row (tests)"
    )
    policies.add_argument("--workload", action="append", help="only this workload (repeatable)")
    policies.add_argument("--load", action="append", help="only this load level (repeatable)")
    policies.add_argument("--policy", action="append", help="only this policy (repeatable)")
    policies.add_argument("--seed", type=int, default=0)
    policies.add_argument(
        "--data-dir", help="directory of the Mooncake traces (default ../shared/data/mooncake)"
    )
    policies.add_argument("--json", help="write every run's figures here")
    policies.add_argument("--plot", help="write a PNG of TTFT and hit ratio per row here")
    policies.set_defaults(func=_bench_policies)
