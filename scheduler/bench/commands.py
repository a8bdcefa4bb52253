"""``kvsched bench ...``: benchmarks runnable from the README."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
from typing import Any


def _si(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.2f}{suffix}"
    return f"{value:.0f}"


def _pair(report: dict[str, Any], low: str, high: str) -> str:
    return f"{report[low]:,.1f} / {report[high]:,.1f}"


def _index_rows(native: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, native, reference, ratio) rows of one worker count."""
    ref = native.get("reference")
    vllm = native["vllm"]
    speed = native.get("speedup_vs_reference", {})

    def ratio(key: str) -> str:
        return f"{speed[key]:,.0f}x" if key in speed else ""

    rows = [
        (
            "block events/s, wire payload applied (CPU)",
            _si(native["events_per_s"]),
            _si(ref["events_per_s"]) if ref else "",
            ratio("events"),
        ),
        ("  the same, wall clock", _si(native["events_per_wall_s"]), "", ""),
    ]
    if "codec" in native:
        codec = native["codec"]
        rows.append(
            (
                "  a quarter of it: Python codec / kernel (CPU)",
                f"{_si(codec['codec_events_per_s'])} / {_si(codec['kernel_events_per_s'])}",
                "",
                f"{codec['kernel_events_per_s'] / codec['codec_events_per_s']:.1f}x",
            )
        )
    rows += [
        (
            "lookup p50 / p99, ids as ext_proc parses them, CPU (us)",
            _pair(native, "lookup_p50_us", "lookup_p99_us"),
            _pair(ref, "lookup_p50_us", "lookup_p99_us") if ref else "",
            "",
        ),
        (
            "  each prompt's best of 3 passes, CPU (us)",
            _pair(native, "lookup_best_p50_us", "lookup_best_p99_us"),
            _pair(ref, "lookup_best_p50_us", "lookup_best_p99_us") if ref else "",
            "",
        ),
        (
            "lookup p50 / p99, wall clock (us)",
            _pair(native, "lookup_wall_p50_us", "lookup_wall_p99_us"),
            _pair(ref, "lookup_wall_p50_us", "lookup_wall_p99_us") if ref else "",
            "",
        ),
    ]
    if "list" in native:
        rows.append(
            (
                "  ids as a Python list (a tokenizer's), CPU (us)",
                _pair(native["list"], "lookup_p50_us", "lookup_p99_us"),
                _pair(ref["list"], "lookup_p50_us", "lookup_p99_us") if ref and "list" in ref else "",
                "",
            )
        )
        rows.append(
            (
                "    each prompt's best of 3 passes, CPU (us)",
                _pair(native["list"], "lookup_best_p50_us", "lookup_best_p99_us"),
                "",
                "",
            )
        )
    if "cold" in native:
        rows.append(
            (
                "lookup p50 / p99, list ids built up front (CPU)",
                _pair(native["cold"], "lookup_p50_us", "lookup_p99_us"),
                "",
                "",
            )
        )
    rows += [
        (
            "lookups/s (CPU)",
            f"{native['lookups_per_s']:,.0f}",
            f"{ref['lookups_per_s']:,.0f}" if ref else "",
            ratio("lookups"),
        ),
        (
            "blocks hashed per lookup (longest match)",
            f"{native['blocks_hashed_per_lookup']:.0f} ({native['mean_matched_blocks']:.0f})",
            f"{ref['blocks_hashed_per_lookup']:.0f} ({ref['mean_matched_blocks']:.0f})" if ref else "",
            "",
        ),
        (
            "hashed tokens/s, whole prompts (CPU)",
            _si(native["hash_tokens_per_s"]),
            _si(ref["hash_tokens_per_s"]) if ref else "",
            ratio("hash_tokens"),
        ),
        (
            "vLLM sha256_cbor mode: lookup p50 / p99, CPU (us)",
            _pair(vllm, "lookup_p50_us", "lookup_p99_us"),
            "",
            "",
        ),
        (
            "  blocks hashed per lookup (longest match)",
            f"{vllm['blocks_hashed_per_lookup']:.0f} ({vllm['mean_matched_blocks']:.0f})",
            "",
            "",
        ),
        ("  hashed tokens/s, whole prompts (CPU)", _si(vllm["hash_tokens_per_s"]), "", ""),
        ("  block events/s, wire payload applied (CPU)", _si(vllm["events_per_s"]), "", ""),
        (
            "bytes per (block, worker) entry",
            f"{native['bytes_per_entry']:.1f}",
            f"{ref['bytes_per_entry']:.0f}" if ref else "",
            "",
        ),
        (
            "bytes per block",
            f"{native['bytes_per_block']:.0f}",
            f"{ref['bytes_per_block']:.0f}" if ref else "",
            "",
        ),
        (
            "indexed blocks / entries",
            f"{native['indexed_blocks']:,} / {native['entries']:,}",
            f"{ref['indexed_blocks']:,} / {ref['entries']:,}" if ref else "",
            "",
        ),
    ]
    return rows


def _print_index_table(report: dict[str, Any]) -> None:
    for native in report["by_workers"]:
        print(
            f"\n{native['workers']} workers, {native['indexed_blocks']:,} blocks, "
            f"{native['prompt_blocks']}-block prompts"
        )
        print(f"{'':50} {'native':>18} {'reference':>18} {'ratio':>7}")
        for label, value, reference, ratio in _index_rows(native):
            print(f"{label:50} {value:>18} {reference:>18} {ratio:>7}")
        for goal, met in native["goals"].items():
            print(f"goal {goal}: {'met' if met else 'NOT met'}")
        if native["declined_payloads"]:
            print(f"payloads the kernel left to the codec: {native['declined_payloads']}")
    curve = report.get("memory_curve")
    if curve:
        print(
            f"\nmemory, {report['workers']} workers: {'blocks':>12} {'entries':>12} {'bytes/entry':>12} "
            f"{'bytes/block':>12} {'GiB':>7} {'max RSS GiB':>12}"
        )
        for point in curve:
            print(
                f"{'':22}{point['blocks']:>12,.0f} {point['entries']:>12,.0f} "
                f"{point['bytes_per_entry']:>12.1f} {point['bytes_per_block']:>12.1f} "
                f"{point['bytes'] / 2**30:>7.2f} {point['max_rss_bytes'] / 2**30:>12.2f}"
            )


def _bench_index(args: argparse.Namespace) -> int:
    from scheduler.bench.index_bench import run

    report = run(
        workers=args.workers,
        blocks=args.blocks,
        prompt_blocks=args.prompt_blocks,
        lookups=args.lookups,
        reference_blocks=args.reference_blocks,
        seed=args.seed,
        memory_sizes_m=args.memory_curve,
    )
    if args.json:
        print(json.dumps(report))
    else:
        _print_index_table(report)
    return 0


def _bench_epp_scaling(args: argparse.Namespace) -> int:
    from scheduler.bench.epp_bench import format_scaling, judge_scaling, measure_decision_scaling
    from scheduler.bench.text_prompt_bench import format_text_decisions, measure_text_decisions

    scaling = measure_decision_scaling(seed=args.seed)
    scaling["goals"] = judge_scaling(scaling)
    scaling["text_prompts"] = measure_text_decisions(seed=args.seed)
    if args.shortlist_quality:
        from pathlib import Path

        from scheduler.bench.epp_bench import format_pruning_quality, measure_pruning_quality
        from scheduler.bench.policies import default_data_dir

        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        scaling["shortlist_quality"] = measure_pruning_quality(
            data_dir / "conversation_trace.jsonl", seed=args.seed
        )
    if args.json:
        print(json.dumps(scaling))
        return 0
    print(format_scaling(scaling))
    print(format_text_decisions(scaling["text_prompts"]))
    if "shortlist_quality" in scaling:
        print(format_pruning_quality(scaling["shortlist_quality"]))
    return 0


def _numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _bench_conformance(args: argparse.Namespace) -> int:
    from scheduler.adapters.extproc.server import resolve_transport
    from scheduler.bench.conformance import format_table, run_conformance

    results = asyncio.run(run_conformance(args.transport, args.workers))
    if args.json:
        print(json.dumps([dataclasses.asdict(result) for result in results]))
    else:
        print(format_table(results, resolve_transport(args.transport)))
    return 0 if all(result.passed for result in results) else 1


def _bench_epp(args: argparse.Namespace) -> int:
    if args.scaling:
        return _bench_epp_scaling(args)
    from scheduler.bench.epp_bench import format_report, run

    if args.floors:
        return _bench_epp_floors(args)

    report = run(
        rate=args.rate,
        prompt_tokens=args.prompt_tokens,
        requests=args.requests,
        concurrency=args.concurrency,
        workers=args.workers,
        seed=args.seed,
        prompt_bytes=args.prompt_bytes,
        envoy_concurrency=args.envoy_concurrency,
        transport=args.transport,
        stream_tokens=args.stream_tokens,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    return 0


def _bench_epp_floors(args: argparse.Namespace) -> int:
    from scheduler.bench.epp_bench import format_report
    from scheduler.bench.extproc_floors import GATEWAYS, WITH_SINGLE_FILTER, format_floors, run

    summary = run(
        names=WITH_SINGLE_FILTER if args.single_filter_too else GATEWAYS,
        stream_tokens=args.stream_tokens,
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
        print(json.dumps(summary))
        return 0
    print(format_floors(summary))
    if "kvsched" in summary:
        print()
        print(format_report(summary["kvsched"]))
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


def _bench_peers(args: argparse.Namespace) -> int:
    from scheduler.bench.peer_names import DEFAULT_LOADS, DEFAULT_WORKLOAD
    from scheduler.bench.peers import format_result, format_skipped, run

    def show(result: dict[str, Any]) -> None:
        print(format_result(result) + "\n", flush=True)

    report = run(
        workloads=args.workload or [DEFAULT_WORKLOAD],
        loads=args.load or list(DEFAULT_LOADS),
        routers=args.router,
        workers=args.workers,
        capacity_blocks=args.capacity_blocks,
        requests=args.requests,
        rate=args.rate,
        seed=args.seed,
        router_args={name: shlex.split(text) for name, text in args.router_args or ()},
        on_result=None if args.json else show,
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=1)
    print(json.dumps(report) if args.json else format_skipped(report))
    return 0


def _register_peers(kinds: Any) -> None:
    from scheduler.bench.peer_names import (
        DEFAULT_CAPACITY_BLOCKS,
        DEFAULT_LOADS,
        DEFAULT_WORKERS,
        ROUTER_DESCRIPTIONS,
        WORKLOADS,
    )

    routers = "; ".join(f"{name}: {description}" for name, description in ROUTER_DESCRIPTIONS.items())
    peers = kinds.add_parser(
        "peers",
        help="kvsched against sglang-router, vllm-router and round-robin on the same simulated pool",
        description="Replay the same text workload, on the same arrival schedule, through each router "
        "in front of a fresh simulated pool (kvsched sim, its own process), and print one table per "
        "workload and load: requests ok/failed, TTFT p50/p99 at the client, the workers' own TTFT, "
        "the data path (client TTFT minus worker TTFT), the hit ratio from the workers' counters, "
        "the routers' CPU seconds, and a computed floor (no queueing, one infinite shared cache). "
        f"Routers: {routers}. The peers need pip install 'kvsched[peers]'; missing ones are skipped. "
        "Everything runs on loopback, offline.",
    )
    peers.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="repeatable (default rag_tenants: 8 tenants' RAG, 600 queries at 13 req/s)",
    )
    peers.add_argument(
        "--load",
        action="append",
        type=float,
        help="how busy the pool is: load L runs the workload at its own rate on simulated GPUs L times "
        "slower, so the routers and this machine see the same request rate; repeatable "
        f"(default {' and '.join(f'{x:g}' for x in DEFAULT_LOADS)}: moderate and near saturation)",
    )
    peers.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="multiple of the workload's own arrival rate (default 1; more needs more cores)",
    )
    peers.add_argument(
        "--router",
        action="append",
        choices=list(ROUTER_DESCRIPTIONS),
        help="repeatable (default: every one installed)",
    )
    peers.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="simulated workers per pool")
    peers.add_argument(
        "--capacity-blocks",
        type=int,
        default=DEFAULT_CAPACITY_BLOCKS,
        help="KV blocks (16 tokens) per worker; the default is smaller than every workload's working set",
    )
    peers.add_argument("--requests", type=int, help="requests per workload (default: the workload's own)")
    peers.add_argument("--seed", type=int, default=0)
    peers.add_argument(
        "--router-args",
        nargs=2,
        action="append",
        metavar=("ROUTER", "ARGS"),
        help="extra command-line arguments for one router, for what-if runs, e.g. "
        "--router-args kvsched '--set scheduler.predictor.enabled=false' (repeatable)",
    )
    peers.add_argument("--out", help="also write the JSON report to this file")
    peers.add_argument("--json", action="store_true", help="print the JSON report instead of the tables")
    peers.set_defaults(func=_bench_peers)


def _bench_policies(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from scheduler.bench.policies import (
        policy_table,
        pool_seeds,
        run_tasks,
        summarise,
        summary_table,
        tasks_for,
    )

    try:
        tasks = tasks_for(
            workloads=args.workload,
            levels=args.load,
            policies=args.policy,
            size=args.size,
            seed=args.seed,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            seeds=args.seeds,
        )
    except ValueError as exc:
        print(f"kvsched bench policies: {exc}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} simulations, {args.jobs} at a time", file=sys.stderr)
    results = run_tasks(tasks, jobs=args.jobs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows = summarise(pool_seeds(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    for row in rows:
        print(policy_table(row) + "\n")
    print(summary_table(rows))
    if args.plot:
        from scheduler.bench.policies_plot import save_plot

        print(f"plot: {save_plot(rows, args.plot)}")
    return 0


def _bench_lora(args: argparse.Namespace) -> int:
    from scheduler.bench.lora_bench import run, table

    report = run(
        workers=args.workers,
        max_loras=args.max_loras,
        lora_load_s=args.lora_load_ms / 1000.0,
        requests=args.requests,
        adapters=args.adapters,
        rate=args.rate,
        seed=args.seed,
    )
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def _bench_pd(args: argparse.Namespace) -> int:
    from scheduler.bench.pd_bench import run, sweep, sweep_table, table

    if args.sweep:
        swept = sweep(
            workers=args.workers,
            duration_s=args.duration_s,
            bandwidth=args.kv_gbytes_per_s * 1e9,
            seed=args.seed,
            capacity_blocks=args.capacity_blocks,
        )
        print(json.dumps(swept, indent=1) if args.json else sweep_table(swept))
        return 0
    report = run(
        workers=args.workers,
        prefill=args.prefill_pods,
        requests=args.requests,
        rate=args.rate,
        bandwidth=args.kv_gbytes_per_s * 1e9,
        seed=args.seed,
        capacity_blocks=args.capacity_blocks,
        threshold=args.non_cached_tokens_threshold,
        documents=args.documents,
        prompt=(300, 1500) if args.documents else (3000, 8000),
    )
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def _bench_scrape(args: argparse.Namespace) -> int:
    from scheduler.bench.scrape_bench import format_report, run

    report = run(
        args.endpoints,
        interval_s=args.interval,
        idle_interval_s=args.idle_interval,
        events_per_s=args.events_per_s,
        window_s=args.window,
        fleet_pages_per_s=args.fleet_pages_per_s,
        baseline=args.baseline,
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (figures as ratios against an in-run baseline)")
    kinds = bench.add_subparsers(dest="bench", required=True)
    index = kinds.add_parser("index", help="prefix index: ingest, lookup latency, hashing, memory")
    index.add_argument(
        "--workers",
        type=_counts,
        default=[64],
        help="worker count, or several comma-separated (8,64,256,1000)",
    )
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
    index.add_argument(
        "--memory-curve",
        type=_numbers,
        default=None,
        help="also grow one table through these sizes in millions of blocks (e.g. 1,5,10,25,50; "
        "50M needs ~6 GiB)",
    )
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
    epp.add_argument(
        "--floors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure Envoy alone and protocol-only ext_procs (Python, native) as baselines, "
        "then kvsched with each transport (--no-floors: kvsched alone)",
    )
    epp.add_argument(
        "--stream-tokens",
        type=int,
        default=None,
        help="streamed token-id completions of this many tokens (a response of as many "
        "chunks) instead of one-token answers",
    )
    epp.add_argument(
        "--single-filter-too",
        action="store_true",
        help="with the floors: also kvsched behind the single ext_proc filter of the GIE layout "
        "(response phase on the decision stream), each run just before its two-filter twin",
    )
    epp.add_argument(
        "--transport",
        choices=("auto", "native", "python"),
        default="auto",
        help="kvsched's ext_proc transport with --no-floors (auto: native when built)",
    )
    epp.add_argument("--prompt-tokens", type=int, default=8192)
    epp.add_argument("--requests", type=int, default=2000)
    epp.add_argument("--concurrency", type=int, default=64)
    epp.add_argument("--workers", type=int, default=8)
    epp.add_argument("--seed", type=int, default=0)
    epp.add_argument("--json", action="store_true", help="print one JSON object")
    epp.add_argument(
        "--scaling",
        action="store_true",
        help="only the decision's cost against 8..1,000 endpoints and 1k..128k-token prompts (no Envoy)",
    )
    epp.add_argument(
        "--shortlist-quality",
        action="store_true",
        help="with --scaling: the conversation trace simulated at 256 and 1,000 workers, kvsched "
        "scoring a shortlist against every endpoint (TTFT, hit ratio; a few minutes)",
    )
    epp.add_argument(
        "--data-dir",
        help="with --shortlist-quality: directory of the Mooncake traces (default ../shared/data/mooncake)",
    )
    epp.set_defaults(func=_bench_epp)
    conformance = kinds.add_parser(
        "conformance",
        help="the Endpoint Picker protocol's required behaviours against kvsched behind Envoy: pass/fail",
    )
    conformance.add_argument("--transport", choices=["auto", "native", "python"], default="auto")
    conformance.add_argument("--workers", type=int, default=3, help="simulated vLLM workers")
    conformance.add_argument("--json", action="store_true", help="print the results as JSON")
    conformance.set_defaults(func=_bench_conformance)
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
    chaos = kinds.add_parser(
        "chaos",
        help="faults and bad input under live load (workers, kvsched and Envoy killed, bad requests, "
        "bad KV events, bad tuning, overload): what clients see, and recovery",
    )
    chaos.add_argument(
        "--scenario",
        action="append",
        choices=_CHAOS_SCENARIOS,
        help="run only this scenario (repeatable; default: all of them, in order)",
    )
    chaos.add_argument(
        "--transport",
        choices=("auto", "native", "python"),
        default="native",
        help="kvsched's ext_proc transport (default native)",
    )
    chaos.add_argument(
        "--fail-open", action="store_true", help="FailOpen instead of the chart's default FailClose"
    )
    chaos.add_argument(
        "--single-filter",
        action="store_true",
        help="the GIE layout: one ext_proc filter carries the response phase too (default: a "
        "decision filter and an observation filter)",
    )
    chaos.add_argument("--rate", type=float, default=8.0, help="steady load, requests per second (default 8)")
    chaos.add_argument(
        "--quick",
        action="store_true",
        help="the cheapest scenarios, at a fraction of the counts (what CI runs)",
    )
    chaos.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    chaos.add_argument("--keep-logs", metavar="DIR", help="copy every process's log here")
    chaos.set_defaults(func=_bench_chaos)
    _register_peers(kinds)
    policies = kinds.add_parser(
        "policies",
        help="kvsched against every baseline policy in the simulator: Mooncake traces and generated "
        "workloads, each at a moderate and a near-saturation load",
    )
    policies.add_argument("--jobs", type=int, default=1, help="simulations run side by side (processes)")
    policies.add_argument(
        "--size",
        choices=("full", "short", "tiny"),
        default="full",
        help="short: 2,000 requests of each trace and 10 s of generated arrivals a row; "
        "tiny: a few hundred requests a row (tests)",
    )
    policies.add_argument("--workload", action="append", help="only this workload (repeatable)")
    policies.add_argument("--load", action="append", help="only this load level (repeatable)")
    policies.add_argument("--policy", action="append", help="only this policy (repeatable)")
    policies.add_argument("--seed", type=int, default=0)
    policies.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="every row at seeds SEED .. SEED+N-1, each seed's own workload, pooled: the tables "
        "and goals over every request of them (each run in the JSON's per_seed)",
    )
    policies.add_argument(
        "--data-dir", help="directory of the Mooncake traces (default ../shared/data/mooncake)"
    )
    policies.add_argument("--json", help="write every run's figures here")
    policies.add_argument("--plot", help="write a PNG of TTFT and hit ratio per row here")
    policies.set_defaults(func=_bench_policies)
    lora = kinds.add_parser(
        "lora",
        help="LoRA adapter affinity in the simulator: kvsched against itself with affinity off and "
        "against round-robin, on adapters with Zipf popularity",
    )
    lora.add_argument("--workers", type=int, default=8)
    lora.add_argument("--max-loras", type=int, default=4, help="adapter slots per pod (vLLM --max-loras)")
    lora.add_argument("--lora-load-ms", type=float, default=50.0, help="engine time to load an adapter")
    lora.add_argument("--requests", type=int, default=1200)
    lora.add_argument("--adapters", type=int, default=30)
    lora.add_argument("--rate", type=float, default=48.0, help="requests per second")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--json", action="store_true", help="print one JSON object")
    lora.set_defaults(func=_bench_lora)
    pd = kinds.add_parser(
        "pd",
        help="prefill/decode disaggregation against as many aggregated pods (virtual time): "
        "TTFT and TPOT p50/p99 on long prompts with long outputs",
    )
    pd.add_argument("--workers", type=int, default=8, help="pods in either pool")
    pd.add_argument("--prefill-pods", type=int, default=3, help="of them, prefill pods when disaggregated")
    pd.add_argument("--requests", type=int, default=400)
    pd.add_argument("--rate", type=float, default=8.0, help="requests per second")
    pd.add_argument("--kv-gbytes-per-s", type=float, default=25.0, help="prefill-to-decode KV bandwidth")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--capacity-blocks", type=int, default=27_000, help="KV blocks of 16 tokens per pod")
    pd.add_argument(
        "--non-cached-tokens-threshold",
        type=int,
        default=0,
        help="prompts with fewer uncached tokens skip the prefill pod (llm-d's selective P/D; 0: none do)",
    )
    pd.add_argument(
        "--documents",
        type=int,
        default=0,
        help="prompts sharing a prefix: one of N documents of 6,000 tokens (Zipf) + 300-1,500 tokens "
        "of their own (0: distinct prompts of 3,000-8,000 tokens)",
    )
    pd.add_argument(
        "--sweep",
        action="store_true",
        help="one table over output lengths, rates, prefill:decode splits and thresholds (~15 min)",
    )
    pd.add_argument(
        "--duration-s", type=float, default=60.0, help="with --sweep: seconds of arrivals at each rate"
    )
    pd.add_argument("--json", action="store_true", help="print one JSON object")
    pd.set_defaults(func=_bench_pd)
    scrape = kinds.add_parser(
        "scrape", help="one replica's CPU to scrape and subscribe to N endpoints (a simulated fleet)"
    )
    scrape.add_argument(
        "--endpoints", type=_counts, default=[8, 64, 256, 1000], help="fleet sizes, comma-separated"
    )
    scrape.add_argument("--interval", type=float, default=0.1, help="scrape interval when busy (seconds)")
    scrape.add_argument("--idle-interval", type=float, default=1.0, help="scrape interval at rest (seconds)")
    scrape.add_argument(
        "--events-per-s", type=float, default=5.0, help="KV-event batches per second per endpoint when busy"
    )
    scrape.add_argument("--window", type=float, default=3.0, help="seconds of each measured window")
    scrape.add_argument(
        "--fleet-pages-per-s",
        type=float,
        default=1_500.0,
        help="most pages a second the simulated fleet is asked for (larger fleets: projected per scrape)",
    )
    scrape.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the scraper on the Python page client (no native thread) in the same run",
    )
    scrape.add_argument("--json", action="store_true", help="print one JSON object")
    scrape.set_defaults(func=_bench_scrape)


_CHAOS_SCENARIOS = (
    "worker_kill",
    "kv_publisher",
    "kvsched_kill",
    "bad_requests",
    "bad_kv_events",
    "bad_tuning",
    "overload",
)


def _bench_chaos(args: argparse.Namespace) -> int:
    from scheduler.bench.chaos import run_command

    return run_command(args)
