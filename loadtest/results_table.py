"""Markdown table of a `kvsched replay --json` file holding {policy: report}.

python loadtest/results_table.py conversation.json
"""

from __future__ import annotations

import json
import sys


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(reports: dict[str, dict]) -> str:
    rr = reports.get("round_robin")
    lines = [
        "| policy | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | hit ratio | x oracle "
        "| x capacity ceiling | TTFT p50 / RR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, r in reports.items():
        hit, oracle, ceiling = r["hit_ratio"], r["oracle_hit_ratio"], r.get("capacity_ceiling_hit_ratio")
        vs_rr = r["ttft_ms"]["p50"] / rr["ttft_ms"]["p50"] if rr else None
        lines.append(
            f"| {policy} | {fmt(r['ttft_ms']['p50'], ',.0f')} | {fmt(r['ttft_ms']['p99'], ',.0f')} "
            f"| {fmt(r['tpot_ms']['p50'], '.1f')} | {fmt(hit, '.3f')} "
            f"| {fmt(hit / oracle if oracle else None, '.2f')} "
            f"| {fmt(hit / ceiling if ceiling else None, '.2f')} | {fmt(vs_rr, '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(table(json.load(handle)))
