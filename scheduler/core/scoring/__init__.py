"""The scoring pipeline: filters -> scorers -> picker, shared by the live server and the simulator."""

from scheduler.core.scoring.candidates import Candidates, LatencyEstimator
from scheduler.core.scoring.config import (
    BalanceGuard,
    FilterLimits,
    ScorerWeights,
    ScoringConfig,
    TierWeights,
)
from scheduler.core.scoring.decision import Decision
from scheduler.core.scoring.filters import (
    NO_ELIGIBLE_IN_SUBSET,
    Filter,
    HealthFilter,
    LoraSlotFilter,
    SaturationFilter,
    SessionAffinityFilter,
    SubsetHintFilter,
    default_filters,
)

# Scorers in modules of their own register on import, after the built-in ones.
from scheduler.core.scoring.lora_affinity import LoraAffinityScorer
from scheduler.core.scoring.pipeline import SchedulingPipeline
from scheduler.core.scoring.prefill_wait import PrefillWaitScorer
from scheduler.core.scoring.registry import SCORERS, ScorerSpec, register_scorer
from scheduler.core.scoring.scorers import (
    InflightLoadScorer,
    KVUtilizationScorer,
    PredictedLatencyScorer,
    PrefixOverlapScorer,
    QueueDepthScorer,
    Scorer,
    build_scorer,
    default_scorers,
    relative_to_best,
)
from scheduler.core.scoring.session_affinity import SessionAffinityScorer
from scheduler.core.scoring.types import (
    EndpointState,
    LatencyEstimate,
    LoraSlots,
    PickRequest,
    PrefixMatch,
)

__all__ = [
    "NO_ELIGIBLE_IN_SUBSET",
    "SCORERS",
    "BalanceGuard",
    "Candidates",
    "Decision",
    "EndpointState",
    "Filter",
    "FilterLimits",
    "HealthFilter",
    "InflightLoadScorer",
    "KVUtilizationScorer",
    "LatencyEstimate",
    "LatencyEstimator",
    "LoraAffinityScorer",
    "LoraSlotFilter",
    "LoraSlots",
    "PickRequest",
    "PredictedLatencyScorer",
    "PrefillWaitScorer",
    "PrefixMatch",
    "PrefixOverlapScorer",
    "QueueDepthScorer",
    "SaturationFilter",
    "SchedulingPipeline",
    "Scorer",
    "ScorerSpec",
    "ScorerWeights",
    "ScoringConfig",
    "SessionAffinityFilter",
    "SessionAffinityScorer",
    "SubsetHintFilter",
    "TierWeights",
    "build_scorer",
    "default_filters",
    "default_scorers",
    "register_scorer",
    "relative_to_best",
]
