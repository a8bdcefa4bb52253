"""``cache_only``: kvsched's pipeline scoring prefix overlap alone, an ablation.

The same filters and picker as ``kvsched`` with every weight but ``prefix_overlap`` at zero
and no SLO stage. Near-ties still go to the least loaded (the picker's ``tie_epsilon``), so
requests with nothing cached spread evenly: what cache affinity is worth without load
balancing beyond tie-breaks.
"""

from __future__ import annotations

from scheduler.core.policies.kvsched import ScoringPolicy
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import BalanceGuard, ScorerWeights, ScoringConfig


class CacheOnly(ScoringPolicy):
    slo_stage = False
    prices_queued_prefill = False  # an ablation of the scoring, not of flow control
    prices_hot_prefixes = False

    def scoring_for(self, scoring: ScoringConfig) -> ScoringConfig:
        # An ablation of one signal: without the balance guard, which would add a second.
        weights = ScorerWeights.only(prefix_overlap=1.0)
        return scoring.model_copy(update={"weights": weights, "balance": BalanceGuard(abs_requests=0)})


register_policy("cache_only", CacheOnly, description="kvsched's pipeline on prefix overlap alone (ablation).")
