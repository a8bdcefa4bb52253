"""The pipeline's answer, with everything needed to explain it afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.core.scoring.candidates import Candidates


@dataclass(slots=True, eq=False)
class Decision:
    """Ordered endpoints (primary first) or, when empty, the reason.

    ``saturated``: every eligible endpoint was over a saturation limit; ``endpoints`` then
    lists the least loaded of them, and the caller decides whether to shed or to queue.
    The per-candidate columns are kept as they are and turned into a dict only when
    :meth:`explain` is called, so a pick that is not audited pays nothing for it.
    """

    endpoints: list[str]  # names, primary first
    addresses: list[str]  # the same endpoints' addresses
    saturated: bool = False
    reason: str = ""  # why ``endpoints`` is empty, or why the decision is saturated
    mode: str = "max_score"
    filtered: dict[str, str] = field(default_factory=dict)  # name -> why it was not a candidate
    over_limit: dict[str, str] = field(default_factory=dict)  # saturated candidates kept anyway
    candidates: Candidates | None = None
    weights: dict[str, float] = field(default_factory=dict)  # scorer -> weight / sum of weights
    scores: dict[str, list[float]] = field(default_factory=dict)  # scorer -> raw value per candidate
    totals: list[float] = field(default_factory=list)  # weighted total per candidate, in [0, 1]
    # Per candidate: predicted to meet the request's SLOs (None: no SLO or no predictions).
    slo_feasible: list[bool] | None = None
    slo_note: str = ""  # set when no candidate was predicted to meet the SLOs
    # A spread pick (PickRequest.spread_of > 1): per replica slot, the endpoint one replica
    # would pick for that slot's request of as many concurrent ones; the primary is its own.
    slot_picks: list[str] = field(default_factory=list)
    # Candidates ranked after the others for holding far more requests than the least loaded
    # (``ScoringConfig.balance``): why a better total can come after a worse one.
    overloaded: list[str] = field(default_factory=list)

    @property
    def predicted(self) -> tuple[float, float, str] | None:
        """(TTFT ms, TPOT ms, source) predicted for the primary, when predictions were made."""
        candidates = self.candidates
        if candidates is None or candidates.predicted_ttft_ms is None or not self.endpoints:
            return None
        position = next(i for i, s in enumerate(candidates.states) if s.name == self.endpoints[0])
        tpot = candidates.predicted_tpot_ms
        return (
            candidates.predicted_ttft_ms[position],
            tpot[position] if tpot is not None else float("nan"),
            candidates.prediction_source,
        )

    @property
    def primary(self) -> str | None:
        return self.endpoints[0] if self.endpoints else None

    def explain(self) -> dict[str, Any]:
        """JSON-serialisable account of the decision, for the audit log."""
        explained: dict[str, Any] = {}
        candidates = self.candidates
        if candidates is not None:
            # Column by column: one comprehension per scorer instead of a dict per scorer per row.
            names = list(self.scores)
            # Values go out unrounded: rounding hundreds of floats costs more than the pick.
            raw = [self.scores[name] for name in names]
            weighted = [[self.weights[name] * v for v in self.scores[name]] for name in names]
            raw_rows = _rows(names, raw, len(candidates))
            weighted_rows = _rows(names, weighted, len(candidates))
            for state, trusted, total, matched, queue, work, raw_row, weighted_row in zip(
                candidates.states,
                candidates.trusted,
                self.totals,
                candidates.matched,
                candidates.queue,
                candidates.prefill_work,
                raw_rows,
                weighted_rows,
                strict=True,
            ):
                explained[state.name] = {
                    "address": state.address,
                    "total": total,
                    "scores": raw_row,
                    "weighted": weighted_row,
                    "matched_blocks": matched,
                    "queue": queue,
                    "prefill_work": work,
                    "metrics_trusted": trusted,
                }
            if candidates.predicted_ttft_ms is not None:
                tpot_values = candidates.predicted_tpot_ms
                tpot: list[float | None] = (
                    list(tpot_values) if tpot_values is not None else [None] * len(candidates)
                )
                predicted = zip(candidates.states, candidates.predicted_ttft_ms, tpot, strict=True)
                for state, ttft_ms, tpot_ms in predicted:
                    explained[state.name]["predicted_ttft_ms"] = ttft_ms
                    explained[state.name]["predicted_tpot_ms"] = tpot_ms
            if self.slo_feasible is not None:
                for state, ok in zip(candidates.states, self.slo_feasible, strict=True):
                    explained[state.name]["meets_slo"] = ok
        account = {
            "endpoints": list(self.endpoints),
            "addresses": list(self.addresses),
            "saturated": self.saturated,
            "reason": self.reason,
            "mode": self.mode,
            "weights": dict(self.weights),
            "candidates": explained,
            "filtered": dict(self.filtered),
            "over_limit": dict(self.over_limit),
            "prediction_source": candidates.prediction_source if candidates is not None else "",
            "slo_note": self.slo_note,
        }
        if self.overloaded:
            account["overloaded"] = list(self.overloaded)
        if self.slot_picks:
            # Why a spread pick's primary need not be the best total: it took its slot.
            account["slot_picks"] = list(self.slot_picks)
        return account


def _rows(names: list[str], columns: list[list[float]], count: int) -> list[dict[str, float]]:
    if not names:
        return [{} for _ in range(count)]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
