"""A routing policy: what orders the endpoints for each request, and what it is given to do so.

The Scheduler owns the endpoints' state, the prefix index, kvsched's in-flight accounting and
the latency predictor; it builds one ``PolicyInput`` per request, asks its policy to
``route`` it, and carries out the answer (``Routing``). A policy keeps whatever state of its
own it needs (counts of the requests it routed, active blocks per endpoint) and hears about
every request it routed through the lifecycle callbacks, which default to nothing.

Everything here is core: no clock (``now`` comes in), no I/O, randomness from the rng given.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.core.scoring import (
    NO_ELIGIBLE_IN_SUBSET,
    Decision,
    EndpointState,
    LatencyEstimator,
    PickRequest,
    PrefixMatch,
    ScoringConfig,
)

NO_HEALTHY_ENDPOINT = "no healthy endpoint"

Explanation = dict[str, Any]
# The prompt's chained block keys in the prefix index's hash mode, in prompt order (a numpy
# uint64 array from the native index, a list of ints from the reference one): key ``i``
# stands for blocks ``0..i`` together.
BlockKeys = Any


@dataclass(frozen=True, slots=True)
class PolicySetup:
    """What a policy is built from, and rebuilt from on a configuration reload."""

    name: str  # the name it was registered under (and configured by)
    scoring: ScoringConfig  # the scoring settings in force: weights, tiers, limits, picker
    block_size: int  # tokens per KV block, the index's


# Not frozen: one is built per request, and a frozen dataclass costs ~4x more to build.
@dataclass(slots=True)
class PolicyInput:
    """What a policy reads to route one request."""

    request: PickRequest  # id, prompt size in blocks and tokens, subset hint, SLOs, priority
    endpoints: Sequence[EndpointState]  # the request's pool, no filter applied
    matches: Mapping[str, PrefixMatch]  # endpoint name -> prefix cached there (absent: none)
    cached_blocks: Callable[[str], int]  # blocks the index holds for an endpoint
    rng: random.Random  # the Scheduler's seeded source: same seed, same decisions
    estimator: LatencyEstimator  # predicts candidates' TTFT/TPOT, for policies that use it
    wanted: int  # endpoints to list: the primary and its fallbacks
    # Policies that keep per-block state of their own (active blocks, speculative entries)
    # read these; the others never touch them.
    block_keys: BlockKeys = ()  # the prompt's full blocks, as the index keys them
    now: float = 0.0  # the time of the pick (for a policy's own expiries)


@dataclass(slots=True)
class Routing:
    """A policy's answer: endpoint names, primary first and at most ``wanted``, or none and why."""

    endpoints: list[str]
    reason: str = ""  # why ``endpoints`` is empty
    # The account of the decision for audit lines and API replies, or a function that builds
    # it on first use (explaining 64 candidates costs more than scoring them).
    explanation: Explanation | Callable[[], Explanation] = field(default_factory=dict)
    # The scoring pipeline's decision when the policy ran it: the Scheduler then reads the
    # predicted latencies and the chosen endpoint's features (to train the predictor) from it.
    decision: Decision | None = None


class RoutingPolicy(ABC):
    """One policy instance per Scheduler; ``route`` is called for every request, in order."""

    # Approximate mode (endpoints without KV events): whether the Scheduler hands this policy
    # its remembered prefixes only where they cannot pile load onto one endpoint while another
    # idles (``Scheduler._approximate_load_guard``). Off for policies that follow a published
    # rule of their own, which must see every match as their source describes.
    guards_remembered_prefixes = False
    # Whether flow control also judges an endpoint by the prefill queued ahead there, priced
    # in milliseconds (``FlowControlConfig.max_queued_prefill_ms``). kvsched's own policy does;
    # the baselines keep the request-count and KV-usage limits they were measured with.
    prices_queued_prefill = False
    # Whether the pick counts the request against the hot-prefix table and tells the policy
    # how much of its prompt is a hot prefix (``PickRequest.hot_prefix_blocks``,
    # core/hotprefix.py). Only kvsched's load scorers read it.
    prices_hot_prefixes = False
    # Whether the prefix matches this policy sees include kvsched's recent placements on
    # endpoints whose KV events have not reported them yet (``SpeculativeConfig``), at a
    # discount. Off for policies that follow a published rule of their own.
    reads_speculative_placement = False
    # Whether, in a pool above ``CandidatesConfig.prune_above`` endpoints, the policy is given
    # a shortlist (best prefix matches, least loaded, most free KV cache, what the request's
    # hints require) instead of every endpoint. Off for policies that follow a published rule
    # of their own, which must see every endpoint as their source describes.
    prunes_candidates = False

    @abstractmethod
    def route(self, data: PolicyInput) -> Routing: ...

    def reconfigure(self, setup: PolicySetup) -> None:  # noqa: B027 (optional hook)
        """New settings under the same policy name, between two requests; state is kept.
        Build whatever can fail first, then swap: a raise must leave the policy as it was."""

    # --- lifecycle of the requests it routed (kvsched's accounting is the Scheduler's) -------

    def on_routed(  # noqa: B027 (optional hook)
        self, request_id: str, endpoint: str, prompt_tokens: int, prefill_tokens: int, now: float
    ) -> None:
        """``request_id`` now runs on ``endpoint`` (the chosen primary, or the endpoint the
        gateway reports serving it, or the fallback); ``prefill_tokens`` of its
        ``prompt_tokens`` are not cached there. A second call for the same id moves it."""

    def on_first_token(self, request_id: str, now: float) -> None:  # noqa: B027 (optional hook)
        """Its prefill is done: from here on it only decodes."""

    def on_completed(self, request_id: str, now: float) -> None:  # noqa: B027 (optional hook)
        """It left its endpoint, completed or failed; no further callback names it."""


# --- helpers for policies that order healthy endpoints themselves ----------------------------


def eligible(endpoints: Sequence[EndpointState], subset: frozenset[str] | None) -> list[EndpointState]:
    """Healthy endpoints within the gateway's subset hint (if any), in the order given."""
    return [s for s in endpoints if s.healthy and (subset is None or s.address in subset)]


def requests_ahead(state: EndpointState) -> int:
    """Scraped waiting requests plus kvsched's own in-flight ones."""
    return state.waiting + state.inflight_requests


def by_load(candidates: Sequence[EndpointState]) -> list[str]:
    """Names, least loaded first: requests ahead, then in-flight prefill tokens, then name."""
    ordered = sorted(candidates, key=lambda s: (requests_ahead(s), s.inflight_prefill_tokens, s.name))
    return [s.name for s in ordered]


class OrderingPolicy(RoutingPolicy):
    """A policy that orders the healthy endpoints within the subset hint by a rule of its own
    (``order``), explained as ``{"policy": name, "order": [...]}``."""

    def __init__(self, setup: PolicySetup) -> None:
        self.name = setup.name

    @abstractmethod
    def order(self, candidates: list[EndpointState], data: PolicyInput) -> list[str]:
        """Names of ``candidates`` (never empty), best first."""

    def route(self, data: PolicyInput) -> Routing:
        subset = data.request.subset
        candidates = eligible(data.endpoints, subset)
        order = self.order(candidates, data)[: data.wanted] if candidates else []
        explanation: Explanation = {"policy": self.name, "order": order}
        if not order:
            reason = NO_ELIGIBLE_IN_SUBSET if subset is not None else NO_HEALTHY_ENDPOINT
            return Routing([], reason, explanation)
        return Routing(order, "", explanation)
