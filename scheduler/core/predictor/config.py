"""Latency predictor settings: when to train, how much to keep, the trees, the prior."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class XGBoostParams(BaseModel):
    """Gradient-boosted trees, one ensemble per target (TTFT, TPOT)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_estimators: int = Field(
        100, ge=1, le=2000, description="Boosting rounds (trees per target); predict cost grows linearly."
    )
    max_depth: int = Field(
        4,
        ge=1,
        le=16,
        description="Depth of each tree; predict cost grows linearly with it. 4, not 6: the trees "
        "correct a prior from a few hundred to a few thousand noisy samples, and deeper trees fit "
        "the noise (kvsched bench policies --size short, conversation moderate: 28.8% TTFT MAPE at "
        "depth 6 with single-sample leaves, 17.2% at depth 4 with 10).",
    )
    learning_rate: float = Field(0.1, gt=0, le=1, description="Shrinkage applied to each tree (eta).")
    min_child_weight: float = Field(
        10.0,
        ge=0,
        description="Least hessian a leaf may hold: samples, for squared error and for the "
        "relative loss (its weights are scaled to a mean of 1).",
    )
    subsample: float = Field(1.0, gt=0, le=1, description="Share of the training rows each tree is grown on.")
    nthread: int = Field(
        1,
        ge=1,
        description="Threads a fit may use. 1 by default so that training in the background leaves "
        "the other cores to picking.",
    )
    seed: int = Field(0, description="Random seed of the fit (row subsampling).")


class PriorCoefficients(BaseModel):
    """The analytic prior before any refit. Defaults: Llama-3-8B on one H100 (see sim/latency.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_base_ms: float = Field(
        10.0, ge=0, description="TTFT of a tiny prompt on an idle endpoint: one engine step and overheads."
    )
    ttft_ms_per_uncached_token: float = Field(
        0.036,
        gt=0,
        description="Prefill cost of one prompt token, the request's own or one queued ahead of it "
        "(about 27.6k tokens/s), before any refit; also the rate queued prefill is estimated to "
        "drain at on an endpoint until its own first tokens have measured it.",
    )
    ttft_ms_per_attention_pair: float = Field(
        1.3e-6,
        ge=0,
        description="Prefill attention cost of one causal (query, key) pair of the request's own "
        "prefill (1.3 ns: sim/latency.py's figure for Llama-3-8B on an H100).",
    )
    ttft_ms_at_full_kv_usage: float = Field(
        22.6,
        ge=0,
        description="What the decode batch's KV reads add to a first token with the whole KV cache "
        "in use: one iteration reading ~443k tokens of KV at 51 ns each (sim/latency.py).",
    )
    ttft_ms_per_decode_request: float = Field(
        0.02,
        ge=0,
        description="What each request in the decode batch adds to a first token: one iteration's "
        "per-sequence work (sim/latency.py).",
    )
    ttft_ms_per_prefill_token_per_decode_request: float = Field(
        1.5e-5,
        ge=0,
        description="What each request in the decode batch adds per prefill token ahead and own: "
        "every iteration of that prefill also carries the batch, whose per-sequence work and KV "
        "reads (20 us + ~2k tokens of context at 51 ns) recur once per 8,192-token chunk "
        "(sim/latency.py).",
    )
    # 0 by default: the KV-usage term above already prices the blocks the decode batch
    # holds, kvsched's own requests' among them, so a default here (51 ns a token read,
    # sim/latency.py) would count those reads twice until the first refit, which apportions
    # them between the two terms after prior_refit_min_samples samples.
    ttft_ms_per_decode_context_token: float = Field(
        0.0,
        ge=0,
        description="What each prompt token of kvsched's requests decoding there adds to a first "
        "token: every iteration reads each decoding request's whole context, a prefix they share "
        "once per request (KV usage counts it once).",
    )
    ttft_ms_per_waiting_request: float = Field(
        8.0,
        ge=0,
        description="Queueing cost of one scraped waiting request (at least one step each), for the "
        "prefill_wait scorer; the prior prices the queued prefill itself instead.",
    )
    tpot_base_ms: float = Field(
        7.6, ge=0, description="Time per output token of a lone decoding request (one step)."
    )
    tpot_ms_per_running_request: float = Field(
        0.05, ge=0, description="Added time per output token for each other request in the decode batch."
    )


class PredictorConfig(BaseModel):
    """How the TTFT/TPOT predictor learns. Immutable: reconfigure by building a new predictor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="False: predictions come from the prior only; observations are neither stored "
        "nor trained on.",
    )
    min_samples: int = Field(
        200,
        ge=10,
        description="Training samples with a target observed before a trained model replaces the "
        "prior for that target.",
    )
    retrain_every_s: float = Field(
        30.0, gt=0, description="Retrain at most this long after the last install, when new samples arrived."
    )
    retrain_every_samples: int = Field(
        2000, ge=1, description="Retrain sooner once this many samples arrived since the last training job."
    )
    max_samples: int = Field(
        20000,
        ge=1000,
        le=10_000_000,
        description="Bound on stored samples (training and held-out together); memory is about 60 "
        "bytes a sample.",
    )
    holdout_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Share of observations set aside, by a hash of their sequence number, to measure "
        "accuracy on; never trained on.",
    )
    target_transform: Literal["log", "identity"] = Field(
        "log",
        description="Space the trees fit in. 'log' (log1p of milliseconds): squared error there is "
        "relative error, which is what MAPE measures and what latencies spanning orders of magnitude "
        "need; 'identity': milliseconds.",
    )
    loss: Literal["relative", "squared"] = Field(
        "relative",
        description="What the trees minimise in the target space. 'relative': absolute error "
        "weighted by 1 / the observed latency, whose best constant per leaf is the one with the "
        "least MAPE (with 'log', the weighted median ratio); 'squared': squared error, whose "
        "best constant is a mean. Where a latency is bimodal (a short prompt prefilled alone, "
        "or in an iteration with another request's 8,192-token chunk) a mean lands between the "
        "modes and is far off both; the MAPE-optimal answer is near the lower one.",
    )
    residual_to_prior: bool = Field(
        True,
        description="Fit the trees to what the analytic prior gets wrong (in the target space: "
        "log(observed / prior) with 'log') and predict prior x correction. Trees cannot "
        "extrapolate: a model trained while the pool was lightly loaded predicts light-load "
        "latencies whatever the queue. The prior grows with the prefill queued ahead, so the "
        "product follows a queue the trees never saw, and the trees learn only the corrections.",
    )
    require_model_beats_prior: bool = Field(
        True,
        description="Keep the prior for a target whose trained model does worse than it on the "
        "held-out samples (checked when at least min_holdout_for_comparison samples are held out).",
    )
    min_holdout_for_comparison: int = Field(
        20,
        ge=1,
        description="Held-out samples a target needs before the model-vs-prior check applies. The "
        "first job (min_samples training samples) holds out about 20: at 30 its trees went "
        "unchecked, and on the Mooncake conversation trace they answered with 36% held-out MAPE "
        "where the prior had 18%.",
    )
    prior_refit_min_samples: int = Field(
        16,
        ge=4,
        description="Samples a target needs before its prior is refitted; until a model is trained "
        "the prior is refitted each time the sample count doubles.",
    )
    running_mape_window: int = Field(
        500,
        ge=1,
        description="Observations the running MAPE averages over (an exponential moving average "
        "with this span).",
    )
    seed: int = Field(0, description="Seed of the sample store's reservoir sampling.")
    xgboost: XGBoostParams = Field(default_factory=XGBoostParams, description="Tree ensemble settings.")
    prior: PriorCoefficients = Field(
        default_factory=PriorCoefficients, description="Starting coefficients of the analytic prior."
    )
