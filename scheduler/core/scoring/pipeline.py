"""Filters -> scorers -> picker over one snapshot of endpoints.

The pipeline is immutable: one object holds one configuration, so every pick sees one
consistent set of weights and limits. Reloading means building a new pipeline
(:meth:`SchedulingPipeline.with_config`) and swapping the reference the caller holds;
construction does no more than look up the scorers' weights.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from scheduler.core.scoring.candidates import (
    Candidates,
    LatencyEstimator,
    build_candidates,
    metrics_trusted,
)
from scheduler.core.scoring.config import BalanceGuard, ScoringConfig
from scheduler.core.scoring.decision import Decision
from scheduler.core.scoring.filters import NO_ELIGIBLE_IN_SUBSET, Filter, default_filters
from scheduler.core.scoring.picker import (
    TieBreak,
    order_by_load,
    order_by_score,
    sample_softmax,
    stable_hash64,
)
from scheduler.core.scoring.registry import SCORERS
from scheduler.core.scoring.scorers import Scorer, default_scorers, relative_to_best
from scheduler.core.scoring.types import EndpointState, PickRequest, PrefixMatch

# Below every feasible candidate's total (totals lie in [0, 1]): SLO-infeasible candidates
# keep their relative order but rank after all feasible ones.
_INFEASIBLE_PENALTY = 2.0
# Below every balanced candidate's total, above every SLO-infeasible one's.
_OVERLOADED_PENALTY = 1.0
NO_CANDIDATE_MEETS_SLO = "no endpoint predicted to meet the SLO: fastest predicted first"


# The score and SLO stages hand on plain tuples (Scored, SLORanking below): a record per stage
# cost the split pick 6.7% at 8 endpoints (34 us a pick), tuples 4.4% (against the unsplit
# pick: median of 1,500 picks per version, interleaved in one process). The filter stage's
# result, built up filter by filter, stays a record.
@dataclass(slots=True)
class Eligible:
    """What the filter stage leaves: the candidates, and why each other endpoint is not one."""

    states: list[EndpointState]
    trusted: list[bool]  # per state: its scraped metrics are fresh enough to use
    filtered: dict[str, str] = field(default_factory=dict)  # name -> why it was removed
    over_limit: dict[str, str] = field(default_factory=dict)  # saturated, kept: all of them were
    saturated_reason: str = ""  # set when a soft filter would have removed every candidate
    emptied_reason: str = "no endpoints"  # why no state is left, when none is


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


# What the score stage produces, in candidate order: the candidates (with their predictions),
# the weighted scorers, scorer -> value per candidate, and the weighted totals in [0, 1].
Scored = tuple[Candidates, _ActiveScorers, dict[str, list[float]], list[float]]
# What the SLO stage decides: the values candidates are ordered by, per candidate whether it
# is predicted to meet the SLOs (None: no SLO stage), and NO_CANDIDATE_MEETS_SLO or "".
SLORanking = tuple[list[float], list[bool] | None, str]


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


def overloaded_positions(queue: Sequence[int], guard: BalanceGuard) -> list[int]:
    """Positions of the candidates with more than ``guard.abs_requests`` requests ahead
    beyond the least loaded candidate's and more than ``guard.rel`` times its count: SGLang
    cache-aware's imbalance test (``cache_aware.rs``: ``max_load - min_load >
    balance_abs_threshold && max_load > min_load * balance_rel_threshold``) applied to each
    candidate rather than to the pool's most loaded worker."""
    if guard.abs_requests <= 0 or len(queue) < 2:
        return []
    least = min(queue)
    limit = max(least + guard.abs_requests, least * guard.rel)
    return [i for i, q in enumerate(queue) if q > limit]


def weighted_totals(
    values: Sequence[Sequence[float]], weights: Sequence[float], weight_sum: float, count: int
) -> list[float]:
    """Per candidate, sum(weight * value) / weight_sum.

    ``weight_sum`` must be the left-to-right sum of ``weights``: each product is at most its
    weight and rounding is monotonic, so no total can round above 1. One pass over the
    columns for up to five scorers (the common case) instead of one pass per scorer.
    """
    if not values:
        return [0.0] * count
    # The default pipeline weighs five scorers. One expression adds left to right, as the
    # general loop below does, so the totals are the same to the bit.
    if len(values) == 5:
        a, b, c, d, e = weights
        return [
            (a * v + b * w + c * x + d * y + e * z) / weight_sum
            for v, w, x, y, z in zip(*values, strict=True)
        ]
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
        weights = self._config.weights
        # Weighted scorers by (predictions available, the request names an adapter): those
        # that read what a pick lacks sit it out.
        sets: dict[tuple[bool, bool], list[tuple[Scorer, float]]] = {
            (predicted, adapter): [] for predicted in (True, False) for adapter in (True, False)
        }
        for scorer in self._scorers:
            spec = SCORERS.get(scorer.name)
            if spec is None:
                raise ValueError(
                    f"scorer {scorer.name!r} is not registered, so it has no weight: register it with "
                    "register_scorer (scheduler.core.scoring.registry)"
                )
            # A scorer registered after this configuration was made weighs its default.
            weight = weights.get(scorer.name, spec.default_weight)
            if weight > 0.0:
                for (predicted, adapter), chosen in sets.items():
                    if (predicted or not spec.needs_predictions) and (adapter or not spec.needs_adapter):
                        chosen.append((scorer, weight))
        self._active = {kind: _ActiveScorers.of(pairs) for kind, pairs in sets.items()}
        self._predicted = self._active[True, True]
        self._unpredicted = self._active[False, True]

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
        fastest predicted first).

        Five stages, each its own method so a profile or a trace span can name it:
        :meth:`filter_endpoints`, :meth:`score_candidates`, :meth:`rank_by_slo`,
        :meth:`rank_by_balance`, :meth:`order_candidates`."""
        config = self._config
        eligible = self.filter_endpoints(request, endpoints)
        if not eligible.states:
            reason = NO_ELIGIBLE_IN_SUBSET if request.subset is not None else eligible.emptied_reason
            return Decision([], [], reason=reason, mode=config.mode, filtered=eligible.filtered)
        candidates, active, scores, totals = self.score_candidates(eligible, request, matches, estimator)
        ranking, feasible, slo_note = self.rank_by_slo(candidates, totals, request)
        ranking, overloaded = self.rank_by_balance(candidates, ranking)
        saturated = bool(eligible.saturated_reason)
        slot_picks: list[int] = []
        if request.spread_of > 1 and not saturated and config.mode == "max_score" and len(candidates) > 1:
            slot_picks = self.concurrent_picks(eligible, request, matches, estimator, candidates, ranking)
        order = self.order_candidates(ranking, candidates, request, saturated, rng, slot_picks)
        states = eligible.states
        return Decision(
            [states[i].name for i in order],
            [states[i].address for i in order],
            saturated=saturated,
            reason=eligible.saturated_reason,
            mode=config.mode,
            filtered=eligible.filtered,
            over_limit=eligible.over_limit,
            candidates=candidates,
            weights=dict(active.shares),
            scores=scores,
            totals=totals,
            slo_feasible=feasible,
            slo_note=slo_note,
            slot_picks=[states[i].name for i in slot_picks],
            overloaded=[] if saturated else [states[i].name for i in overloaded],
        )

    # --- stages ----------------------------------------------------------------------------

    def filter_endpoints(self, request: PickRequest, endpoints: Sequence[EndpointState]) -> Eligible:
        """Filter stage: drop the endpoints a hard filter rules out; keep every candidate
        when a soft filter would rule out all of them, and say so (``saturated_reason``)."""
        config = self._config
        states = list(endpoints)
        trusted = metrics_trusted(states, config.limits.metrics_stale_after_s)
        eligible = Eligible(states, trusted, {}, {})
        for endpoint_filter in self._filters:
            if not states:
                break
            rejected = endpoint_filter.reject(states, trusted, request, config)
            if not rejected:
                continue
            if endpoint_filter.soft and len(rejected) == len(states):
                eligible.saturated_reason = endpoint_filter.empty_reason
                for i, why in rejected.items():
                    eligible.over_limit[states[i].name] = why
                continue
            for i, why in rejected.items():
                eligible.filtered[states[i].name] = why
            states = [s for i, s in enumerate(states) if i not in rejected]
            trusted = [t for i, t in enumerate(trusted) if i not in rejected]
            eligible.states, eligible.trusted = states, trusted
            eligible.emptied_reason = endpoint_filter.empty_reason
        return eligible

    def score_candidates(
        self,
        eligible: Eligible,
        request: PickRequest,
        matches: Mapping[str, PrefixMatch],
        estimator: LatencyEstimator | None,
    ) -> Scored:
        """Score stage: the candidates' columns, their predicted latencies (with an
        estimator), every weighted scorer's values and the weighted totals."""
        config = self._config
        candidates = build_candidates(eligible.states, eligible.trusted, matches, request, config.tiers)
        if estimator is not None:
            estimate = estimator.estimate(candidates, request)
            candidates.predicted_ttft_ms = list(estimate.ttft_ms)
            candidates.predicted_tpot_ms = list(estimate.tpot_ms)
            candidates.prediction_source = estimate.source
        active = self._active[candidates.predicted_ttft_ms is not None, request.adapter is not None]
        scores = {scorer.name: scorer.score(candidates, request, config) for scorer in active.scorers}
        totals = weighted_totals(list(scores.values()), active.weights, active.weight_sum, len(candidates))
        return candidates, active, scores, totals

    def concurrent_picks(
        self,
        eligible: Eligible,
        request: PickRequest,
        matches: Mapping[str, PrefixMatch],
        estimator: LatencyEstimator | None,
        candidates: Candidates,
        ranking: list[float],
    ) -> list[int]:
        """Positions of the primaries of ``request.spread_of`` requests like this one picked
        one after another, each counted where it went before the next is picked: what one
        replica would do with the concurrent picks of all of them. Load ties go by
        ``request.spread_key``, so every replica computes the same list."""
        config = self._config
        key = request.spread_key
        tokens = float(request.prompt_tokens)
        picks: list[int] = []
        while True:
            primary = order_by_score(ranking, candidates, 1, config.tie_epsilon, self._tiebreak, key)[0]
            picks.append(primary)
            if len(picks) == request.spread_of:
                return picks
            states = list(eligible.states)
            state = states[primary]
            added = tokens * (1.0 - candidates.overlap[primary])
            states[primary] = replace(
                state,
                inflight_requests=state.inflight_requests + 1,
                inflight_prefill_tokens=state.inflight_prefill_tokens + int(added),
                queued_prefill_tokens=state.queued_prefill_tokens + added,
            )
            eligible = replace(eligible, states=states)
            candidates, _, _, totals = self.score_candidates(eligible, request, matches, estimator)
            ranking = self.rank_by_balance(candidates, self.rank_by_slo(candidates, totals, request)[0])[0]

    def rank_by_balance(self, candidates: Candidates, ranking: list[float]) -> tuple[list[float], list[int]]:
        """Balance stage: the candidates overloaded against the least loaded one
        (``ScoringConfig.balance``) rank after the others, keeping their relative order.
        Returns the ranking and their positions."""
        overloaded = overloaded_positions(candidates.queue, self._config.balance)
        if not overloaded:
            return ranking, overloaded
        penalised = list(ranking)
        for i in overloaded:
            penalised[i] -= _OVERLOADED_PENALTY
        return penalised, overloaded

    def rank_by_slo(self, candidates: Candidates, totals: list[float], request: PickRequest) -> SLORanking:
        """SLO stage: for a request with objectives and predictions, the candidates predicted
        to meet them rank first; when none is, ``slo_unmeetable`` decides. Otherwise the
        ranking is the totals themselves."""
        has_slo = request.slo_ttft_ms is not None or request.slo_tpot_ms is not None
        if not has_slo or candidates.predicted_ttft_ms is None:
            return totals, None, ""
        config = self._config
        feasible = meets_slo(candidates, request, config.slo_margin)
        meeting = sum(feasible)
        if meeting == 0:
            ranking = totals
            if config.slo_unmeetable == "fastest":
                ranking = relative_to_best(candidates.predicted_ttft_ms)
            return ranking, feasible, NO_CANDIDATE_MEETS_SLO
        if meeting < len(candidates):
            ranking = [t if ok else t - _INFEASIBLE_PENALTY for t, ok in zip(totals, feasible, strict=True)]
            return ranking, feasible, ""
        return totals, feasible, ""

    def order_candidates(
        self,
        ranking: list[float],
        candidates: Candidates,
        request: PickRequest,
        saturated: bool,
        rng: random.Random | None,
        slot_picks: Sequence[int] = (),
    ) -> list[int]:
        """Order stage: positions of the primary and its fallbacks, by ranking (near-ties to
        the least loaded), by softmax sampling, or by load alone when saturated. With
        ``slot_picks`` (a spread pick, ``concurrent_picks``) the primary is the request's
        slot of them."""
        config = self._config
        wanted = 1 + config.num_fallbacks
        primary: int | None = None
        if slot_picks:
            primary = slot_picks[request.spread_slot % len(slot_picks)]
        elif saturated:
            # Scores do not matter once everything is over a limit: list the least loaded.
            return order_by_load(
                range(len(candidates)), candidates, wanted, self._tiebreak, request.request_id
            )
        elif config.mode == "softmax" and len(candidates) > 1:
            chooser = rng if rng is not None else random.Random(stable_hash64(request.request_id))
            primary = sample_softmax(ranking, config.temperature, chooser)
        if primary is None:
            return order_by_score(
                ranking, candidates, wanted, config.tie_epsilon, self._tiebreak, request.request_id
            )
        # The primary chosen otherwise, the fallbacks by score.
        fallbacks = order_by_score(
            ranking,
            candidates,
            wanted - 1,
            config.tie_epsilon,
            self._tiebreak,
            request.request_id,
            exclude=primary,
        )
        return [primary, *fallbacks]
