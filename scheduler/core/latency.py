"""The scoring pipeline's latency estimator, answered by the online TTFT/TPOT predictor.

Turns a pick's candidate columns into the predictor's feature rows (one per candidate)
and its batched prediction into the pipeline's ``LatencyEstimate``. The rows stay with the
estimator after the call, so the Scheduler can keep the chosen endpoint's row and train
on it once that request's latencies are observed.
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.core.predictor import FeatureMatrix, LatencyPredictor, candidate_features, candidate_row
from scheduler.core.scoring import Candidates, LatencyEstimate, PickRequest


class PredictorEstimator:
    """``LatencyEstimator`` over a ``LatencyPredictor``."""

    __slots__ = ("_block_size", "_class_id", "last_features", "predictor")

    def __init__(self, predictor: LatencyPredictor, block_size: int, class_id: Callable[[str], int]) -> None:
        self.predictor = predictor
        self._block_size = block_size
        self._class_id = class_id
        self.last_features: FeatureMatrix | None = None

    def features(self, candidates: Candidates, request: PickRequest) -> FeatureMatrix:
        """One feature row per candidate (scheduler/core/predictor/features.py documents them)."""
        states = candidates.states
        block_size = self._block_size
        class_id = self._class_id
        rows = candidate_features(
            request.prompt_tokens,
            # Tier-weighted matched blocks: a block reloaded from CPU saves less than one in GPU.
            [matched * block_size for matched in candidates.matched],
            [s.waiting for s in states],
            [s.running for s in states],
            [s.kv_usage for s in states],
            [s.inflight_prefill_tokens for s in states],
            [s.inflight_decode_requests for s in states],
            [class_id(s.endpoint_class) for s in states],
            [s.queued_prefill_tokens for s in states],
            [s.prefill_tokens_per_s for s in states],
            [s.last_event_age_s for s in states],
            [s.inflight_decode_tokens for s in states],
        )
        self.last_features = rows
        return rows

    def row(self, candidates: Candidates, request: PickRequest, position: int) -> FeatureMatrix:
        """The feature row of one candidate (shape (NUM_FEATURES,)), when only it is needed."""
        s = candidates.states[position]
        return candidate_row(
            request.prompt_tokens,
            candidates.matched[position] * self._block_size,
            s.waiting,
            s.running,
            s.kv_usage,
            s.inflight_prefill_tokens,
            s.inflight_decode_requests,
            self._class_id(s.endpoint_class),
            s.queued_prefill_tokens,
            s.prefill_tokens_per_s,
            s.last_event_age_s,
            s.inflight_decode_tokens,
        )

    def estimate(self, candidates: Candidates, request: PickRequest) -> LatencyEstimate:
        prediction = self.predictor.predict(self.features(candidates, request))
        return LatencyEstimate(prediction.ttft_ms.tolist(), prediction.tpot_ms.tolist(), prediction.source)
