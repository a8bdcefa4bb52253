"""``kvsched``: kvsched's own policy, the scoring pipeline with every configured weight.

Filters, the registered scorers under ``scoring.weights``, the SLO stage and the picker
(``scheduler.core.scoring``). Its defaults are kvsched's own (``ScorerWeights`` and the
scorers' registrations): measured on the Mooncake traces, see the README.
"""

from __future__ import annotations

from scheduler.core.policies.base import PolicyInput, PolicySetup, Routing, RoutingPolicy
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import SchedulingPipeline, ScoringConfig

NO_ENDPOINT_AVAILABLE = "no endpoint available"


class ScoringPolicy(RoutingPolicy):
    """The scoring pipeline as a policy. Subclasses fix the weights (``scoring_for``) and
    may leave out the SLO stage (``slo_stage``)."""

    # Whether a request with SLOs has every candidate's latency predicted, so candidates
    # predicted to meet them rank first. Predictions are made anyway when a weighted scorer
    # reads them.
    slo_stage = True
    guards_remembered_prefixes = True
    prices_queued_prefill = True
    prices_hot_prefixes = True
    reads_speculative_placement = True
    prunes_candidates = True

    def __init__(self, setup: PolicySetup) -> None:
        self._pipeline = SchedulingPipeline(self.scoring_for(setup.scoring))

    def scoring_for(self, scoring: ScoringConfig) -> ScoringConfig:
        """The settings this policy runs the pipeline under, given the configured ones."""
        return scoring

    def reconfigure(self, setup: PolicySetup) -> None:
        self._pipeline = SchedulingPipeline(self.scoring_for(setup.scoring))

    def route(self, data: PolicyInput) -> Routing:
        pipeline = self._pipeline
        request = data.request
        has_slo = request.slo_ttft_ms is not None or request.slo_tpot_ms is not None
        predict_all = pipeline.uses_predictions or (has_slo and self.slo_stage)
        estimator = data.estimator if predict_all else None
        decision = pipeline.pick(request, data.endpoints, data.matches, data.rng, estimator)
        if not decision.endpoints:
            return Routing([], decision.reason or NO_ENDPOINT_AVAILABLE, decision.explain, decision)
        return Routing(decision.endpoints, "", decision.explain, decision)


register_policy(
    "kvsched",
    ScoringPolicy,
    description="kvsched's scoring pipeline: cache overlap, load and predicted latency, SLO-aware.",
)
