"""Scoring configuration (pydantic): weights, tier weights, filter limits, picker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ScorerWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_overlap: float = Field(3.0, ge=0, description="Share of the prompt's blocks already cached there.")
    queue_depth: float = Field(1.0, ge=0, description="Fewer queued requests (scraped waiting + in flight).")
    kv_utilization: float = Field(0.5, ge=0, description="More free KV cache (1 - kv_cache_usage_perc).")
    inflight_load: float = Field(
        1.5, ge=0, description="Less uncached prefill work kvsched has sent there and not yet seen start."
    )


class TierWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: float = Field(1.0, ge=0, le=1, description="Value of a block matched in GPU memory.")
    cpu: float = Field(
        0.6, ge=0, le=1, description="Value of a block matched in CPU memory (must be reloaded)."
    )
    storage: float = Field(
        0.3, ge=0, le=1, description="Value of a block matched in storage (slowest to reload)."
    )


class FilterLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_waiting: int = Field(128, ge=1, description="An endpoint with more queued requests is saturated.")
    max_kv_usage: float = Field(
        0.98, gt=0, le=1, description="An endpoint with a fuller KV cache is saturated."
    )
    metrics_stale_after_s: float = Field(
        2.0, gt=0, description="Older scraped metrics are not trusted: only kvsched's own accounting counts."
    )


class ScoringConfig(BaseModel):
    """How candidates are filtered, scored and ordered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: ScorerWeights = Field(default_factory=ScorerWeights)
    tiers: TierWeights = Field(default_factory=TierWeights)
    limits: FilterLimits = Field(default_factory=FilterLimits)
    mode: Literal["max_score", "softmax"] = Field(
        "max_score", description="'max_score' picks the best; 'softmax' samples by score with a temperature."
    )
    temperature: float = Field(0.05, gt=0, le=10, description="Softmax temperature (score units).")
    num_fallbacks: int = Field(2, ge=0, le=8, description="Endpoints listed after the primary, best first.")
    tie_epsilon: float = Field(
        0.02, ge=0, le=1, description="Scores this close to the best count as a tie, broken on load."
    )
