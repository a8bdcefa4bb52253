"""A workload: requests with arrival times and prompt token ids, independent of any target;
the objectives a run sends with them, and what each request measured.

Shared by the simulated pool (``sim/``) and the load generators and reports (``replay/``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload.

    ``arrival_s`` counts from the workload's start. ``block_ids`` is the source trace's
    own prefix identity (Mooncake hash ids, one per trace block) when there is one;
    generated workloads leave it ``None`` and are compared by their tokens. ``prompt_text``,
    when set, is what a live replay sends instead of the ids; the ids are then the client's
    own count of it (``Workload.with_token_ids``).
    """

    request_id: str
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    session_id: str | None = None
    block_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None
    model: str | None = None  # the model it names (a LoRA adapter's name); None: the pool's


@dataclass(slots=True)
class Workload:
    name: str
    requests: list[WorkloadRequest]
    # One token of this workload stands for token_scale real tokens (traces scaled down).
    token_scale: float = 1.0
    # Block granularity of the prefix structure, in this workload's tokens.
    block_tokens: int = 16
    meta: dict[str, object] = field(default_factory=dict)

    def _with(self, requests: list[WorkloadRequest]) -> Workload:
        return Workload(self.name, requests, self.token_scale, self.block_tokens, dict(self.meta))

    def limited(self, limit: int | None) -> Workload:
        """The first ``limit`` requests (in arrival order)."""
        if limit is None or limit >= len(self.requests):
            return self
        return self._with(self.requests[: max(limit, 0)])

    def time_scaled(self, factor: float) -> Workload:
        """Arrivals stretched by ``factor`` (< 1 compresses time, raising the load)."""
        if factor <= 0:
            raise ValueError("time scale must be positive")
        if factor == 1.0:
            return self
        return self._with([dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in self.requests])

    def with_token_ids(self, encode: Callable[[str], list[int]]) -> Workload:
        """Text requests with ``prompt_token_ids`` set to ``encode(prompt_text)``: the client's
        own tokenizer count, from which hit-ratio ceilings are computed."""
        return self._with(
            [
                r if r.prompt_text is None else dataclasses.replace(r, prompt_token_ids=encode(r.prompt_text))
                for r in self.requests
            ]
        )

    @property
    def duration_s(self) -> float:
        """Time from the first arrival to the last."""
        if not self.requests:
            return 0.0
        arrivals = [r.arrival_s for r in self.requests]
        return max(arrivals) - min(arrivals)


def prompt_tokens(requests: Sequence[WorkloadRequest]) -> int:
    return sum(len(r.prompt_token_ids) for r in requests)


@dataclass(frozen=True, slots=True)
class SLOTargets:
    """Latency objectives a replay sends with every request (None: that one is not set)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __bool__(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def headers(self) -> dict[str, str]:
        """The request headers that carry them (shared PROTOCOLS.md §2, current names)."""
        out: dict[str, str] = {}
        if self.ttft_ms is not None:
            out["x-llm-d-slo-ttft-ms"] = f"{self.ttft_ms:g}"
        if self.tpot_ms is not None:
            out["x-llm-d-slo-tpot-ms"] = f"{self.tpot_ms:g}"
        return out


@dataclass(slots=True)
class RequestOutcome:
    """One request's measurements, in seconds (loop clock live, virtual time simulated)."""

    request_id: str
    ok: bool
    start_s: float
    endpoint: str | None = None
    error: str = ""
    prompt_tokens: int = 0
    # None when the server did not report prompt_tokens_details.cached_tokens.
    cached_tokens: int | None = None
    completion_tokens: int = 0
    first_token_s: float | None = None
    end_s: float | None = None
    # The latency objectives the request was sent with (None: none).
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # What the scheduler predicted for the endpoint it picked, and from what ("model" once
    # the trained model answers, "prior" before); None when it made no prediction.
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    prediction_source: str | None = None
    # What answered the TTFT alone ("model" or "prior"): ``prediction_source`` is "mixed"
    # when the trained trees answer one target and the prior the other.
    predicted_ttft_source: str | None = None
    # When the scheduler routed it: after any wait in flow control's waiting room (None: not
    # known). The prediction is of the endpoint's TTFT from then on.
    routed_s: float | None = None
    # How busy the serving engine was when the request reached it ("idle", "loaded",
    # "saturated"; see sim/virtual.py); None where it is not known (live runs).
    load_regime: str | None = None
    # The client's own count of the streamed text's tokens (None: not counted), and whether
    # its counts disagreed with the server's usage.
    client_completion_tokens: int | None = None
    token_count_mismatch: bool = False
    # The request's TTFT as the serving worker measured it, when it says (the simulated
    # workers do): from its HTTP request's arrival, and from the engine's arrival.
    worker_ttft_s: float | None = None
    engine_ttft_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def routed_ttft_s(self) -> float | None:
        """TTFT from the routing decision (the flow-control wait left out); ``ttft_s`` when
        the routing time is not known."""
        if self.first_token_s is None:
            return None
        return self.first_token_s - (self.start_s if self.routed_s is None else self.routed_s)

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.end_s is None or self.first_token_s is None or self.completion_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.completion_tokens - 1)

    def meets_slo(self, token_scale: float = 1.0) -> bool:
        """Completed within its TTFT and TPOT objectives (an objective not set is met)."""
        if not self.ok:
            return False
        ttft = self.ttft_s
        if self.slo_ttft_ms is not None and (ttft is None or ttft * 1000.0 > self.slo_ttft_ms):
            return False
        tpot = self.tpot_s
        if self.slo_tpot_ms is None or tpot is None:
            return True
        return tpot * 1000.0 / token_scale <= self.slo_tpot_ms

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}
