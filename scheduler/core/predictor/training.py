"""Training jobs: an immutable snapshot of samples that can be fitted on any thread.

A job copies what it needs when it is taken, so observations that arrive while it fits
(on a worker thread, for seconds) change nothing in it, and the fitted model is installed
on the owner's thread with one assignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.core.predictor.config import PredictorConfig, XGBoostParams
from scheduler.core.predictor.features import FeatureMatrix
from scheduler.core.predictor.model import (
    CompiledEnsemble,
    Floats,
    TargetScore,
    TrainedModel,
    Transform,
    compile_booster_json,
    from_margin,
    mape,
    to_target_space,
)
from scheduler.core.predictor.prior import PriorModel
from scheduler.core.predictor.store import SampleArrays


def fit_booster(
    features: FeatureMatrix,
    target: Floats,
    params: XGBoostParams,
    *,
    weights: Floats | None = None,
    objective: str = "reg:squarederror",
) -> bytes:
    """Fit one xgboost regressor; its JSON (``save_raw("json")``), which model.py compiles."""
    import xgboost

    train = xgboost.DMatrix(features, label=target, weight=weights, nthread=params.nthread)
    booster = xgboost.train(
        {
            "objective": objective,
            "tree_method": "hist",
            "max_depth": params.max_depth,
            "eta": params.learning_rate,
            "min_child_weight": params.min_child_weight,
            "subsample": params.subsample,
            "nthread": params.nthread,
            "seed": params.seed,
            "verbosity": 0,
        },
        train,
        num_boost_round=params.n_estimators,
    )
    return bytes(booster.save_raw("json"))


def _usable(target: Floats) -> Any:
    return np.isfinite(target) & (target > 0.0)


@dataclass(frozen=True, slots=True, eq=False)
class TrainingJob:
    """Samples, prior and settings as they were when the job was taken."""

    version: int  # the version the fitted model will carry
    config: PredictorConfig
    train: SampleArrays
    holdout: SampleArrays
    prior: PriorModel

    def fit(self) -> TrainedModel:
        """Refit the prior, fit a tree ensemble per target with enough samples, score both on the holdout."""
        config = self.config
        train, holdout = self.train, self.holdout
        prior = self.prior.refit(train.features, train.ttft_ms, train.tpot_ms, config.prior_refit_min_samples)
        transform: Transform = config.target_transform
        ensembles: dict[str, CompiledEnsemble | None] = {}
        scores: dict[str, TargetScore] = {}
        boosters: dict[str, bytes] = {}
        for name, y_train, y_holdout, prior_predict in (
            ("ttft", train.ttft_ms, holdout.ttft_ms, prior.predict_ttft),
            ("tpot", train.tpot_ms, holdout.tpot_ms, prior.predict_tpot),
        ):
            rows = _usable(y_train)
            ensemble = None
            residual = config.residual_to_prior
            if int(rows.sum()) >= config.min_samples:
                features = train.features[rows]
                target = to_target_space(y_train[rows], transform)
                if residual:
                    target = target - to_target_space(prior_predict(features), transform)
                if config.loss == "relative":
                    # |log predicted - log observed| weighted by 1 / observed: a leaf's value
                    # is then the weighted median of its residuals, the constant with the
                    # least MAPE over them (mean |p - y| / y is an L1 loss weighted by
                    # 1 / y, and the weighted median is the same point in log space). The
                    # weights are scaled to a mean of 1, leaving min_child_weight in samples.
                    weights = 1.0 / y_train[rows]
                    weights *= len(weights) / weights.sum()
                    raw = fit_booster(
                        features, target, config.xgboost, weights=weights, objective="reg:absoluteerror"
                    )
                else:
                    raw = fit_booster(features, target, config.xgboost)
                boosters[name] = raw
                ensemble = compile_booster_json(raw)
            held = _usable(y_holdout)
            held_count = int(held.sum())
            held_features, held_target = holdout.features[held], y_holdout[held]
            prior_mape = mape(prior_predict(held_features), held_target) if held_count else None
            model_mape = None
            if ensemble is not None and held_count:
                margin = ensemble.margin(held_features)
                if residual:
                    margin += to_target_space(prior_predict(held_features), transform)
                model_mape = mape(from_margin(margin, transform), held_target)
            use_model = ensemble is not None
            if (
                use_model
                and config.require_model_beats_prior
                and held_count >= config.min_holdout_for_comparison
                and model_mape is not None
                and prior_mape is not None
                and model_mape > prior_mape
            ):
                use_model = False
            ensembles[name] = ensemble if use_model else None
            scores[name] = TargetScore(held_count, model_mape, prior_mape, use_model)
        return TrainedModel(
            version=self.version,
            prior=prior,
            ttft=ensembles["ttft"],
            tpot=ensembles["tpot"],
            transform=transform,
            train_samples=len(train),
            ttft_score=scores["ttft"],
            tpot_score=scores["tpot"],
            boosters=boosters,
            residual=config.residual_to_prior,
        )
