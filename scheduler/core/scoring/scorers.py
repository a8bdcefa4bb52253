"""Scorers: one value in [0, 1] per candidate and aspect, higher is better.

Load scorers are relative to the best candidate, ``(best + 1) / (value + 1)``: the least
loaded gets 1 and a candidate with twice the (load + 1) gets 0.5. Relative rather than
absolute (``1 / (1 + q)``) so the same weights work for 16-token simulated blocks and
8k-token prompts, 2 pods and 200; relative to the best rather than to the worst
(``1 - q / max_q``) so one badly backed-up endpoint does not flatten the differences among
the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from scheduler.core.scoring.candidates import Candidates
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.types import PickRequest

SCORER_NAMES = ("prefix_overlap", "queue_depth", "kv_utilization", "inflight_load", "predicted_latency")


class Scorer(Protocol):
    """``name`` selects the scorer's weight in ``ScoringConfig.weights``."""

    @property
    def name(self) -> str: ...

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]: ...


def relative_to_best(values: Sequence[float]) -> list[float]:
    """Lower is better; the best gets 1, every value lands in (0, 1]."""
    best = min(values)
    # Loads are never negative in practice; shifting keeps a bad input inside (0, 1].
    offset = 1.0 if best >= 0 else 1.0 - best
    top = best + offset
    return [top / (value + offset) for value in values]


class PrefixOverlapScorer:
    """Tier-weighted matched blocks / prompt blocks."""

    name = "prefix_overlap"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return list(candidates.overlap)


class QueueDepthScorer:
    """Fewer requests ahead (kvsched's in-flight + trusted scraped waiting), relative to the best."""

    name = "queue_depth"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return relative_to_best(candidates.queue)


class KVUtilizationScorer:
    """1 - KV-cache usage; an endpoint whose usage is not trusted gets the trusted mean."""

    name = "kv_utilization"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        free = [
            0.0 if (u := s.kv_usage) >= 1.0 else (1.0 if u <= 0.0 else 1.0 - u) for s in candidates.states
        ]
        trusted = candidates.trusted
        if all(trusted):
            return free
        known = [f for f, t in zip(free, trusted, strict=True) if t]
        # Unknown usage counts as average: neither a reason to prefer nor to avoid the endpoint.
        # fsum: exactly rounded, so the mean does not depend on the endpoints' order.
        neutral = math.fsum(known) / len(known) if known else 0.5
        return [f if t else neutral for f, t in zip(free, trusted, strict=True)]


class InflightLoadScorer:
    """Less prefill work ahead of this request's first token, relative to the best.

    The work is kvsched's in-flight prefill tokens there plus this request's uncached
    tokens there, so a cache hit also shortens the estimated wait. Request counts are left
    to the queue-depth scorer.
    """

    name = "inflight_load"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return relative_to_best(candidates.prefill_work)


class PredictedLatencyScorer:
    """Lower predicted TTFT, relative to the best candidate.

    Runs only when the pipeline has a latency estimator (``needs_predictions``): the
    predictor's estimate folds cache benefit, queueing and the endpoint's own speed into
    the one quantity users feel.
    """

    name = "predicted_latency"
    needs_predictions = True

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        predicted = candidates.predicted_ttft_ms
        if predicted is None:
            return [1.0] * len(candidates)
        return relative_to_best(predicted)


def default_scorers() -> list[Scorer]:
    return [
        PrefixOverlapScorer(),
        QueueDepthScorer(),
        KVUtilizationScorer(),
        InflightLoadScorer(),
        PredictedLatencyScorer(),
    ]
