"""``kvsched bench chaos``: what happens to users when parts of the stack break, in numbers.

One stack (``chaos_stack``: simulated vLLM workers, kvsched replicas and a real Envoy, each a
process of its own, wired as the chart's defaults say), a steady live load through Envoy
(``chaos_load``) and one fault at a time (``chaos_scenarios``). The table prints, per
scenario, requests sent / ok / failed (of the failed: those in flight on the process a fault
killed), requests kvsched routed to a dead worker, kvsched processes started and tracebacks
in their logs, seconds until the hit ratio and TTFT were back to normal, and whether every
goal was met; the goals follow with what was measured against each.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scheduler.bench.chaos_load import LoadShape, SteadyLoad
from scheduler.bench.chaos_scenarios import OVERLOAD_MAX_WAIT_S, SCENARIOS, ScenarioResult, Timing
from scheduler.bench.chaos_stack import ChaosStack, StackConfig, new_workdir

# A short run: the cheapest scenarios at a fraction of the counts (the test suite runs it).
QUICK_SCENARIOS = ("worker_kill", "bad_kv_events")
QUICK_TIMING = Timing(
    baseline_s=2.0,
    down_s=1.5,
    observe_s=5.0,
    window=8,
    bad_requests=300,
    bad_concurrency=16,
    huge_blocks=20_000,
    flood_batches=5_000,
    overload_rates=(8.0, 32.0),
    overload_step_s=3.0,
)


@dataclass(frozen=True)
class ChaosOptions:
    scenarios: Sequence[str] = tuple(SCENARIOS)
    transport: str = "native"
    workers: int = 4
    replicas: int = 2
    fail_open: bool = False
    observation: bool = True
    shape: LoadShape = field(default_factory=LoadShape)
    timing: Timing = field(default_factory=Timing)
    warmup_s: float = 8.0
    keep_logs: Path | None = None


def stack_config(options: ChaosOptions) -> StackConfig:
    return StackConfig(
        workers=options.workers,
        replicas=options.replicas,
        fail_open=options.fail_open,
        observation=options.observation,
        transport=options.transport,
        # A short running batch, so the overload scenario saturates the pool at request
        # rates one client on this machine can offer; the steady load keeps ~1 request in
        # flight per worker and never reaches it.
        max_num_seqs=8,
        # One worker whose history a replay cannot reach (the KV publisher scenario needs
        # it); only in runs that include that scenario, since it also keeps a restarted
        # kvsched replica from learning that worker's cache by replay.
        small_buffer_workers=("sim-3",) if "kv_publisher" in options.scenarios else (),
        kvsched={
            "scheduler": {"flow_control": {"max_wait_s": OVERLOAD_MAX_WAIT_S, "max_queued_requests": 64}},
        },
    )


async def run_chaos(options: ChaosOptions) -> dict[str, Any]:
    unknown = [name for name in options.scenarios if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    workdir = new_workdir()
    started = time.perf_counter()
    results: list[ScenarioResult] = []
    try:
        async with ChaosStack(stack_config(options), workdir) as stack:
            warm = SteadyLoad(stack.url, stack.model, options.shape, name="warmup")
            warm.start()
            # Warm-up: every shared prefix cached somewhere before the first baseline.
            await asyncio.sleep(options.warmup_s)
            await warm.stop()
            for name in options.scenarios:
                results.append(await SCENARIOS[name](stack, options.shape, options.timing))
            transport = _transports(stack)
    finally:
        if options.keep_logs is not None:
            shutil.copytree(workdir, options.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "transport": transport,
        "fail_open": options.fail_open,
        "observation": options.observation,
        "replicas": options.replicas,
        "workers": options.workers,
        "rate": options.shape.rate,
        "seconds": time.perf_counter() - started,
        "scenarios": [r.as_dict() for r in results],
        "met": all(r.met for r in results),
    }


def _transports(stack: ChaosStack) -> list[str]:
    found = []
    for replica in stack.kvsched:
        text = replica.child.log_path.read_text(errors="replace")
        marker = " transport)"
        for line in text.splitlines():
            if "kvsched serving:" in line and marker in line:
                found.append(line.split(marker)[0].rsplit(", ", 1)[-1])
    return sorted(set(found))


def table(report: dict[str, Any]) -> str:
    head = (
        "scenario",
        "sent",
        "ok",
        "failed (in flight)",
        "to dead worker",
        "kvsched starts / tracebacks",
        "recovered",
        "RTO / agree 95%",
        "goals",
    )
    rows = [head]
    for r in report["scenarios"]:
        recovered = (
            "-"
            if r["name"] in ("bad_requests", "bad_kv_events", "bad_tuning", "overload", "kv_publisher")
            else ("not within the run" if r["recovery_s"] is None else f"{r['recovery_s']:.1f} s")
        )
        rows.append(
            (
                r["title"],
                str(r["sent"]),
                str(r["ok"]),
                f"{r['failed']} ({r['failed_in_flight']})",
                "-" if r["routed_to_dead"] is None else str(r["routed_to_dead"]),
                f"{r['epp_starts']} / {r['tracebacks']}",
                recovered,
                _rto(r),
                "met" if r["met"] else "NOT met",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    mode = "FailOpen" if report["fail_open"] else "FailClose"
    mode += ", two ext_proc filters" if report.get("observation", True) else ", one ext_proc filter"
    lines = [
        f"kvsched bench chaos: {report['workers']} workers, {report['replicas']} kvsched replicas "
        f"({'/'.join(report['transport']) or '?'} transport, {mode}), "
        f"steady load {report['rate']:g} req/s, {report['seconds']:.0f} s",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for r in report["scenarios"]:
        lines.append(f"{r['title']}:")
        for goal in r["goals"]:
            lines.append(f"  [{'met' if goal['met'] else 'NOT met'}] {goal['text']}: {goal['measured']}")
    lines.append("")
    lines.append("every goal met" if report["met"] else "some goals NOT met")
    return "\n".join(lines)


def _rto(scenario: dict[str, Any]) -> str:
    """A killed kvsched replica: seconds from the kill until the restarted one serves (warm),
    and until the replicas agree on >= 95% of sampled decisions."""
    if scenario["name"] != "kvsched_kill":
        return "-"

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    return f"{seconds(scenario.get('rto_s'))} / {seconds(scenario.get('agreement_s'))}"


def run_command(args: Any) -> int:
    options = ChaosOptions(
        scenarios=tuple(args.scenario or (QUICK_SCENARIOS if args.quick else SCENARIOS)),
        transport=args.transport,
        fail_open=args.fail_open,
        observation=not args.single_filter,
        shape=replace(LoadShape(), rate=args.rate),
        timing=QUICK_TIMING if args.quick else Timing(),
        warmup_s=3.0 if args.quick else 8.0,
        keep_logs=None if args.keep_logs is None else Path(args.keep_logs),
    )
    report = asyncio.run(run_chaos(options))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0 if report["met"] else 1
