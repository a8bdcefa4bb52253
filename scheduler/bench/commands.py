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
