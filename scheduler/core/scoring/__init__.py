"""The scoring pipeline: filters -> scorers -> picker, shared by the live server and the simulator."""

from scheduler.core.scoring.config import FilterLimits, ScorerWeights, ScoringConfig, TierWeights
from scheduler.core.scoring.pipeline import (
    SCORER_NAMES,
    Candidate,
    Decision,
    SchedulingPipeline,
    Scorer,
    default_scorers,
)
from scheduler.core.scoring.types import EndpointState, PickRequest, PrefixMatch

__all__ = [
    "SCORER_NAMES",
    "Candidate",
    "Decision",
    "EndpointState",
    "FilterLimits",
    "PickRequest",
    "PrefixMatch",
    "SchedulingPipeline",
    "Scorer",
    "ScorerWeights",
    "ScoringConfig",
    "TierWeights",
    "default_scorers",
]
