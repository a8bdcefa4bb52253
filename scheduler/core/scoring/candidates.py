"""The endpoints that passed the filters, as parallel columns the scorers read, and the
estimator that predicts their latencies.

Columns rather than one object per endpoint: a pick over 64 endpoints builds a handful of
lists with list comprehensions instead of 64 objects with 64 score dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler.core.scoring.config import TierWeights
from scheduler.core.scoring.types import EndpointState, LatencyEstimate, PickRequest, PrefixMatch


@dataclass(slots=True, eq=False)
class Candidates:
    """Position ``i`` of every column describes the same endpoint."""

    states: list[EndpointState]
    trusted: list[bool]  # scraped metrics fresh enough to use
    matched: list[float]  # tier-weighted leading blocks cached there
    overlap: list[float]  # matched / prompt_blocks, within [0, 1]
    # The overlap the load scorers price the request's prefill at: ``overlap``, or the
    # request's hot prefix where that is longer (core/hotprefix.py). The same list as
    # ``overlap`` when the request has none.
    priced_overlap: list[float]
    queue: list[int]  # requests ahead: kvsched's in-flight + scraped waiting (trusted only)
    prefill_work: list[float]  # prefill tokens ahead of this request's first token there
    # Filled in by the pipeline's latency estimator, when it has one.
    predicted_ttft_ms: list[float] | None = None
    predicted_tpot_ms: list[float] | None = None
    prediction_source: str = ""

    def __len__(self) -> int:
        return len(self.states)


class LatencyEstimator(Protocol):
    """Predicts every candidate's TTFT and TPOT for one request, in one batched call."""

    def estimate(self, candidates: Candidates, request: PickRequest) -> LatencyEstimate: ...


def metrics_trusted(states: Sequence[EndpointState], stale_after_s: float) -> list[bool]:
    return [(age := s.metrics_age_s) is not None and age <= stale_after_s for s in states]


def build_candidates(
    states: list[EndpointState],
    trusted: list[bool],
    matches: Mapping[str, PrefixMatch],
    request: PickRequest,
    tiers: TierWeights,
) -> Candidates:
    get = matches.get
    gpu = tiers.gpu
    cpu_discount, storage_discount = gpu - tiers.cpu, gpu - tiers.storage
    # Every matched block at the GPU value, less the discount for those held in slower tiers
    # (the index splits a match by each block's fastest tier, so the tiers sum to the total).
    # Indexed rather than named fields: this runs once per endpoint per pick.
    matched = [
        0.0
        if (m := get(s.name)) is None
        else (
            m[0] * gpu if not (m[2] or m[3]) else m[0] * gpu - m[2] * cpu_discount - m[3] * storage_discount
        )
        for s in states
    ]
    blocks = request.prompt_blocks
    if blocks > 0:
        per_block = 1.0 / blocks
        overlap = [0.0 if m <= 0.0 else (f if (f := m * per_block) < 1.0 else 1.0) for m in matched]
    else:
        overlap = [0.0] * len(states)
    queue = [
        s.inflight_requests + s.waiting if t else s.inflight_requests
        for s, t in zip(states, trusted, strict=True)
    ]
    priced = overlap
    if request.hot_prefix_blocks > 0 and blocks > 0:
        hot = min(request.hot_prefix_blocks / blocks, 1.0)
        priced = [f if f >= hot else hot for f in overlap]
    # Prompt tokens stand in for the uncached part's cost: a cached fraction f of the blocks
    # leaves about (1 - f) of the tokens to prefill there.
    tokens = float(request.prompt_tokens)
    prefill_work = [
        s.inflight_prefill_tokens + tokens * (1.0 - f) for s, f in zip(states, priced, strict=True)
    ]
    return Candidates(states, trusted, matched, overlap, priced, queue, prefill_work)
