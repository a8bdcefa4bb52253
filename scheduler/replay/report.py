"""The replay report: one JSON object per run, identical for live and simulated runs.

Percentiles use numpy's default (linear interpolation between closest ranks). Latency
statistics cover completed requests only; failed ones are counted and explained.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestOutcome:
    """One request's measurements, in seconds (wall clock live, virtual time simulated)."""

    request_id: str
    ok: bool
    start_s: float
    endpoint: str | None = None
    error: str = ""
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    first_token_s: float | None = None
    end_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.end_s is None or self.first_token_s is None or self.completion_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.completion_tokens - 1)


def latency_summary(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


def build_report(
    outcomes: Sequence[RequestOutcome],
    *,
    policy: str,
    mode: str,
    workers: int,
    oracle_hit_ratio: float | None,
    token_scale: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    done = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    ttft = [v for o in done if (v := o.ttft_s) is not None]
    # One simulated output token of a scaled trace stands for token_scale real ones.
    tpot = [v / token_scale for o in done if (v := o.tpot_s) is not None]
    e2e = [v for o in done if (v := o.e2e_s) is not None]
    reported = [o for o in done if o.cached_tokens is not None]
    prompt = sum(o.prompt_tokens for o in reported)
    hit_ratio = sum(o.cached_tokens or 0 for o in reported) / prompt if prompt else None
    if outcomes:
        first = min(o.start_s for o in outcomes)
        last = max((o.end_s for o in done if o.end_s is not None), default=first)
        duration = max(last - first, 1e-9)
    else:
        duration = 0.0
    report: dict[str, Any] = {
        "policy": policy,
        "mode": mode,
        "workers": workers,
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(failed),
        "ttft_ms": latency_summary(ttft),
        "tpot_ms": latency_summary(tpot),
        "e2e_ms": latency_summary(e2e),
        "hit_ratio": hit_ratio,
        "oracle_hit_ratio": oracle_hit_ratio,
        "throughput_rps": len(done) / duration if duration else 0.0,
        "duration_s": duration,
        "output_tokens_per_s": sum(o.completion_tokens for o in done) * token_scale / duration
        if duration
        else 0.0,
        "token_scale": token_scale,
        "per_endpoint": dict(sorted(Counter(o.endpoint or "-" for o in done).items())),
        "failures": dict(Counter(o.error.split(":")[0] for o in failed).most_common(10)),
        "samples": {"ttft_ms": [round(v * 1000.0, 3) for v in ttft]},
    }
    if extra:
        report.update(extra)
    return report
