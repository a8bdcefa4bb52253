"""PNG plots of replay reports: the TTFT CDF per policy, and the hit ratio per policy against
its ceilings (the infinite-cache oracle and, for simulated runs, the pooled-capacity ceiling).

Drawn on matplotlib's Agg canvas through the object API (no pyplot state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scheduler.replay.report import labelled

PLOT_FILE = "replay.png"


def plot_ttft_cdf(ax: Axes, samples_ms: Mapping[str, Sequence[float]]) -> None:
    for label, values in samples_ms.items():
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        if ordered.size:
            ax.step(ordered, np.arange(1, ordered.size + 1) / ordered.size, where="post", label=label)
    if any(len(v) for v in samples_ms.values()):
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("share of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, which="both", alpha=0.3)


def _ceiling(ax: Axes, values: list[float | None], *, name: str, color: str, style: str) -> None:
    """One dashed line when every bar shares the ceiling, a mark over each bar otherwise."""
    known = [v for v in values if v is not None]
    if not known:
        return
    if len(set(known)) == 1:
        ax.axhline(known[0], color=color, linestyle=style, label=f"{name} {known[0]:.3f}")
        return
    labelled_once = False
    for x, value in enumerate(values):
        if value is not None:
            # Matplotlib leaves labels starting with "_" out of the legend.
            label = "_" + name if labelled_once else name
            ax.hlines(value, x - 0.4, x + 0.4, color=color, linestyle=style, label=label)
            labelled_once = True


def plot_hit_ratio(ax: Axes, reports: Mapping[str, Mapping[str, Any]]) -> None:
    names = list(reports)
    hits = [reports[n].get("hit_ratio") for n in names]
    ax.bar(range(len(names)), [h or 0.0 for h in hits], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=20)
    for x, hit in enumerate(hits):
        ax.annotate("n/a" if hit is None else f"{hit:.3f}", (x, hit or 0.0), ha="center", va="bottom")
    _ceiling(
        ax, [reports[n].get("oracle_hit_ratio") for n in names], name="oracle", color="tab:red", style="--"
    )
    _ceiling(
        ax,
        [reports[n].get("capacity_ceiling_hit_ratio") for n in names],
        name="capacity ceiling",
        color="tab:orange",
        style=":",
    )
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("cached prompt tokens / prompt tokens")
    ax.set_title("Prefix-cache hit ratio")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")


def replay_figure(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    ttft_ms: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """The TTFT CDF beside the hit ratios. TTFT samples come from ``ttft_ms`` when given, else
    from each report's ``samples.ttft_ms``."""
    runs = labelled(reports)
    samples = (
        dict(ttft_ms)
        if ttft_ms is not None
        else {label: list(report.get("samples", {}).get("ttft_ms", [])) for label, report in runs.items()}
    )
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    cdf_ax, hit_ax = fig.subplots(1, 2)
    plot_ttft_cdf(cdf_ax, samples)
    plot_hit_ratio(hit_ax, runs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_plots(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    directory: str | Path,
    *,
    title: str = "",
    ttft_ms: Mapping[str, Sequence[float]] | None = None,
) -> list[Path]:
    """Write ``replay.png`` (``replay_figure``) into ``directory``; return its path."""
    fig = replay_figure(reports, title=title, ttft_ms=ttft_ms)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLOT_FILE
    fig.savefig(path, dpi=110)
    return [path]
