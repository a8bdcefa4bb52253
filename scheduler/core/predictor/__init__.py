"""In-process TTFT/TPOT predictor: features, analytic prior, stratified samples, compiled trees.

I/O-free like the rest of the core: time is passed in, training jobs are plain snapshots
that an adapter may fit on another thread (scheduler/adapters/predictor_trainer.py).
"""

from scheduler.core.predictor.config import PredictorConfig, PriorCoefficients, XGBoostParams
from scheduler.core.predictor.features import (
    FEATURE_NAMES,
    NUM_FEATURES,
    FeatureMatrix,
    candidate_features,
    candidate_row,
)
from scheduler.core.predictor.model import (
    NATIVE_EVALUATOR,
    CompiledEnsemble,
    TargetScore,
    TrainedModel,
    compile_booster_json,
)
from scheduler.core.predictor.predictor import LatencyPredictor, Prediction, PredictorStats
from scheduler.core.predictor.prior import PriorModel
from scheduler.core.predictor.store import SampleStore, StratifiedReservoir
from scheduler.core.predictor.training import TrainingJob

__all__ = [
    "FEATURE_NAMES",
    "NATIVE_EVALUATOR",
    "NUM_FEATURES",
    "CompiledEnsemble",
    "FeatureMatrix",
    "LatencyPredictor",
    "Prediction",
    "PredictorConfig",
    "PredictorStats",
    "PriorCoefficients",
    "PriorModel",
    "SampleStore",
    "StratifiedReservoir",
    "TargetScore",
    "TrainedModel",
    "TrainingJob",
    "XGBoostParams",
    "candidate_features",
    "candidate_row",
    "compile_booster_json",
]
