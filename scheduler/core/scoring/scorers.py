"""Scorers: one value in [0, 1] per candidate and aspect, higher is better.

Load scorers are relative to the best candidate, ``(best + 1) / (value + 1)``: the least
loaded gets 1 and a candidate with twice the (load + 1) gets 0.5. Relative rather than
absolute (``1 / (1 + q)``) so the same weights work for 16-token simulated blocks and
8k-token prompts, 2 pods and 200; relative to the best rather than to the worst
(``1 - q / max_q``) so one badly backed-up endpoint does not flatten the differences among
the others.

Each scorer is registered beside its class (``register_scorer``: name, class, default weight,
one-line description); the default pipeline builds every registered scorer in registration
order, which is also the order its weighted values are summed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from scheduler.core.scoring.candidates import Candidates
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.registry import SCORERS, register_scorer
from scheduler.core.scoring.types import PickRequest


@runtime_checkable
class Scorer(Protocol):
    """``name`` is the name the scorer is registered under, and selects its weight in
    ``ScoringConfig.weights``."""

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


register_scorer(
    "prefix_overlap",
    PrefixOverlapScorer,
    weight=1.0,
    description="Tier-weighted share of the prompt's blocks the endpoint already caches.",
)


class QueueDepthScorer:
    """Fewer requests ahead (kvsched's in-flight + trusted scraped waiting), relative to the best."""

    name = "queue_depth"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return relative_to_best(candidates.queue)


register_scorer(
    "queue_depth",
    QueueDepthScorer,
    weight=1.0,
    description="Fewer requests ahead: scraped waiting (when trusted) + kvsched's in-flight.",
)


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


register_scorer(
    "kv_utilization",
    KVUtilizationScorer,
    weight=0.5,
    description="More free KV cache: 1 - vllm:kv_cache_usage_perc (when trusted).",
)


class InflightLoadScorer:
    """Less prefill work ahead of this request's first token, relative to the best.

    The work is kvsched's in-flight prefill tokens there plus this request's uncached
    tokens there, so a cache hit also shortens the estimated wait. Request counts are left
    to the queue-depth scorer.
    """

    name = "inflight_load"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return relative_to_best(candidates.prefill_work)


register_scorer(
    "inflight_load",
    InflightLoadScorer,
    weight=1.5,
    description="Less prefill work ahead of this request's first token: kvsched's in-flight prefill "
    "tokens there plus this request's uncached tokens there.",
)


class PredictedLatencyScorer:
    """Lower predicted TTFT, relative to the best candidate.

    Runs only when the pipeline has a latency estimator (``needs_predictions``): the
    predictor's estimate folds cache benefit, queueing and the endpoint's own speed into
    the one quantity users feel.
    """

    name = "predicted_latency"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        predicted = candidates.predicted_ttft_ms
        if predicted is None:
            return [1.0] * len(candidates)
        return relative_to_best(predicted)


register_scorer(
    "predicted_latency",
    PredictedLatencyScorer,
    weight=0.0,
    description="Lower predicted TTFT there (the latency predictor's estimate, relative to the best "
    "candidate); used only when a predictor is running.",
    needs_predictions=True,
)


def default_scorers() -> list[Scorer]:
    """One of every registered scorer, in registration order."""
    return [build_scorer(name) for name in SCORERS]


def build_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``, checked to be one and to answer to that name."""
    scorer = SCORERS[name].factory()
    if not isinstance(scorer, Scorer):
        raise TypeError(f"scorer {name!r}: its factory built {scorer!r}, which has no name and score()")
    if scorer.name != name:
        raise ValueError(f"scorer registered as {name!r} calls itself {scorer.name!r}")
    return scorer
