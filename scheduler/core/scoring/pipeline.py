"""Filters -> scorers -> picker over one snapshot of endpoints.

The pipeline is immutable: one object holds one configuration, so every pick sees one
consistent set of weights and limits. Reloading means building a new pipeline
(:meth:`SchedulingPipeline.with_config`) and swapping the reference the caller holds;
construction does no more than look up the scorers' weights.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from scheduler.core.scoring.candidates import build_candidates, metrics_trusted
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
from scheduler.core.scoring.scorers import Scorer, default_scorers
from scheduler.core.scoring.types import EndpointState, PickRequest, PrefixMatch


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
        "_active",
        "_active_weights",
        "_config",
        "_filters",
        "_scorers",
        "_tiebreak",
        "_weight_sum",
        "_weights",
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
        weight_sum = 0.0
        for scorer in self._scorers:
            if scorer.name not in configured:
                raise ValueError(f"scorer {scorer.name!r} has no weight in ScoringConfig.weights")
            weight = float(configured[scorer.name])
            if weight > 0.0:
                active.append((scorer, weight))
                # Summed in the same order as the totals, so no total can round above 1.
                weight_sum += weight
        self._active = tuple(active)
        self._active_weights = tuple(weight for _, weight in active)
        self._weight_sum = weight_sum
        self._weights = {scorer.name: weight / weight_sum for scorer, weight in active}

    @property
    def config(self) -> ScoringConfig:
        return self._config

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
    ) -> Decision:
        """Order the eligible endpoints for ``request``; ``matches`` maps endpoint names to
        their prefix match (absent: nothing cached). ``rng`` drives softmax sampling; without
        it a softmax pick is seeded from the request id."""
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
        scores = {scorer.name: scorer.score(candidates, request, config) for scorer, _ in self._active}
        totals = weighted_totals(list(scores.values()), self._active_weights, self._weight_sum, count)

        wanted = 1 + config.num_fallbacks
        saturated = bool(saturated_reason)
        softmax = config.mode == "softmax"
        if saturated:
            # Scores do not matter once everything is over a limit: list the least loaded.
            order = order_by_load(range(count), candidates, wanted, self._tiebreak, request.request_id)
        elif softmax and count > 1:
            chooser = rng if rng is not None else random.Random(stable_hash64(request.request_id))
            primary = sample_softmax(totals, config.temperature, chooser)
            fallbacks = order_by_score(
                totals,
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
                totals, candidates, wanted, config.tie_epsilon, self._tiebreak, request.request_id
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
            weights=dict(self._weights),
            scores=scores,
            totals=totals,
        )
