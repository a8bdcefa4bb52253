"""Filters -> scorers -> picker over one snapshot of endpoints.

The pipeline is immutable: one object holds one configuration, so every pick sees one
consistent set of weights and limits. Reloading means building a new pipeline
(:meth:`SchedulingPipeline.with_config`) and swapping the reference the caller holds;
construction does no more than look up the scorers' weights.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scheduler.core.scoring.candidates import (
    Candidates,
    LatencyEstimator,
    build_candidates,
    metrics_trusted,
)
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.decision import Decision
from scheduler.core.scoring.filters import NO_ELIGIBLE_IN_SUBSET, Filter, default_filters
from scheduler.core.scoring.picker import (
    TieBreak,
    order_by_load,
    order_by_score,
    sample_softmax,
    stable_hash64,
)
from scheduler.core.scoring.scorers import Scorer, default_scorers, relative_to_best
from scheduler.core.scoring.types import EndpointState, PickRequest, PrefixMatch

# Below every feasible candidate's total (totals lie in [0, 1]): SLO-infeasible candidates
# keep their relative order but rank after all feasible ones.
_INFEASIBLE_PENALTY = 2.0
NO_CANDIDATE_MEETS_SLO = "no endpoint predicted to meet the SLO: fastest predicted first"


@dataclass(frozen=True, slots=True)
class _ActiveScorers:
    """The scorers with a weight, their weights, and the weights' sum, for one kind of pick."""

    scorers: tuple[Scorer, ...]
    weights: tuple[float, ...]
    weight_sum: float
    shares: dict[str, float]  # scorer -> weight / sum

    @classmethod
    def of(cls, pairs: Sequence[tuple[Scorer, float]]) -> _ActiveScorers:
        weight_sum = 0.0
        for _, weight in pairs:
            # Summed in the same order as the totals, so no total can round above 1.
            weight_sum += weight
        return cls(
            tuple(scorer for scorer, _ in pairs),
            tuple(weight for _, weight in pairs),
            weight_sum,
            {scorer.name: weight / weight_sum for scorer, weight in pairs},
        )


def meets_slo(candidates: Candidates, request: PickRequest, margin: float) -> list[bool]:
    """Per candidate: predicted TTFT and TPOT within (1 - margin) x the request's objectives."""
    keep = 1.0 - margin
    count = len(candidates)
    ok = [True] * count
    if request.slo_ttft_ms is not None and candidates.predicted_ttft_ms is not None:
        limit = request.slo_ttft_ms * keep
        ok = [o and t <= limit for o, t in zip(ok, candidates.predicted_ttft_ms, strict=True)]
    if request.slo_tpot_ms is not None and candidates.predicted_tpot_ms is not None:
        limit = request.slo_tpot_ms * keep
        ok = [o and t <= limit for o, t in zip(ok, candidates.predicted_tpot_ms, strict=True)]
    return ok


def weighted_totals(
    values: Sequence[Sequence[float]], weights: Sequence[float], weight_sum: float, count: int
) -> list[float]:
    """Per candidate, sum(weight * value) / weight_sum.

    ``weight_sum`` must be the left-to-right sum of ``weights``: each product is at most its
    weight and rounding is monotonic, so no total can round above 1. One pass over the
    columns for up to four scorers (the common case) instead of one pass per scorer.
    """
    if not values:
        return [0.0] * count
    if len(values) == 4:
        a, b, c, d = weights
        return [(a * w + b * x + c * y + d * z) / weight_sum for w, x, y, z in zip(*values, strict=True)]
    if len(values) == 3:
        a, b, c = weights
        return [(a * x + b * y + c * z) / weight_sum for x, y, z in zip(*values, strict=True)]
    if len(values) == 2:
        a, b = weights
        return [(a * x + b * y) / weight_sum for x, y in zip(*values, strict=True)]
    totals = [weights[0] * v for v in values[0]]
    for weight, column in zip(weights[1:-1], values[1:-1], strict=True):
        totals = [t + weight * v for t, v in zip(totals, column, strict=True)]
    if len(values) == 1:
        return [t / weight_sum for t in totals]
    last_weight = weights[-1]
    return [(t + last_weight * v) / weight_sum for t, v in zip(totals, values[-1], strict=True)]


class SchedulingPipeline:
    """One configuration's filters, scorers and picker."""

    __slots__ = (
        "_config",
        "_filters",
        "_predicted",
        "_scorers",
        "_tiebreak",
        "_unpredicted",
    )

    def __init__(
        self,
        config: ScoringConfig | None = None,
        *,
        filters: Sequence[Filter] | None = None,
        scorers: Sequence[Scorer] | None = None,
    ) -> None:
        self._config = config if config is not None else ScoringConfig()
        self._filters: tuple[Filter, ...] = tuple(filters if filters is not None else default_filters())
        self._scorers: tuple[Scorer, ...] = tuple(scorers if scorers is not None else default_scorers())
        self._tiebreak = TieBreak()
        names = [scorer.name for scorer in self._scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique, got {names}")
        configured = self._config.weights.model_dump()
        active: list[tuple[Scorer, float]] = []
        for scorer in self._scorers:
            if scorer.name not in configured:
                raise ValueError(f"scorer {scorer.name!r} has no weight in ScoringConfig.weights")
            weight = float(configured[scorer.name])
            if weight > 0.0:
                active.append((scorer, weight))
        # Scorers that read predictions sit out the picks made without them.
        self._predicted = _ActiveScorers.of(active)
        self._unpredicted = _ActiveScorers.of(
            [(s, w) for s, w in active if not getattr(s, "needs_predictions", False)]
        )

    @property
    def config(self) -> ScoringConfig:
        return self._config

    @property
    def uses_predictions(self) -> bool:
        """Some weighted scorer reads latency predictions."""
        return len(self._predicted.scorers) > len(self._unpredicted.scorers)

    @property
    def filters(self) -> tuple[Filter, ...]:
        return self._filters

    @property
    def scorers(self) -> tuple[Scorer, ...]:
        return self._scorers

    def with_config(self, config: ScoringConfig) -> SchedulingPipeline:
        """The same filters and scorers under another configuration."""
        return SchedulingPipeline(config, filters=self._filters, scorers=self._scorers)

    def pick(
        self,
        request: PickRequest,
        endpoints: Sequence[EndpointState],
        matches: Mapping[str, PrefixMatch],
        rng: random.Random | None = None,
        estimator: LatencyEstimator | None = None,
    ) -> Decision:
        """Order the eligible endpoints for ``request``; ``matches`` maps endpoint names to
        their prefix match (absent: nothing cached). ``rng`` drives softmax sampling; without
        it a softmax pick is seeded from the request id. ``estimator`` predicts each
        candidate's latency: it feeds the predicted-latency scorer and, for a request with
        SLOs, ranks the candidates predicted to meet them first (or, when none is, the
        fastest predicted first)."""
        config = self._config
        states = list(endpoints)
        trusted = metrics_trusted(states, config.limits.metrics_stale_after_s)
        filtered: dict[str, str] = {}
        over_limit: dict[str, str] = {}
        saturated_reason = ""
        emptied_reason = "no endpoints"
        for endpoint_filter in self._filters:
            if not states:
                break
            rejected = endpoint_filter.reject(states, trusted, request, config)
            if not rejected:
                continue
            if endpoint_filter.soft and len(rejected) == len(states):
                saturated_reason = endpoint_filter.empty_reason
                for i, why in rejected.items():
                    over_limit[states[i].name] = why
                continue
            for i, why in rejected.items():
                filtered[states[i].name] = why
            states = [s for i, s in enumerate(states) if i not in rejected]
            trusted = [t for i, t in enumerate(trusted) if i not in rejected]
            emptied_reason = endpoint_filter.empty_reason
        if not states:
            reason = NO_ELIGIBLE_IN_SUBSET if request.subset is not None else emptied_reason
            return Decision([], [], reason=reason, mode=config.mode, filtered=filtered)

        candidates = build_candidates(states, trusted, matches, request, config.tiers)
        count = len(states)
        if estimator is not None:
            estimate = estimator.estimate(candidates, request)
            candidates.predicted_ttft_ms = list(estimate.ttft_ms)
            candidates.predicted_tpot_ms = list(estimate.tpot_ms)
            candidates.prediction_source = estimate.source
        active = self._unpredicted if candidates.predicted_ttft_ms is None else self._predicted
        scores = {scorer.name: scorer.score(candidates, request, config) for scorer in active.scorers}
        totals = weighted_totals(list(scores.values()), active.weights, active.weight_sum, count)

        ranking = totals
        feasible: list[bool] | None = None
        slo_note = ""
        has_slo = request.slo_ttft_ms is not None or request.slo_tpot_ms is not None
        if has_slo and candidates.predicted_ttft_ms is not None:
            feasible = meets_slo(candidates, request, config.slo_margin)
            meeting = sum(feasible)
            if meeting == 0:
                slo_note = NO_CANDIDATE_MEETS_SLO
                if config.slo_unmeetable == "fastest":
                    ranking = relative_to_best(candidates.predicted_ttft_ms)
            elif meeting < count:
                ranking = [
                    t if ok else t - _INFEASIBLE_PENALTY for t, ok in zip(totals, feasible, strict=True)
                ]

        wanted = 1 + config.num_fallbacks
        saturated = bool(saturated_reason)
        softmax = config.mode == "softmax"
        if saturated:
            # Scores do not matter once everything is over a limit: list the least loaded.
            order = order_by_load(range(count), candidates, wanted, self._tiebreak, request.request_id)
        elif softmax and count > 1:
            chooser = rng if rng is not None else random.Random(stable_hash64(request.request_id))
            primary = sample_softmax(ranking, config.temperature, chooser)
            fallbacks = order_by_score(
                ranking,
                candidates,
                wanted - 1,
                config.tie_epsilon,
                self._tiebreak,
                request.request_id,
                exclude=primary,
            )
            order = [primary, *fallbacks]
        else:
            order = order_by_score(
                ranking, candidates, wanted, config.tie_epsilon, self._tiebreak, request.request_id
            )
        return Decision(
            [states[i].name for i in order],
            [states[i].address for i in order],
            saturated=saturated,
            reason=saturated_reason,
            mode=config.mode,
            filtered=filtered,
            over_limit=over_limit,
            candidates=candidates,
            weights=dict(active.shares),
            scores=scores,
            totals=totals,
            slo_feasible=feasible,
            slo_note=slo_note,
        )
