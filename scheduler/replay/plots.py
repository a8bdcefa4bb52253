"""PNG plots of replay reports: TTFT CDF per policy, hit ratio per policy (with the oracle)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def save_plots(
    reports: Mapping[str, dict[str, Any]], directory: str | Path, *, title: str = ""
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fig, (cdf_ax, hit_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, report in reports.items():
        samples = np.sort(np.asarray(report.get("samples", {}).get("ttft_ms", []), dtype=float))
        if samples.size:
            cdf_ax.plot(samples, np.arange(1, samples.size + 1) / samples.size, label=policy)
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("TTFT (ms, log scale)")
    cdf_ax.set_ylabel("share of requests")
    cdf_ax.set_title("TTFT CDF")
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend()
    names = list(reports)
    hits = [reports[name].get("hit_ratio") or 0.0 for name in names]
    hit_ax.bar(names, hits, color="tab:blue")
    oracle = next((r.get("oracle_hit_ratio") for r in reports.values() if r.get("oracle_hit_ratio")), None)
    if oracle:
        hit_ax.axhline(oracle, color="tab:red", linestyle="--", label=f"oracle {oracle:.3f}")
    ceiling = next(
        (
            r.get("capacity_ceiling_hit_ratio")
            for r in reports.values()
            if r.get("capacity_ceiling_hit_ratio")
        ),
        None,
    )
    if ceiling:
        hit_ax.axhline(ceiling, color="tab:orange", linestyle=":", label=f"capacity ceiling {ceiling:.3f}")
    hit_ax.set_ylabel("cached prompt tokens / prompt tokens")
    hit_ax.set_title("Prefix-cache hit ratio")
    hit_ax.tick_params(axis="x", rotation=20)
    hit_ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / "replay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
