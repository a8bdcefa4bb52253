"""LatencyPredictor: TTFT and TPOT per candidate endpoint, learned online from observed latencies.

The predictor is plain state driven by its owner, who passes time in: ``predict`` on every
pick, ``observe`` when a request's latencies are known, and training when ``training_due``
says so, either synchronously (``train_now``, for the simulator and tests) or by taking a
``training_job``, fitting it elsewhere and handing the result to ``install``.

Until a target has ``min_samples`` training samples the analytic prior answers for it,
refitted each time the sample count doubles; afterwards the trained trees answer, unless
they did worse than the prior on the held-out samples.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from scheduler.core.predictor.config import PredictorConfig
from scheduler.core.predictor.features import NUM_FEATURES, FeatureMatrix
from scheduler.core.predictor.model import Floats, TrainedModel, mape, prior_from_json, prior_to_json
from scheduler.core.predictor.prior import PriorModel
from scheduler.core.predictor.store import SampleStore
from scheduler.core.predictor.training import TrainingJob

Source = Literal["prior", "model"]
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, eq=False)
class Prediction:
    """Predicted milliseconds per candidate row, and what answered each target."""

    ttft_ms: Floats
    tpot_ms: Floats
    ttft_source: Source
    tpot_source: Source

    @property
    def source(self) -> Literal["prior", "model", "mixed"]:
        return joint_source(self.ttft_source, self.tpot_source)


def joint_source(ttft_source: Source, tpot_source: Source) -> Literal["prior", "model", "mixed"]:
    """What answered a prediction of both targets: "mixed" when the trees answered one only."""
    return ttft_source if ttft_source == tpot_source else "mixed"


@dataclass(frozen=True, slots=True)
class PredictorStats:
    """A snapshot of the predictor's state; MAPEs are fractions (0.05 = 5%)."""

    observed: int  # observations offered, stored or not
    samples: int  # held now: training + held-out
    train_samples: int
    holdout_samples: int
    strata: int  # non-empty training strata
    model_version: int  # 0: no model installed
    trainings: int  # models installed
    ttft_source: Source  # what answers each target now
    tpot_source: Source
    # Exponential moving average over the last running_mape_window observations of the
    # error of what the predictor would have answered for them just before observing them.
    running_mape_ttft: float | None
    running_mape_tpot: float | None
    # On held-out samples, of what answers now (the installed model's figure is from its
    # training job; the prior's is computed on the current held-out store).
    holdout_mape_ttft: float | None
    holdout_mape_tpot: float | None
    predictions: dict[str, int]  # predict() calls by "<target>_<source>"


class _RunningMape:
    __slots__ = ("alpha", "value")

    def __init__(self, window: int) -> None:
        self.alpha = 2.0 / (window + 1.0)
        self.value: float | None = None

    def add(self, predicted: float, observed: float) -> None:
        if not observed > 0.0:
            return
        error = abs(predicted - observed) / observed
        self.value = error if self.value is None else self.value + self.alpha * (error - self.value)


class LatencyPredictor:
    """Predicts TTFT/TPOT for candidate feature rows; learns from observed latencies."""

    def __init__(self, config: PredictorConfig | None = None) -> None:
        self.config = config or PredictorConfig()
        self._store = SampleStore(self.config.max_samples, self.config.holdout_fraction, self.config.seed)
        self._prior = PriorModel.from_coefficients(self.config.prior)
        # Everything predictions read when a model is installed, swapped in one assignment.
        self._model: TrainedModel | None = None
        self._next_prior_refit = self.config.prior_refit_min_samples
        self._jobs = 0
        self._observed_at_last_job = 0
        self._installed_at: float | None = None
        self._trainings = 0
        # Bumped whenever what answers changes (a model installed, the prior refitted): a
        # prediction made in the same epoch is what ``_predict`` would answer again.
        self._epoch = 0
        self._last_observed_at: float | None = None
        self._running_ttft = _RunningMape(self.config.running_mape_window)
        self._running_tpot = _RunningMape(self.config.running_mape_window)
        self._predictions = {"ttft_prior": 0, "ttft_model": 0, "tpot_prior": 0, "tpot_model": 0}

    # --- answering --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Changes whenever the predictions for the same row may change."""
        return self._epoch

    @property
    def model(self) -> TrainedModel | None:
        return self._model

    @property
    def prior(self) -> PriorModel:
        """The prior that answers targets the model does not (the model's own once installed)."""
        model = self._model
        return self._prior if model is None else model.prior

    def predict(self, features: FeatureMatrix) -> Prediction:
        """TTFT and TPOT (ms) for each row of ``features`` (see features.candidate_features)."""
        prediction = self._predict(features)
        counts = self._predictions
        counts["ttft_" + prediction.ttft_source] += 1
        counts["tpot_" + prediction.tpot_source] += 1
        return prediction

    def predict_row(self, row: FeatureMatrix) -> tuple[float, float, str]:
        """(TTFT ms, TPOT ms, source) of one row (shape (NUM_FEATURES,)), as ``predict`` on it."""
        model = self._model
        counts = self._predictions
        if model is not None:
            ttft, tpot = model.predict_row(row)
            ttft_source, tpot_source = self.ttft_source, self.tpot_source
            counts["ttft_" + ttft_source] += 1
            counts["tpot_" + tpot_source] += 1
            return ttft, tpot, joint_source(ttft_source, tpot_source)
        ttft, tpot = self._prior.predict_row(row)
        counts["ttft_prior"] += 1
        counts["tpot_prior"] += 1
        return ttft, tpot, "prior"

    def _predict(self, features: FeatureMatrix) -> Prediction:
        model = self._model
        if model is None:
            prior = self._prior
            return Prediction(prior.predict_ttft(features), prior.predict_tpot(features), "prior", "prior")
        return Prediction(
            model.predict_ttft(features), model.predict_tpot(features), self.ttft_source, self.tpot_source
        )

    @property
    def ttft_source(self) -> Source:
        """What answers TTFT now: the trees once a model installed them for it, else the prior."""
        model = self._model
        return "prior" if model is None or model.ttft is None else "model"

    @property
    def tpot_source(self) -> Source:
        model = self._model
        return "prior" if model is None or model.tpot is None else "model"

    # --- learning ---------------------------------------------------------------------

    def observe(
        self,
        features_row: FeatureMatrix,
        ttft_ms: float | None,
        tpot_ms: float | None,
        now: float,
        prediction: tuple[int, float, float] | None = None,
    ) -> None:
        """Record what one request's endpoint looked like when it was picked and how fast it was.

        ``features_row`` is that endpoint's row from the pick; a latency that was not
        measured (a request that failed before its first token, one that produced a
        single token) is None. ``prediction``: (epoch, TTFT ms, TPOT ms) predicted for that
        row at the pick; while the epoch is current it stands for predicting the row again
        (one XGBoost call a completion, ~9% of the live event loop's time under py-spy).
        """
        if not self.config.enabled or (ttft_ms is None and tpot_ms is None):
            return
        row = np.asarray(features_row, dtype=np.float32).reshape(-1)
        if row.shape[0] != NUM_FEATURES:
            raise ValueError(f"expected {NUM_FEATURES} features, got {row.shape[0]}")
        self._last_observed_at = now
        if prediction is not None and prediction[0] == self._epoch:
            _, ttft_before, tpot_before = prediction
        else:
            before = self._predict(row[None, :])
            ttft_before, tpot_before = float(before.ttft_ms[0]), float(before.tpot_ms[0])
        if ttft_ms is not None:
            self._running_ttft.add(ttft_before, ttft_ms)
        if tpot_ms is not None:
            self._running_tpot.add(tpot_before, tpot_ms)
        held_out = self._store.add(row, ttft_ms, tpot_ms)
        if not held_out and self._model is None and len(self._store.train) >= self._next_prior_refit:
            # Doubling keeps the refits' total cost linear in the samples seen.
            self._next_prior_refit = 2 * len(self._store.train)
            train = self._store.train.arrays()
            self._prior = self._prior.refit(
                train.features, train.ttft_ms, train.tpot_ms, self.config.prior_refit_min_samples
            )
            self._epoch += 1

    def training_due(self, now: float) -> bool:
        """Whether a training job would learn something: enough samples, and new ones since the last job.

        The first model trains as soon as a target has min_samples; later ones after
        retrain_every_samples new observations or retrain_every_s since the last install, or
        as soon as the observations have doubled since the last job: the first model sees
        only the first few hundred requests, often before any load built up, and its trees
        cannot extrapolate past what they saw. Doubling costs log2(n) extra fits in all.
        """
        config = self.config
        if not config.enabled:
            return False
        new = self._store.observed - self._observed_at_last_job
        if new == 0 or len(self._store.train) < config.min_samples:
            return False
        if self._installed_at is None:
            return True
        return (
            new >= config.retrain_every_samples
            or new >= self._observed_at_last_job
            or now - self._installed_at >= config.retrain_every_s
        )

    @property
    def samples_doubled(self) -> bool:
        """Observations have doubled since the last training job (one is due at once)."""
        return self._store.observed >= 2 * self._observed_at_last_job and len(self._store.train) >= (
            self.config.min_samples
        )

    def training_job(self) -> TrainingJob:
        """A snapshot of the samples to fit (on any thread) with ``job.fit()``, then ``install``."""
        model = self._model
        # Past any installed model's version too: one loaded from a file may be ahead.
        self._jobs = max(self._jobs, 0 if model is None else model.version) + 1
        self._observed_at_last_job = self._store.observed
        return TrainingJob(
            version=self._jobs,
            config=self.config,
            train=self._store.train.arrays(),
            holdout=self._store.holdout.arrays(),
            prior=self.prior,
        )

    def install(self, model: TrainedModel, now: float) -> bool:
        """Make ``model`` answer from now on; False (and nothing changes) when a newer one is installed."""
        current = self._model
        if current is not None and model.version <= current.version:
            return False
        self._model = model
        self._installed_at = now
        self._epoch += 1
        self._trainings += 1
        return True

    def train_now(self, now: float) -> TrainedModel:
        """Fit and install on this thread: for the simulator and tests (the live server fits elsewhere)."""
        model = self.training_job().fit()
        self.install(model, now)
        return model

    # --- reporting and persistence ----------------------------------------------------

    @property
    def stats(self) -> PredictorStats:
        model = self._model
        ttft_source, tpot_source = self.ttft_source, self.tpot_source
        holdout_ttft = holdout_tpot = None
        if model is not None:
            holdout_ttft = model.ttft_score.model_mape if ttft_source == "model" else None
            holdout_tpot = model.tpot_score.model_mape if tpot_source == "model" else None
        if (holdout_ttft is None or holdout_tpot is None) and len(self._store.holdout):
            held = self._store.holdout.arrays()
            prior = self.prior
            if holdout_ttft is None:
                holdout_ttft = _finite_or_none(mape(prior.predict_ttft(held.features), _filled(held.ttft_ms)))
            if holdout_tpot is None:
                holdout_tpot = _finite_or_none(mape(prior.predict_tpot(held.features), _filled(held.tpot_ms)))
        store = self._store
        return PredictorStats(
            observed=store.observed,
            samples=len(store),
            train_samples=len(store.train),
            holdout_samples=len(store.holdout),
            strata=len(store.train.strata),
            model_version=0 if model is None else model.version,
            trainings=self._trainings,
            ttft_source=ttft_source,
            tpot_source=tpot_source,
            running_mape_ttft=self._running_ttft.value,
            running_mape_tpot=self._running_tpot.value,
            holdout_mape_ttft=holdout_ttft,
            holdout_mape_tpot=holdout_tpot,
            predictions=dict(self._predictions),
        )

    def to_bytes(self) -> bytes:
        """The configuration, prior and installed model (not the samples): enough to predict identically."""
        header = {
            "format": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "prior": prior_to_json(self._prior),
            "trainings": self._trainings,
            "jobs": self._jobs,
        }
        arrays: dict[str, Any] = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        if self._model is not None:
            arrays["model"] = np.frombuffer(self._model.to_bytes(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, config: PredictorConfig | None = None) -> LatencyPredictor:
        """A predictor restored from ``to_bytes``; ``config`` overrides the saved configuration."""
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            header = json.loads(arrays["header"].tobytes())
            if header.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported predictor format {header.get('format')}")
            model = TrainedModel.from_bytes(arrays["model"].tobytes()) if "model" in arrays else None
        predictor = cls(config or PredictorConfig.model_validate(header["config"]))
        predictor._prior = prior_from_json(header["prior"])
        predictor._jobs = max(int(header["jobs"]), 0 if model is None else model.version)
        if model is not None:
            predictor._model = model
        predictor._trainings = int(header["trainings"])
        return predictor


def _filled(target: Floats) -> Floats:
    """NaN (not observed) as 0, which mape() skips."""
    return np.nan_to_num(target, nan=0.0)


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None
