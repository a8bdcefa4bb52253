"""The analytic prior: linear latency laws that answer before enough samples exist to train on.

    TTFT = base + a * estimated_prefill_ms + c * waiting
    TPOT = base + d * decode_batch

A request's own prefill and the prefill queued ahead of it, in time at the endpoint's
measured prefill rate (features.py, column 14), and the queue in front of it are what delay
a first token; the decode batch it joins is what slows each later token. The estimated
prefill is already in milliseconds, measured on the endpoints themselves, so its coefficient
``a`` stays as configured (1 by default) and refits learn ``base`` and ``c`` only: fitted on
early samples, taken while nothing queued, ``a`` came out at 0.6 on an agentic workload and
then under-predicted every queued request by 40%. The
coefficients start from PriorCoefficients and are refitted by least squares on observed
samples, weighted by 1 / latency so that the fit minimises relative error (the MAPE the
predictor is judged by) instead of being dominated by the longest requests. Coefficients
are kept non-negative: a negative per-token cost would extrapolate to negative latencies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from scheduler.core.predictor.config import PriorCoefficients
from scheduler.core.predictor.features import (
    DECODE_BATCH,
    ESTIMATED_PREFILL_MS,
    WAITING,
    FeatureMatrix,
)

TTFT_TERMS: Final = (WAITING,)  # refitted; the estimated prefill keeps its coefficient
TPOT_TERMS: Final = (DECODE_BATCH,)

Floats = npt.NDArray[np.float64]


def _design(features: FeatureMatrix, terms: tuple[int, ...]) -> Floats:
    design = np.ones((features.shape[0], len(terms) + 1), dtype=np.float64)
    design[:, 1:] = features[:, terms]
    return design


def nonnegative_least_squares(design: Floats, target: Floats, weights: Floats) -> Floats:
    """Weighted least squares with every coefficient >= 0 (a small active-set loop).

    The most negative coefficient is pinned to 0 and the rest refitted until none is
    negative; with at most four columns this ends within four solves.
    """
    a = design * weights[:, None]
    b = target * weights
    active = list(range(design.shape[1]))
    coef = np.zeros(design.shape[1], dtype=np.float64)
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        worst = int(np.argmin(solution))
        if solution[worst] >= 0.0:
            coef[active] = solution
            return coef
        del active[worst]
    return coef


def _refit_one(
    features: FeatureMatrix,
    target: Floats,
    terms: tuple[int, ...],
    min_samples: int,
    weights_from: Floats | None = None,
) -> tuple[tuple[float, ...], int] | None:
    """(coefficients, samples used), or None when there are too few samples to refit.
    Samples weigh 1 / ``weights_from`` (the observed latency; default the target itself)."""
    observed = target if weights_from is None else weights_from
    usable = np.isfinite(target) & np.isfinite(observed) & (observed > 0.0)
    count = int(usable.sum())
    if count < min_samples:
        return None
    coef = nonnegative_least_squares(_design(features[usable], terms), target[usable], 1.0 / observed[usable])
    if not np.all(np.isfinite(coef)):
        return None
    return tuple(float(c) for c in coef), count


@dataclass(frozen=True, slots=True)
class PriorModel:
    """Coefficients [base, per-term...] of the two linear laws; immutable, refits return a copy."""

    ttft: tuple[float, ...]  # base, per estimated prefill millisecond, per waiting request
    tpot: tuple[float, ...]  # base, per request in the decode batch
    ttft_fitted_on: int = 0  # samples of the last refit; 0: the configured defaults
    tpot_fitted_on: int = 0

    @staticmethod
    def from_coefficients(c: PriorCoefficients) -> PriorModel:
        return PriorModel(
            ttft=(c.ttft_base_ms, c.ttft_per_estimated_prefill_ms, c.ttft_ms_per_waiting_request),
            tpot=(c.tpot_base_ms, c.tpot_ms_per_running_request),
        )

    def predict_ttft(self, features: FeatureMatrix) -> Floats:
        c = self.ttft
        ttft: Floats = (
            c[0] + c[1] * features[:, ESTIMATED_PREFILL_MS].astype(np.float64) + c[2] * features[:, WAITING]
        )
        return ttft

    def predict_tpot(self, features: FeatureMatrix) -> Floats:
        c = self.tpot
        return c[0] + c[1] * features[:, DECODE_BATCH].astype(np.float64)

    def predict_row(self, row: FeatureMatrix) -> tuple[float, float]:
        """(TTFT, TPOT) ms of one row (shape (NUM_FEATURES,)), bit for bit ``predict_ttft``
        and ``predict_tpot`` on it: the same operations on numpy scalars, which promote
        exactly as the arrays do, at a tenth of the cost (a pick predicts its chosen
        endpoint alone; the array calls were 5.6% of a pick at 8 endpoints, py-spy)."""
        c, d = self.ttft, self.tpot
        ttft = c[0] + c[1] * row[ESTIMATED_PREFILL_MS].astype(np.float64) + c[2] * row[WAITING]
        tpot = d[0] + d[1] * row[DECODE_BATCH].astype(np.float64)
        return float(ttft), float(tpot)

    def refit(
        self, features: FeatureMatrix, ttft_ms: Floats, tpot_ms: Floats, min_samples: int
    ) -> PriorModel:
        """A prior refitted on these samples; a target with fewer than min_samples keeps its coefficients."""
        prior = self
        per_prefill_ms = self.ttft[1]
        unexplained = ttft_ms - per_prefill_ms * features[:, ESTIMATED_PREFILL_MS].astype(np.float64)
        ttft = _refit_one(features, unexplained, TTFT_TERMS, min_samples, weights_from=ttft_ms)
        if ttft is not None:
            (base, per_waiting), count = ttft
            prior = replace(prior, ttft=(base, per_prefill_ms, per_waiting), ttft_fitted_on=count)
        tpot = _refit_one(features, tpot_ms, TPOT_TERMS, min_samples)
        if tpot is not None:
            prior = replace(prior, tpot=tpot[0], tpot_fitted_on=tpot[1])
        return prior
