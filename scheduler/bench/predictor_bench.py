"""Latency-predictor benchmark: batched predict latency and accuracy on a synthetic pool.

Latencies come from a queueing formula with multiplicative noise (``synthetic_latencies``):
prefill of the request's uncached tokens and of the prefill queued ahead of it, a cost per
waiting request, a load factor 1 / (1 - utilisation), a penalty as the KV cache fills, and
endpoint classes that differ in speed; TPOT grows with the decode batch. The predictor
observes samples drawn from picks over that pool, trains once, and is scored on samples
from a separate draw.

Timing compares, on one feature matrix and in the same run, the compiled tree evaluator
(scheduler._native.treeeval), its numpy fallback, and xgboost's own ``inplace_predict`` on
the same boosters, so the ratio is independent of the machine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.core.predictor import (
    NATIVE_EVALUATOR,
    LatencyPredictor,
    PredictorConfig,
    TrainedModel,
    candidate_features,
)
from scheduler.core.predictor.features import (
    CACHED_TOKENS,
    DECODE_BATCH,
    ENDPOINT_CLASS_ID,
    KV_USAGE,
    PROMPT_TOKENS,
    QUEUED_PREFILL_TOKENS,
    UNCACHED_TOKENS,
    WAITING,
    FeatureMatrix,
)
from scheduler.core.predictor.model import Floats, from_margin, mape, to_target_space

# Relative slowness of each endpoint class (an older GPU, a faster one).
CLASS_SLOWDOWN = (1.0, 1.8, 0.6)
NOISE_SIGMA = 0.05  # lognormal noise: the best achievable MAPE is about 4%


@dataclass(frozen=True, slots=True)
class SyntheticSamples:
    features: FeatureMatrix
    ttft_ms: Floats
    tpot_ms: Floats


def synthetic_latencies(features: FeatureMatrix, rng: np.random.Generator) -> tuple[Floats, Floats]:
    """TTFT and TPOT (ms) of each feature row under the synthetic pool's queueing formula."""
    f = features.astype(np.float64)
    slowdown = np.asarray(CLASS_SLOWDOWN)[f[:, ENDPOINT_CLASS_ID].astype(np.int64) % len(CLASS_SLOWDOWN)]
    load = np.minimum((f[:, WAITING] + f[:, DECODE_BATCH]) / 300.0, 0.9)
    kv_penalty = 1.0 + 4.0 * np.maximum(f[:, KV_USAGE] - 0.85, 0.0)
    ttft = (
        slowdown
        * (8.0 + 0.04 * f[:, UNCACHED_TOKENS] + 0.03 * f[:, QUEUED_PREFILL_TOKENS] + 4.0 * f[:, WAITING])
        * kv_penalty
        / (1.0 - load)
    )
    tpot = slowdown * (6.0 + 0.06 * f[:, DECODE_BATCH]) * (1.0 + 0.5 * f[:, KV_USAGE] ** 2)
    n = features.shape[0]
    ttft *= rng.lognormal(0.0, NOISE_SIGMA, n)
    tpot *= rng.lognormal(0.0, NOISE_SIGMA, n)
    return ttft, tpot


def synthetic_pick(rng: np.random.Generator, candidates: int) -> FeatureMatrix:
    """Feature rows of one pick: one prompt, ``candidates`` endpoints in random states."""
    prompt = int(np.clip(rng.lognormal(7.0, 1.2), 16, 32_000))
    cached = (prompt * rng.beta(0.6, 0.8, candidates)) // 16 * 16
    busy = rng.exponential(1.0, candidates)
    running = rng.poisson(24.0 * busy)
    waiting = rng.poisson(3.0 * busy * busy)
    kv_usage = np.clip(running / 80.0 + rng.normal(0.0, 0.05, candidates), 0.0, 1.0)
    inflight_prefill = rng.poisson(600.0 * (waiting + 0.5))
    inflight_decode = rng.binomial(running, 0.7)
    classes = rng.integers(0, len(CLASS_SLOWDOWN), candidates)
    # Of the routed prefill, some has been computed already; the rest is queued.
    queued = inflight_prefill * rng.uniform(0.2, 1.0, candidates)
    rates = 27_600.0 / np.asarray(CLASS_SLOWDOWN)[classes % len(CLASS_SLOWDOWN)]
    return candidate_features(
        prompt,
        cached.tolist(),
        waiting.tolist(),
        running.tolist(),
        kv_usage.tolist(),
        inflight_prefill.tolist(),
        inflight_decode.tolist(),
        classes.tolist(),
        queued.tolist(),
        rates.tolist(),
    )


def synthetic_samples(n: int, seed: int, candidates_per_pick: int = 8) -> SyntheticSamples:
    """``n`` samples: the rows of ceil(n / candidates_per_pick) picks, with their latencies."""
    rng = np.random.default_rng(seed)
    picks = -(-n // candidates_per_pick)
    features = np.concatenate([synthetic_pick(rng, candidates_per_pick) for _ in range(picks)])[:n]
    ttft, tpot = synthetic_latencies(features, rng)
    return SyntheticSamples(features, ttft, tpot)


def trained_predictor(samples: SyntheticSamples, config: PredictorConfig | None = None) -> LatencyPredictor:
    """A predictor that observed every sample (one a millisecond) and trained once."""
    predictor = LatencyPredictor(config or PredictorConfig(max_samples=max(2 * len(samples.ttft_ms), 1000)))
    for i in range(len(samples.ttft_ms)):
        predictor.observe(samples.features[i], float(samples.ttft_ms[i]), float(samples.tpot_ms[i]), i / 1000)
    predictor.train_now(len(samples.ttft_ms) / 1000)
    return predictor


def _timed_us(call: Callable[[], object], iterations: int) -> dict[str, float]:
    call()
    samples = np.empty(iterations, dtype=np.float64)
    gc.collect()
    gc.disable()
    try:
        for i in range(iterations):
            start = time.perf_counter_ns()
            call()
            samples[i] = time.perf_counter_ns() - start
    finally:
        gc.enable()
    samples /= 1000.0
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99))}


def _xgboost_predictors(model: TrainedModel) -> Callable[[FeatureMatrix], tuple[Floats, Floats]]:
    import xgboost

    boosters = {}
    for name in ("ttft", "tpot"):
        booster = xgboost.Booster()
        booster.load_model(bytearray(model.boosters[name]))
        booster.set_param({"nthread": 1})
        boosters[name] = booster

    def predict(features: FeatureMatrix) -> tuple[Floats, Floats]:
        ttft = np.asarray(boosters["ttft"].inplace_predict(features), dtype=np.float64)
        tpot = np.asarray(boosters["tpot"].inplace_predict(features), dtype=np.float64)
        if model.residual:
            # The trees correct the prior; xgboost knows only the trees.
            ttft += to_target_space(model.prior.predict_ttft(features), model.transform)
            tpot += to_target_space(model.prior.predict_tpot(features), model.transform)
        return from_margin(ttft, model.transform), from_margin(tpot, model.transform)

    return predict


def run(
    candidates: int = 64,
    iterations: int = 5000,
    train_samples: int = 10_000,
    test_samples: int = 2_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Predict latency (us) per evaluator and held-out MAPE; see the module docstring."""
    predictor = trained_predictor(synthetic_samples(train_samples, seed))
    model = predictor.model
    if model is None or model.ttft is None or model.tpot is None:
        raise RuntimeError("the synthetic training run did not produce a model for both targets")
    ttft_ensemble, tpot_ensemble = model.ttft, model.tpot

    test = synthetic_samples(test_samples, seed + 1)
    prediction = predictor.predict(test.features)
    prior = model.prior
    accuracy = {
        "mape_ttft": mape(prediction.ttft_ms, test.ttft_ms),
        "mape_tpot": mape(prediction.tpot_ms, test.tpot_ms),
        "prior_mape_ttft": mape(prior.predict_ttft(test.features), test.ttft_ms),
        "prior_mape_tpot": mape(prior.predict_tpot(test.features), test.tpot_ms),
    }

    pick_rng = np.random.default_rng(seed + 2)
    features = synthetic_pick(pick_rng, candidates)
    xgboost_predict = _xgboost_predictors(model)
    reference_ttft, reference_tpot = xgboost_predict(features)
    ours = predictor.predict(features)
    agreement = max(
        float(np.max(np.abs(ours.ttft_ms - reference_ttft) / reference_ttft)),
        float(np.max(np.abs(ours.tpot_ms - reference_tpot) / reference_tpot)),
    )

    def compiled() -> None:
        from_margin(ttft_ensemble.margin(features), model.transform)
        from_margin(tpot_ensemble.margin(features), model.transform)

    def numpy_fallback() -> None:
        from_margin(ttft_ensemble.margin_numpy(features), model.transform)
        from_margin(tpot_ensemble.margin_numpy(features), model.transform)

    # The builder's inputs as a pick has them: Python lists, one entry per candidate.
    pick = synthetic_pick(pick_rng, candidates)
    prompt = int(pick[0, PROMPT_TOKENS])
    columns = [pick[:, c].tolist() for c in (CACHED_TOKENS, *range(WAITING, ENDPOINT_CLASS_ID + 1))]
    timings = {
        "compiled_us": _timed_us(compiled, iterations),
        "predict_us": _timed_us(lambda: predictor.predict(features), iterations),
        "xgboost_us": _timed_us(lambda: xgboost_predict(features), max(iterations // 4, 1)),
        "numpy_us": _timed_us(numpy_fallback, max(iterations // 10, 1)),
        "features_us": _timed_us(lambda: candidate_features(prompt, *columns), iterations),
    }
    compiled_p50 = timings["compiled_us"]["p50"]
    return {
        "candidates": candidates,
        "iterations": iterations,
        "native": NATIVE_EVALUATOR,
        "trees_per_target": ttft_ensemble.trees,
        "max_depth": max(ttft_ensemble.max_depth, tpot_ensemble.max_depth),
        "train_samples": train_samples,
        "test_samples": test_samples,
        **timings,
        "speedup_vs_xgboost_p50": timings["xgboost_us"]["p50"] / compiled_p50,
        "speedup_vs_numpy_p50": timings["numpy_us"]["p50"] / compiled_p50,
        "max_relative_difference_vs_xgboost": agreement,
        **accuracy,
        "holdout_mape_ttft": model.ttft_score.model_mape,
        "holdout_mape_tpot": model.tpot_score.model_mape,
        "goals": {
            "predict_both_p50_le_200us": compiled_p50 <= 200.0,
            "mape_ttft_lt_10pct": accuracy["mape_ttft"] < 0.10,
            "mape_tpot_lt_10pct": accuracy["mape_tpot"] < 0.10,
        },
    }
