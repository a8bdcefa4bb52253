"""The replay report: one JSON object per run, built the same way for live and simulated runs.

``build_report`` is a pure function of per-request outcomes. Percentiles are numpy's
default method ("linear": interpolation between the two closest ranks, type 7 of Hyndman
and Fan). Latency statistics cover completed requests only; failed ones are counted and
their reasons tallied. The report is a plain dict, open to further keys (``extra``).

Keys: ``policy``, ``mode`` ("live" | "simulate"), ``workers``, ``requests``, ``completed``,
``failed``, ``ttft_ms`` / ``tpot_ms`` / ``e2e_ms`` (each ``{p50, p90, p99, mean}``, null
when nothing completed), ``hit_ratio`` (cached prompt tokens / prompt tokens over the
completed requests whose usage reported cached tokens; null when none did),
``oracle_hit_ratio``, ``throughput_rps`` (completed / makespan), ``duration_s`` (the
makespan: first start to last completion), ``output_tokens_per_s``, ``prompt_tokens``,
``cached_tokens``, ``usage_reported``, ``token_scale``, ``per_endpoint`` (completed
requests per serving endpoint, "-" when unknown), ``failures`` (reason -> count) and
``samples.ttft_ms`` (every completed request's TTFT, in completion-list order, for plots).
With objectives: ``slo_attainment`` (completed requests within their SLOs / completed),
``slo_attainment_all`` (/ all requests), ``goodput_rps`` (requests within SLO / makespan),
``slo``. With predictions: ``ttft_mape``, ``tpot_mape`` (fractions), ``predictions``
(count by source), ``mape_scope``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

# The per-request records live with the workload records, below both replay/ and sim/.
from scheduler.workloads.model import RequestOutcome

if TYPE_CHECKING:
    from rich.table import Table

PERCENTILES = (50, 90, 99)


def latency_summary(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/mean in milliseconds of values in seconds (numpy "linear" percentiles)."""
    if not values_s:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    summary: dict[str, float | None] = {
        f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True)
    }
    summary["mean"] = float(ms.mean())
    return summary


def mean_absolute_percentage_error(pairs: Sequence[tuple[float, float]]) -> float | None:
    """mean(|predicted - observed| / observed) over (predicted, observed) pairs; observed > 0."""
    usable = [(p, o) for p, o in pairs if o > 0.0]
    if not usable:
        return None
    return float(np.mean([abs(p - o) / o for p, o in usable]))


def ttft_source(outcome: RequestOutcome) -> str | None:
    """What answered the request's TTFT prediction: "model" or "prior" (None: no prediction)."""
    return outcome.predicted_ttft_source or outcome.prediction_source


def scored_ttft_predictions(outcomes: Sequence[RequestOutcome]) -> tuple[list[RequestOutcome], str]:
    """The completed requests whose TTFT prediction is scored, and the scope: the trained
    model's predictions ("model"), or every prediction when the model never answered a TTFT
    ("all"). The scope is the TTFT's own source: a pick where the trees answered the TTFT
    and the prior the TPOT (source "mixed") is the model's TTFT prediction."""
    done = [o for o in outcomes if o.ok and o.predicted_ttft_ms is not None and o.first_token_s is not None]
    by_model = [o for o in done if ttft_source(o) == "model"]
    return (by_model, "model") if by_model else (done, "all")


def ttft_prediction_pairs(outcomes: Sequence[RequestOutcome]) -> list[tuple[float, float]]:
    """(predicted, observed) TTFT ms. Observed from the routing decision: the prediction is
    of the endpoint's TTFT, made when the request was routed; a wait in flow control's
    waiting room before that is no part of it."""
    return [
        (p, t * 1000.0)
        for o in outcomes
        if (t := o.routed_ttft_s) is not None and (p := o.predicted_ttft_ms) is not None
    ]


def prediction_accuracy(outcomes: Sequence[RequestOutcome], token_scale: float) -> dict[str, Any]:
    """TTFT/TPOT MAPE of the scheduler's predictions for the endpoint it picked.

    Every prediction was made at decision time, before its request's latency was observed
    or trained on, so each completed request is a held-out sample. The MAPE keys cover the
    trained model's predictions only (the analytic prior's are counted, not scored), or
    every prediction when the model never answered; the TTFT from the routing decision
    (``ttft_prediction_pairs``).
    """
    done = [o for o in outcomes if o.ok and o.predicted_ttft_ms is not None]
    if not done:
        return {}
    scored_ttft, scope = scored_ttft_predictions(outcomes)
    by_model = [o for o in done if o.prediction_source == "model"]
    scored = by_model or done
    tpot = [
        (p, t * 1000.0 / token_scale)
        for o in scored
        if (t := o.tpot_s) is not None and (p := o.predicted_tpot_ms) is not None
    ]
    return {
        "ttft_mape": mean_absolute_percentage_error(ttft_prediction_pairs(scored_ttft)),
        "tpot_mape": mean_absolute_percentage_error(tpot),
        "predictions": dict(Counter(o.prediction_source or "-" for o in done).most_common()),
        "mape_scope": scope,
    }


def slo_summary(outcomes: Sequence[RequestOutcome], duration_s: float, token_scale: float) -> dict[str, Any]:
    """SLO attainment and goodput, when any request carried an objective."""
    with_slo = [o for o in outcomes if o.slo_ttft_ms is not None or o.slo_tpot_ms is not None]
    if not with_slo:
        return {}
    done = [o for o in with_slo if o.ok]
    met = sum(1 for o in done if o.meets_slo(token_scale))
    ttft_objectives = sorted({o.slo_ttft_ms for o in with_slo if o.slo_ttft_ms is not None})
    tpot_objectives = sorted({o.slo_tpot_ms for o in with_slo if o.slo_tpot_ms is not None})
    return {
        # Share of completed requests within their objectives (the definition) ...
        "slo_attainment": met / len(done) if done else 0.0,
        # ... and of every request sent, so shedding cannot raise attainment by itself.
        "slo_attainment_all": met / len(with_slo),
        "goodput_rps": met / duration_s if duration_s > 0 else 0.0,
        "slo": {"ttft_ms": ttft_objectives, "tpot_ms": tpot_objectives, "requests": len(with_slo)},
    }


def _failure_reason(error: str) -> str:
    # "http 503: no endpoint" -> "http 503": counts group by kind, not by message.
    return error.split(":", 1)[0].strip() or "unknown"


def build_report(
    outcomes: Sequence[RequestOutcome],
    *,
    policy: str,
    mode: str,
    workers: int | None,
    oracle_hit_ratio: float | None,
    token_scale: float = 1.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one run. ``token_scale`` (real tokens per workload token, for scaled
    traces) converts TPOT and output tokens/s back to real tokens."""
    done = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    ttft = [v for o in done if (v := o.ttft_s) is not None]
    # One output token of a scaled trace stands for token_scale real ones.
    tpot = [v / token_scale for o in done if (v := o.tpot_s) is not None]
    e2e = [v for o in done if (v := o.e2e_s) is not None]
    reported = [o for o in done if o.cached_tokens is not None]
    prompt = sum(o.prompt_tokens for o in reported)
    cached = sum(o.cached_tokens or 0 for o in reported)
    ends = [o.end_s for o in done if o.end_s is not None]
    duration = max(ends) - min(o.start_s for o in outcomes) if ends else 0.0
    output_tokens = sum(o.completion_tokens for o in done) * token_scale
    report: dict[str, Any] = {
        "policy": policy,
        "mode": mode,
        "workers": workers,
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(failed),
        "ttft_ms": latency_summary(ttft),
        "tpot_ms": latency_summary(tpot),
        "e2e_ms": latency_summary(e2e),
        "hit_ratio": cached / prompt if prompt else None,
        "oracle_hit_ratio": oracle_hit_ratio,
        "throughput_rps": len(done) / duration if duration > 0 else 0.0,
        "duration_s": duration,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "usage_reported": len(reported),
        "token_count_mismatches": sum(1 for o in done if o.token_count_mismatch),
        "client_counted": sum(1 for o in done if o.client_completion_tokens is not None),
        "token_scale": token_scale,
        "per_endpoint": dict(sorted(Counter(o.endpoint or "-" for o in done).items())),
        "failures": dict(Counter(_failure_reason(o.error) for o in failed).most_common()),
        "samples": {"ttft_ms": [round(v * 1000.0, 3) for v in ttft]},
    }
    report.update(slo_summary(outcomes, duration, token_scale))
    report.update(prediction_accuracy(outcomes, token_scale))
    if extra:
        report.update(extra)
    return report


def labelled(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, Mapping[str, Any]]:
    """Reports keyed by label: a mapping as given, a sequence keyed by each report's policy."""
    if isinstance(reports, Mapping):
        return dict(reports)
    out: dict[str, Mapping[str, Any]] = {}
    for report in reports:
        label = str(report.get("policy", "run"))
        while label in out:
            label += "'"
        out[label] = report
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COMPARISON_COLUMNS = (
    "policy",
    "completed",
    "failed",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "hit ratio",
    "oracle",
    "req/s",
)
# Added when any report carries objectives or predictions.
SLO_COLUMNS = ("SLO met", "goodput/s")
PREDICTION_COLUMNS = ("TTFT MAPE",)


def comparison_columns(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> tuple[str, ...]:
    values = list(labelled(reports).values())
    columns: tuple[str, ...] = COMPARISON_COLUMNS
    if any("slo_attainment" in r for r in values):
        columns += SLO_COLUMNS
    if any(r.get("ttft_mape") is not None for r in values):
        columns += PREDICTION_COLUMNS
    return columns


def comparison_rows(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> list[tuple[str, ...]]:
    """One row of formatted cells per report, in ``comparison_columns`` order."""
    columns = comparison_columns(reports)
    rows: list[tuple[str, ...]] = []
    for label, report in labelled(reports).items():
        extra: tuple[str, ...] = ()
        if SLO_COLUMNS[0] in columns:
            extra += (_fmt(report.get("slo_attainment"), ".1%"), _fmt(report.get("goodput_rps"), ".2f"))
        if PREDICTION_COLUMNS[0] in columns:
            extra += (_fmt(report.get("ttft_mape"), ".1%"),)
        rows.append(
            (
                label,
                str(report["completed"]),
                str(report["failed"]),
                _fmt(report["ttft_ms"]["p50"], ",.0f"),
                _fmt(report["ttft_ms"]["p99"], ",.0f"),
                _fmt(report["tpot_ms"]["p50"], ",.1f"),
                _fmt(report.get("hit_ratio"), ".3f"),
                _fmt(report.get("oracle_hit_ratio"), ".3f"),
                _fmt(report.get("throughput_rps"), ".2f"),
                *extra,
            )
        )
    return rows


def comparison_table(
    reports: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]], *, title: str = ""
) -> Table:
    """A rich table comparing reports side by side (the caller prints it)."""
    from rich.table import Table

    table = Table(title=title or None)
    for column in comparison_columns(reports):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for row in comparison_rows(reports):
        table.add_row(*row)
    return table
