"""Scoring configuration: scorer weights, cache-tier values, filter limits, picker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ScorerWeights(BaseModel):
    """Relative weight of each scorer; totals are divided by the sum, so only ratios matter.

    The defaults put prefix overlap at half the total: a full cache hit outweighs any one
    load signal, yet the three load signals together can still move a request off a hot
    endpoint. A weight of 0 turns a scorer off (it is not computed); all zero leaves every
    candidate tied, i.e. pure least-loaded picking.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_overlap: float = Field(
        3.0, ge=0, description="Tier-weighted share of the prompt's blocks the endpoint already caches."
    )
    queue_depth: float = Field(
        1.0, ge=0, description="Fewer requests ahead: scraped waiting (when trusted) + kvsched's in-flight."
    )
    kv_utilization: float = Field(
        0.5, ge=0, description="More free KV cache: 1 - vllm:kv_cache_usage_perc (when trusted)."
    )
    inflight_load: float = Field(
        1.5,
        ge=0,
        description="Less prefill work ahead of this request's first token: kvsched's in-flight prefill "
        "tokens there plus this request's uncached tokens there.",
    )
    predicted_latency: float = Field(
        0.0,
        ge=0,
        description="Lower predicted TTFT there (the latency predictor's estimate, relative to the best "
        "candidate); used only when a predictor is running.",
    )


class TierWeights(BaseModel):
    """What one matched block is worth, by the tier holding it (GPU = a free hit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: float = Field(1.0, ge=0, le=1, description="Value of a matched block held in GPU memory.")
    cpu: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Value of a matched block held in CPU memory: reloaded over PCIe, far cheaper "
        "than recomputing it.",
    )
    storage: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Value of a matched block held in local/remote storage: the slowest reload.",
    )


class FilterLimits(BaseModel):
    """When an endpoint counts as saturated, and when its scraped metrics are too old."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_waiting: int = Field(
        128,
        ge=0,
        description="Saturated above this many waiting requests (the Gateway API Inference "
        "Extension's low-queue filter uses the same figure).",
    )
    max_kv_usage: float = Field(
        0.98, gt=0, le=1, description="Saturated above this KV-cache usage (0..1): admitting more evicts."
    )
    metrics_stale_after_s: float = Field(
        2.0,
        gt=0,
        description="Scraped metrics older than this (or never scraped) are not trusted: the endpoint "
        "stays eligible, scored on kvsched's own in-flight accounting only, and is never "
        "judged saturated.",
    )


class ScoringConfig(BaseModel):
    """How candidates are filtered, scored and ordered. Immutable: reload by building a new pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: ScorerWeights = Field(default_factory=ScorerWeights, description="Scorer weights.")
    tiers: TierWeights = Field(default_factory=TierWeights, description="Matched-block value per tier.")
    limits: FilterLimits = Field(default_factory=FilterLimits, description="Saturation and staleness.")
    mode: Literal["max_score", "softmax"] = Field(
        "max_score",
        description="'max_score': the best total wins (near-ties broken on load); 'softmax': the "
        "primary is sampled with probability proportional to exp(total / temperature).",
    )
    temperature: float = Field(
        0.05, gt=0, le=10, description="Softmax temperature, in units of the [0, 1] total score."
    )
    num_fallbacks: int = Field(2, ge=0, le=8, description="Endpoints listed after the primary.")
    slo_margin: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="A candidate counts as meeting a request's SLO when its predicted TTFT (TPOT) is "
        "within (1 - slo_margin) x the objective: room for prediction error.",
    )
    slo_unmeetable: Literal["score", "fastest"] = Field(
        "score",
        description="When no candidate is predicted to meet a request's SLO: 'score' orders by the "
        "usual total, as for a request without SLO (cache affinity keeps the pool's effective "
        "capacity); 'fastest' puts the lowest predicted TTFT first. On the Mooncake conversation "
        "trace at twice its rate, 'score' kept 31.6% of requests within a 1 s TTFT and 'fastest' "
        "15.8%: under overload, chasing the fastest prediction scatters prefixes across workers.",
    )
    tie_epsilon: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Totals within this of the best count as tied; ties go to the least loaded.",
    )
