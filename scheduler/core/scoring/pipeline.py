"""Filters -> scorers -> picker, over one snapshot of endpoints.

Filters drop endpoints that must not get the request (unhealthy, outside the gateway's
subset hint) and mark saturated ones; scorers give every remaining candidate a value in
[0, 1] per aspect; the weighted mean orders them; the picker takes the best, breaking
ties and near-ties on load, never on list order (in the Mooncake trace every request
shares its first block, and an order tie-break would send everything to one worker).

The scorers are scale-free: load terms compare a candidate with the best candidate
(``(best + 1) / (value + 1)``), so the same weights work for 16-token simulated blocks and
for real prompts, for 2 pods and for 200.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.types import EndpointState, PickRequest, PrefixMatch

SCORER_NAMES = ("prefix_overlap", "queue_depth", "kv_utilization", "inflight_load")


@dataclass(slots=True)
class Candidate:
    """One endpoint under consideration, with what the scorers derived for it."""

    state: EndpointState
    fresh: bool  # scraped metrics recent enough to trust
    matched: float  # tier-weighted matched blocks
    queue: int  # queued + running requests, as best known
    prefill_work: float  # prefill tokens it must compute before this request's first token
    scores: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


class Scorer(Protocol):
    name: str

    def score(self, candidates: Sequence[Candidate], request: PickRequest) -> list[float]: ...


def _relative_to_best(values: Sequence[float]) -> list[float]:
    best = min(values)
    return [(best + 1.0) / (value + 1.0) for value in values]


class PrefixOverlapScorer:
    name = "prefix_overlap"

    def score(self, candidates: Sequence[Candidate], request: PickRequest) -> list[float]:
        blocks = request.prompt_blocks
        if blocks <= 0:
            return [0.0] * len(candidates)
        return [min(c.matched / blocks, 1.0) for c in candidates]


class QueueDepthScorer:
    name = "queue_depth"

    def score(self, candidates: Sequence[Candidate], request: PickRequest) -> list[float]:
        return _relative_to_best([float(c.queue) for c in candidates])


class KVUtilizationScorer:
    name = "kv_utilization"

    def score(self, candidates: Sequence[Candidate], request: PickRequest) -> list[float]:
        fresh = [c.state.kv_usage for c in candidates if c.fresh]
        # Unknown usage is assumed average rather than best or worst.
        neutral = sum(fresh) / len(fresh) if fresh else 0.5
        return [max(0.0, min(1.0, 1.0 - (c.state.kv_usage if c.fresh else neutral))) for c in candidates]


class InflightLoadScorer:
    """Prefill work ahead of this request's first token: what kvsched already sent there
    and has not seen start, plus this request's own uncached tokens there."""

    name = "inflight_load"

    def score(self, candidates: Sequence[Candidate], request: PickRequest) -> list[float]:
        return _relative_to_best([c.prefill_work for c in candidates])


def default_scorers() -> list[Scorer]:
    return [PrefixOverlapScorer(), QueueDepthScorer(), KVUtilizationScorer(), InflightLoadScorer()]


@dataclass(slots=True)
class Decision:
    endpoints: list[str]  # endpoint names, primary first
    saturated: bool = False
    reason: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    filtered: dict[str, str] = field(default_factory=dict)  # name -> why it was not a candidate
    weights: dict[str, float] = field(default_factory=dict)

    def explain(self) -> dict[str, Any]:
        """JSON-serialisable account of the decision, for the audit log and debugging."""
        return {
            "endpoints": list(self.endpoints),
            "saturated": self.saturated,
            "reason": self.reason,
            "weights": dict(self.weights),
            "candidates": {
                c.state.name: {
                    "total": round(c.total, 6),
                    "scores": {name: round(value, 6) for name, value in c.scores.items()},
                    "matched_blocks": round(c.matched, 3),
                    "queue": c.queue,
                    "prefill_work": round(c.prefill_work, 1),
                }
                for c in self.candidates
            },
            "filtered": dict(self.filtered),
        }


def _tiebreak(request_id: str, name: str) -> int:
    # Deterministic, uncorrelated with list order, different per request.
    digest = hashlib.blake2b(f"{request_id}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class SchedulingPipeline:
    """One configuration's filters, scorers and picker. Cheap to rebuild on reload."""

    def __init__(self, config: ScoringConfig | None = None, scorers: Sequence[Scorer] | None = None) -> None:
        self.config = config or ScoringConfig()
        self.scorers = list(scorers) if scorers is not None else default_scorers()
        weights = self.config.weights.model_dump()
        self._weights = {scorer.name: float(weights.get(scorer.name, 0.0)) for scorer in self.scorers}
        self._weight_sum = sum(self._weights.values()) or 1.0

    def _candidate(self, state: EndpointState, match: PrefixMatch | None, request: PickRequest) -> Candidate:
        limits = self.config.limits
        fresh = state.metrics_age_s is not None and state.metrics_age_s <= limits.metrics_stale_after_s
        tiers = self.config.tiers
        matched = 0.0
        if match is not None:
            matched = (
                match.gpu_blocks * tiers.gpu
                + match.cpu_blocks * tiers.cpu
                + match.storage_blocks * tiers.storage
            )
        queue = (
            max(state.waiting + state.running, state.inflight_requests) if fresh else state.inflight_requests
        )
        uncached = float(request.prompt_tokens)
        if request.prompt_blocks > 0:
            uncached = request.prompt_tokens * (1.0 - min(matched / request.prompt_blocks, 1.0))
        return Candidate(state, fresh, matched, queue, state.inflight_prefill_tokens + uncached)

    def _saturated(self, candidate: Candidate) -> bool:
        if not candidate.fresh:
            return False
        limits = self.config.limits
        state = candidate.state
        return state.waiting > limits.max_waiting or state.kv_usage > limits.max_kv_usage

    def pick(
        self,
        request: PickRequest,
        endpoints: Sequence[EndpointState],
        matches: Mapping[str, PrefixMatch],
        rng: random.Random | None = None,
    ) -> Decision:
        decision = Decision([], weights=dict(self._weights))
        subset = request.subset
        if subset is not None and not subset:
            decision.reason = "no eligible endpoint in subset hint"
            return decision
        candidates: list[Candidate] = []
        for state in endpoints:
            if not state.healthy:
                decision.filtered[state.name] = "unhealthy"
            elif subset is not None and state.address not in subset:
                decision.filtered[state.name] = "not in subset hint"
            else:
                candidates.append(self._candidate(state, matches.get(state.name), request))
        if not candidates:
            decision.reason = (
                "no eligible endpoint in subset hint"
                if subset is not None and endpoints
                else "no healthy endpoint"
            )
            return decision
        unsaturated = [c for c in candidates if not self._saturated(c)]
        if unsaturated:
            for c in candidates:
                if c not in unsaturated:
                    decision.filtered[c.state.name] = "saturated"
            candidates = unsaturated
        else:
            decision.saturated = True
        self._score(candidates, request)
        decision.candidates = candidates
        decision.endpoints = self._order(candidates, request, rng)
        return decision

    def _score(self, candidates: list[Candidate], request: PickRequest) -> None:
        weights = self._weights
        totals = [0.0] * len(candidates)
        for scorer in self.scorers:
            weight = weights[scorer.name]
            values = scorer.score(candidates, request)
            for i, (candidate, value) in enumerate(zip(candidates, values, strict=True)):
                candidate.scores[scorer.name] = value
                totals[i] += weight * value
        for candidate, total in zip(candidates, totals, strict=True):
            candidate.total = total / self._weight_sum

    def _order(
        self, candidates: list[Candidate], request: PickRequest, rng: random.Random | None
    ) -> list[str]:
        config = self.config
        request_id = request.request_id

        def load_key(c: Candidate) -> tuple[int, float, int]:
            return (c.queue, c.state.inflight_prefill_tokens, _tiebreak(request_id, c.state.name))

        if config.mode == "softmax" and len(candidates) > 1:
            chooser = rng or random.Random(_tiebreak(request_id, ""))
            best = max(c.total for c in candidates)
            weights = [math.exp((c.total - best) / config.temperature) for c in candidates]
            primary = chooser.choices(candidates, weights=weights, k=1)[0]
        else:
            best = max(c.total for c in candidates)
            near = [c for c in candidates if c.total >= best - config.tie_epsilon]
            primary = min(near, key=load_key)
        rest = sorted(
            (c for c in candidates if c is not primary),
            key=lambda c: (-c.total, *load_key(c)),
        )
        return [primary.state.name] + [c.state.name for c in rest[: config.num_fallbacks]]
