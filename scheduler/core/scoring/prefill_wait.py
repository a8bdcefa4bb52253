"""``prefill_wait``: less time before this request's first token can come, relative to the best.

Per candidate, the prefill queued there ahead of the request (kvsched's routed tokens,
drained at the endpoint's measured prefill rate: ``EndpointState.queued_prefill_tokens``,
``core/prefillqueue.py``) plus the request's own prompt tokens not cached there, over that
endpoint's rate, plus the predictor prior's fixed costs (one engine step for any first
token, one more per scraped waiting request): an estimate of its TTFT in milliseconds, which
``relative_to_best`` turns into a score (the fastest 1, one twice as slow 0.5).

The fixed costs keep the score honest at both ends. Without the step, a few tokens routed to
an idle endpoint made it look twice as slow as another idle one (5 queued tokens against 0
is 0.4 ms against 0.2 ms, when both first tokens take a step of ~10 ms). Without the waiting
requests, an endpoint whose engine reports a queue kvsched did not route (another gateway's
traffic, or requests from before a restart) looked empty.

A cached prefix counts here only as the prefill it saves, so an endpoint holding a prefix
that every request wants stays first only while its queue is shorter than recomputing the
prefix elsewhere. Measured on the agentic workload (2k-token tool prompt shared by every
agent, 8 workers): weighting prefix overlap against request counts instead left four workers
idle and TTFT p50 at twice SGLang's cache-aware router's. The queue here is prefill only: a
holder crowded with decoding sessions, whose next steps will come back to it, still looks
cheap to each new request. Two things keep such a holder from collecting every new session:
a prefix shared by more requests than its holders' share of the pool is priced as cached
everywhere (``PickRequest.hot_prefix_blocks``, ``core/hotprefix.py``; ``Candidates.
priced_overlap`` is what this scorer reads), and the balance guard (``config.BalanceGuard``)
takes a holder far busier than the least loaded endpoint out of the running for the primary.

The request's own uncached prefill counts twice by default (``own_prefill_weight`` 2): once
as its own wait, once as the wait it adds for the requests queued behind it there, its own
session's next step first. Counted once, a step of an agent loop left its holder as soon as
the holder's queue outgrew recomputing the history elsewhere; near saturation kvsched moved
679 of 3,887 agentic steps (SGLang's cache-aware router 135) and did 5% more prefill work
than it, and its TTFT p50 was 110.6 ms against 97.6; counted twice, 90.8 ms.
"""

from __future__ import annotations

from scheduler.core.predictor.config import PriorCoefficients
from scheduler.core.scoring.candidates import Candidates
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.registry import register_scorer
from scheduler.core.scoring.scorers import relative_to_best
from scheduler.core.scoring.types import PickRequest

# The TTFT prior's defaults (predictor/config.py): a first token costs one engine step
# (10 ms) and each waiting request the engine reports ahead at least one more (8 ms); a
# prefill rate not yet measured is the prior's (27.6k tokens/s).
_PRIOR = PriorCoefficients()
STEP_MS = _PRIOR.ttft_base_ms
WAITING_REQUEST_MS = _PRIOR.ttft_ms_per_waiting_request
ASSUMED_TOKENS_PER_S = 1000.0 / _PRIOR.ttft_ms_per_uncached_token


def estimated_prefill_ms(
    candidates: Candidates, request: PickRequest, own_prefill_weight: float = 1.0
) -> list[float]:
    """Per candidate, milliseconds before this request's first token there: one step, the
    scraped waiting requests (trusted metrics only), the prefill queued ahead and its own
    (counted ``own_prefill_weight`` times: see ``ScoringConfig.own_prefill_weight``)."""
    tokens = float(request.prompt_tokens) * own_prefill_weight
    return [
        STEP_MS
        + (WAITING_REQUEST_MS * s.waiting if t else 0.0)
        + 1000.0
        * (s.queued_prefill_tokens + tokens * (1.0 - f))
        / (s.prefill_tokens_per_s if s.prefill_tokens_per_s > 0.0 else ASSUMED_TOKENS_PER_S)
        for s, t, f in zip(candidates.states, candidates.trusted, candidates.priced_overlap, strict=True)
    ]


class PrefillWaitScorer:
    name = "prefill_wait"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        return relative_to_best(estimated_prefill_ms(candidates, request, config.own_prefill_weight))


register_scorer(
    "prefill_wait",
    PrefillWaitScorer,
    weight=3.0,
    description="Less estimated prefill before the first token there: the prefill queued ahead (drained "
    "at the endpoint's measured rate) plus this request's uncached tokens, in time.",
)
