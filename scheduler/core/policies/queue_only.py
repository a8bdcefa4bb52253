"""``queue_only``: kvsched's pipeline scoring queue depth alone, an ablation.

The same filters, tie-breaking on load and picker as ``kvsched`` with every weight but
``queue_depth`` at zero and no SLO stage: what load balancing on requests ahead is worth
without cache affinity (on the Mooncake conversation trace, kvsched's TTFT p50 is 0.77x
this policy's; README, "Simulator results").
"""

from __future__ import annotations

from scheduler.core.policies.kvsched import ScoringPolicy
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import BalanceGuard, ScorerWeights, ScoringConfig


class QueueOnly(ScoringPolicy):
    slo_stage = False
    prices_queued_prefill = False  # an ablation of the scoring, not of flow control
    prices_hot_prefixes = False

    def scoring_for(self, scoring: ScoringConfig) -> ScoringConfig:
        # An ablation of one signal: without the balance guard, which would add a second.
        weights = ScorerWeights.only(queue_depth=1.0)
        return scoring.model_copy(update={"weights": weights, "balance": BalanceGuard(abs_requests=0)})


register_policy("queue_only", QueueOnly, description="kvsched's pipeline on queue depth alone (ablation).")
