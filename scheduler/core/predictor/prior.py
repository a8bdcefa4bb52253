"""The analytic prior: linear latency laws that answer before enough samples exist to train on.

    TTFT = base + a * (uncached + queued_prefill_tokens) + b * own_attention_pairs
                + c * kv_usage + d * decode_batch
                + e * (uncached + queued_prefill_tokens) * decode_batch
                + g * decode_context_tokens
    TPOT = base + f * decode_batch

A first token waits for the prefill queued ahead of it and its own (``a`` per token, the
same for both: a queued token costs what an own token costs, and own tokens are in every
sample, so ``a`` is learned before any queue is seen and carries over to queues never seen),
its own prefill's attention, quadratic in the context (``b``), and the engine iterations it
runs in, each longer for the decode batch's KV reads (``c``, scraped KV usage) and
per-sequence work (``d``), and that per-sequence work and those reads again in every further
iteration the prefill ahead and its own take (``e``: a prefill of many chunks behind a large
decode batch drains slower than the same prefill alone), and the decode batch's reads
counted per request (``g``, kvsched's own decoding requests' prompt tokens: KV usage counts
a prefix the batch shares once, the iterations read it once per request); the decode batch
it joins is what slows each later token. These are the terms of an engine iteration's cost
(sim/latency.py derives them for Llama-3-8B on an H100), so the law extrapolates: fitted on
the first third of a ``kvsched bench policies --size short`` run and scored on the rest, its
TTFT MAPE (before ``e``) was 18.6-23.6% on the conversation, chat-saturated, rag and agentic
rows against 27.6-65.0% for the law it replaces (base + the estimated prefill milliseconds
at the measured drain rate + a cost per scraped waiting request: the drain rate is measured
over queueing and decode iterations and prices an idle engine's prefill 1.3x too slow on the
conversation trace, and the waiting count, a lagging proxy of the queue, took coefficients
of up to 560 ms a request). The ``e`` term came later, for loads that grow through a run:
without it the prior, and the trees correcting it, under-predicted the busiest part of the
agentic and chat rows at saturation (median predicted/observed 0.81-0.89 on agentic), where
the decode batch was at its largest; with it, TTFT MAPE on agentic saturated 16.6 -> 15.2%
(seeds 1 and 2: 19.4 -> 15.5%, 17.4 -> 15.3%) and chat saturated 21.3 -> 19.2%, the other
rows within 0.2 points, the same decisions. The ``g`` term then took agentic saturated to
14.7% (seeds 1 and 2: 15.5 -> 15.0%, 15.3 -> 14.2%) and chat saturated to 17.4% (seeds 1 and
2: 20.4 -> 19.0%, 19.6 -> 18.0%), again with the same decisions.

The coefficients start from PriorCoefficients and are refitted by least squares on observed
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
    DECODE_CONTEXT_TOKENS,
    KV_USAGE,
    OWN_ATTENTION_PAIRS,
    QUEUED_PREFILL_TOKENS,
    UNCACHED_TOKENS,
    FeatureMatrix,
)

TPOT_TERMS: Final = (DECODE_BATCH,)

Floats = npt.NDArray[np.float64]


def _design(features: FeatureMatrix, terms: tuple[int, ...]) -> Floats:
    design = np.ones((features.shape[0], len(terms) + 1), dtype=np.float64)
    design[:, 1:] = features[:, terms]
    return design


TTFT_TERMS: Final = 6  # the TTFT law's coefficients after its base


def ttft_design(features: FeatureMatrix) -> Floats:
    """The TTFT law's columns: 1, prefill tokens ahead and own, own attention pairs, KV
    usage, decode batch, prefill tokens ahead and own x decode batch, and the decoding
    requests' prompt tokens."""
    design = np.ones((features.shape[0], 1 + TTFT_TERMS), dtype=np.float64)
    # Added in float64, as predict_row adds them (a float32 sum would round first).
    design[:, 1] = features[:, UNCACHED_TOKENS]
    design[:, 1] += features[:, QUEUED_PREFILL_TOKENS]
    design[:, 2] = features[:, OWN_ATTENTION_PAIRS]
    design[:, 3] = features[:, KV_USAGE]
    design[:, 4] = features[:, DECODE_BATCH]
    design[:, 5] = design[:, 1] * design[:, 4]
    design[:, 6] = features[:, DECODE_CONTEXT_TOKENS]
    return design


def nonnegative_least_squares(design: Floats, target: Floats, weights: Floats) -> Floats:
    """Weighted least squares with every coefficient >= 0 (a small active-set loop).

    The most negative coefficient is pinned to 0 and the rest refitted until none is
    negative; with at most seven columns this ends within seven solves.
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


def _refit_one(design: Floats, target: Floats, min_samples: int) -> tuple[tuple[float, ...], int] | None:
    """(coefficients, samples used), or None when there are too few samples to refit.
    Samples weigh 1 / the observed latency."""
    usable = np.isfinite(target) & (target > 0.0)
    count = int(usable.sum())
    if count < min_samples:
        return None
    coef = nonnegative_least_squares(design[usable], target[usable], 1.0 / target[usable])
    if not np.all(np.isfinite(coef)):
        return None
    return tuple(float(c) for c in coef), count


@dataclass(frozen=True, slots=True)
class PriorModel:
    """Coefficients [base, per-term...] of the two linear laws; immutable, refits return a copy."""

    # base, per prefill token (ahead and own), per own attention pair, per unit of KV usage,
    # per request in the decode batch, per prefill token per request in the decode batch, per
    # prompt token decoding there
    ttft: tuple[float, ...]
    tpot: tuple[float, ...]  # base, per request in the decode batch
    ttft_fitted_on: int = 0  # samples of the last refit; 0: the configured defaults
    tpot_fitted_on: int = 0

    @staticmethod
    def from_coefficients(c: PriorCoefficients) -> PriorModel:
        return PriorModel(
            ttft=(
                c.ttft_base_ms,
                c.ttft_ms_per_uncached_token,
                c.ttft_ms_per_attention_pair,
                c.ttft_ms_at_full_kv_usage,
                c.ttft_ms_per_decode_request,
                c.ttft_ms_per_prefill_token_per_decode_request,
                c.ttft_ms_per_decode_context_token,
            ),
            tpot=(c.tpot_base_ms, c.tpot_ms_per_running_request),
        )

    def predict_ttft(self, features: FeatureMatrix) -> Floats:
        c = self.ttft
        x = ttft_design(features)
        # Term by term, in predict_row's order (a matrix product may add in another).
        ttft: Floats = (
            c[0]
            + c[1] * x[:, 1]
            + c[2] * x[:, 2]
            + c[3] * x[:, 3]
            + c[4] * x[:, 4]
            + c[5] * x[:, 5]
            + c[6] * x[:, 6]
        )
        return ttft

    def predict_tpot(self, features: FeatureMatrix) -> Floats:
        c = self.tpot
        return c[0] + c[1] * features[:, DECODE_BATCH].astype(np.float64)

    def predict_row(self, row: FeatureMatrix) -> tuple[float, float]:
        """(TTFT, TPOT) ms of one row (shape (NUM_FEATURES,)), bit for bit ``predict_ttft`` and
        ``predict_tpot`` on it (the same float64 operations in the same order), at a fraction
        of the cost (a pick predicts its chosen endpoint alone; the array
        calls were 5.6% of a pick at 8 endpoints, py-spy)."""
        c, d = self.ttft, self.tpot
        prefill = float(row[UNCACHED_TOKENS]) + float(row[QUEUED_PREFILL_TOKENS])
        batch = float(row[DECODE_BATCH])
        ttft = (
            c[0]
            + c[1] * prefill
            + c[2] * float(row[OWN_ATTENTION_PAIRS])
            + c[3] * float(row[KV_USAGE])
            + c[4] * batch
            + c[5] * (prefill * batch)
            + c[6] * float(row[DECODE_CONTEXT_TOKENS])
        )
        tpot = d[0] + d[1] * batch
        return ttft, tpot

    def refit(
        self, features: FeatureMatrix, ttft_ms: Floats, tpot_ms: Floats, min_samples: int
    ) -> PriorModel:
        """A prior refitted on these samples; a target with fewer than min_samples keeps its coefficients."""
        prior = self
        ttft = _refit_one(ttft_design(features), ttft_ms, min_samples)
        if ttft is not None:
            prior = replace(prior, ttft=ttft[0], ttft_fitted_on=ttft[1])
        tpot = _refit_one(_design(features, TPOT_TERMS), tpot_ms, min_samples)
        if tpot is not None:
            prior = replace(prior, tpot=tpot[0], tpot_fitted_on=tpot[1])
        return prior
