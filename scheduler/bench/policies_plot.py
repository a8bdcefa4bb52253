"""The PNG of ``kvsched bench policies``: per row, every policy's TTFT p50 and p99 and its hit
ratio against the capacity ceiling (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scheduler.bench.policies import KVSCHED, POLICIES


def save_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{row['workload']}\n{row['level']}" for row in rows]
    positions = list(range(len(rows)))
    figure = Figure(figsize=(max(8.0, 1.3 * len(rows)), 10.0))
    FigureCanvasAgg(figure)
    panels = figure.subplots(3, 1, sharex=True)
    metrics: tuple[tuple[str, Callable[[dict[str, Any]], float | None], bool], ...] = (
        ("TTFT p50 (ms, log)", lambda r: r["ttft_ms"]["p50"], True),
        ("TTFT p99 (ms, log)", lambda r: r["ttft_ms"]["p99"], True),
        ("hit ratio / capacity ceiling", lambda r: r["hit_vs_ceiling"], False),
    )
    policies = [name for name in POLICIES if any(name in row["policies"] for row in rows)]
    width = 0.8 / max(len(policies), 1)
    for axis, (title, value, log) in zip(panels, metrics, strict=True):
        for index, name in enumerate(policies):
            xs, ys = [], []
            for x, row in zip(positions, rows, strict=True):
                result = row["policies"].get(name)
                y = value(result) if result is not None else None
                if y is not None and y > 0:
                    xs.append(x - 0.4 + (index + 0.5) * width)
                    ys.append(y)
            own = name == KVSCHED
            axis.scatter(
                xs,
                ys,
                s=60 if own else 22,
                marker="*" if own else "o",
                color="black" if own else None,
                zorder=3 if own else 2,
                label=name,
            )
        axis.set_ylabel(title)
        if log:
            axis.set_yscale("log")
        axis.grid(True, axis="y", alpha=0.3)
    panels[2].axhline(0.97, color="grey", linestyle="--", linewidth=1)
    panels[0].legend(ncol=5, fontsize=7, loc="upper left")
    panels[2].set_xticks(positions)
    panels[2].set_xticklabels(labels, fontsize=8)
    figure.suptitle("kvsched bench policies: simulated pool, every policy per workload and load")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    return out
