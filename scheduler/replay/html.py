"""A replay report as one self-contained HTML page: the comparison table, the plots (PNG,
embedded as data URIs: the page needs no other file and no network) and each run's details.

The page shows what ``kvsched replay`` prints and plots, for people who would rather look than
read: the TTFT CDF and hit ratios (``plots.replay_figure``), TTFT/TPOT/E2E percentiles side by
side, requests per endpoint (how evenly a policy spread the load), and SLO attainment with
goodput when the runs carried objectives. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scheduler.replay.plots import replay_figure
from scheduler.replay.report import comparison_columns, comparison_rows, labelled

Reports = Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #1d2330; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #dde; }
table { border-collapse: collapse; margin: 0.5rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.3rem 0.7rem; border-bottom: 1px solid #e4e6ee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f5f9; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1rem; }
details { margin: 0.4rem 0; } summary { cursor: pointer; font-weight: 600; }
.note { color: #5a6275; font-size: 0.9rem; }
"""


def figure_data_uri(figure: Figure, *, dpi: int = 100) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure(width: float = 12, height: float = 4.2) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def latency_figure(runs: Mapping[str, Mapping[str, Any]]) -> Figure:
    """p50/p90/p99 of TTFT, TPOT and end-to-end latency, one bar group per percentile."""
    figure = _new_figure()
    axes = figure.subplots(1, 3)
    labels = list(runs)
    width = 0.8 / max(len(labels), 1)
    for ax, (key, name) in zip(
        axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")), strict=True
    ):
        percentiles = ("p50", "p90", "p99")
        for offset, label in enumerate(labels):
            summary = runs[label].get(key) or {}
            values = [summary.get(p) or 0.0 for p in percentiles]
            ax.bar(np.arange(3) + offset * width, values, width, label=label)
        ax.set_xticks(np.arange(3) + width * (len(labels) - 1) / 2, percentiles)
        ax.set_title(f"{name} (ms)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    return figure


def endpoint_figure(runs: Mapping[str, Mapping[str, Any]]) -> Figure | None:
    """Completed requests per serving endpoint, per run: how evenly each policy spread them."""
    endpoints = sorted({e for report in runs.values() for e in (report.get("per_endpoint") or {})})
    if not endpoints:
        return None
    figure = _new_figure(height=3.8)
    ax = figure.subplots()
    width = 0.8 / max(len(runs), 1)
    for offset, (label, report) in enumerate(runs.items()):
        counts = report.get("per_endpoint") or {}
        ax.bar(
            np.arange(len(endpoints)) + offset * width,
            [counts.get(e, 0) for e in endpoints],
            width,
            label=label,
        )
    ax.set_xticks(np.arange(len(endpoints)) + width * (len(runs) - 1) / 2, endpoints, rotation=20)
    ax.set_ylabel("completed requests")
    ax.set_title("Requests per endpoint")
    ax.legend()
    figure.tight_layout()
    return figure


def slo_figure(runs: Mapping[str, Mapping[str, Any]]) -> Figure | None:
    with_slo = {label: report for label, report in runs.items() if "slo_attainment" in report}
    if not with_slo:
        return None
    figure = _new_figure(height=3.8)
    attainment_ax, goodput_ax = figure.subplots(1, 2)
    labels = list(with_slo)
    attainment_ax.bar(
        labels, [100 * with_slo[label]["slo_attainment"] for label in labels], color="tab:green"
    )
    attainment_ax.set_ylim(0, 100)
    attainment_ax.set_title("SLO attainment (% of completed)")
    goodput_ax.bar(labels, [with_slo[label].get("goodput_rps", 0.0) for label in labels], color="tab:purple")
    goodput_ax.set_title("Goodput (requests within SLO per second)")
    for ax in (attainment_ax, goodput_ax):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def _details(label: str, report: Mapping[str, Any]) -> str:
    rows = []
    for key, value in report.items():
        if key == "samples":
            continue
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(_scalar(v) for v in value) or "-"
        rows.append((key, _scalar(value)))
    return f"<details><summary>{html.escape(label)}</summary>{_table(('field', 'value'), rows)}</details>"


def render_html(reports: Reports, *, title: str = "kvsched replay") -> str:
    """The whole page for one or several runs (a report, or ``{label: report}``)."""
    runs = labelled(reports)
    figures = [
        ("TTFT distribution and prefix-cache hits", replay_figure(runs)),
        ("Latency percentiles", latency_figure(runs)),
        ("Load across endpoints", endpoint_figure(runs)),
        ("Objectives", slo_figure(runs)),
    ]
    sections = [
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="{figure_data_uri(figure)}">'
        for name, figure in figures
        if figure is not None
    ]
    first = next(iter(runs.values()), {})
    context = ", ".join(
        f"{key} {_scalar(first[key])}" for key in ("workload", "mode", "workers", "requests") if key in first
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="note">{html.escape(context)}</p>'
        f"<h2>Comparison</h2>{_table(comparison_columns(runs), comparison_rows(runs))}"
        + "".join(sections)
        + "<h2>Every figure of every run</h2>"
        + "".join(_details(label, report) for label, report in runs.items())
        + "</body></html>\n"
    )
