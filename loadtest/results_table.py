"""Markdown table of a `kvsched replay --json` file holding {policy: report}.

python loadtest/results_table.py conversation.json

Ratios are against round_robin and, when the file has it, queue_only (the pipeline on queue
depth alone); the TTFT MAPE column appears when a report carries predictions.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(report: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    return report["ttft_ms"]["p50"] / base["ttft_ms"]["p50"] if base else None


def table(reports: dict[str, dict[str, Any]]) -> str:
    rr, queue_only = reports.get("round_robin"), reports.get("queue_only")
    mape = any(r.get("ttft_mape") is not None for r in reports.values())
    header = (
        "| policy | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | hit ratio | x oracle "
        "| x capacity ceiling | TTFT p50 / RR |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if queue_only:
        header, rule = header + " TTFT p50 / queue_only |", rule + "---:|"
    if mape:
        header, rule = header + " TTFT MAPE |", rule + "---:|"
    lines = [header, rule]
    for policy, r in reports.items():
        hit, oracle, ceiling = r["hit_ratio"], r["oracle_hit_ratio"], r.get("capacity_ceiling_hit_ratio")
        line = (
            f"| {policy} | {fmt(r['ttft_ms']['p50'], ',.0f')} | {fmt(r['ttft_ms']['p99'], ',.0f')} "
            f"| {fmt(r['tpot_ms']['p50'], '.1f')} | {fmt(hit, '.3f')} "
            f"| {fmt(hit / oracle if oracle else None, '.2f')} "
            f"| {fmt(hit / ceiling if ceiling else None, '.2f')} | {fmt(_ratio(r, rr), '.2f')} |"
        )
        if queue_only:
            line += f" {fmt(_ratio(r, queue_only), '.2f')} |"
        if mape:
            line += f" {fmt(r.get('ttft_mape'), '.1%')} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(table(json.load(handle)))
