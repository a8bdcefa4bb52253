"""A workload: requests with arrival times and prompt token ids, independent of any target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    request_id: str
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    session_id: str | None = None


@dataclass(slots=True)
class Workload:
    name: str
    requests: list[WorkloadRequest]
    # One token of this workload stands for token_scale real tokens (traces scaled down).
    token_scale: float = 1.0
    # Block granularity of the prefix structure, in this workload's tokens.
    block_tokens: int = 16
    meta: dict[str, object] = field(default_factory=dict)

    def limited(self, limit: int | None) -> Workload:
        if limit is None or limit >= len(self.requests):
            return self
        return Workload(
            self.name, self.requests[:limit], self.token_scale, self.block_tokens, dict(self.meta)
        )

    def time_scaled(self, factor: float) -> Workload:
        """Arrivals stretched by ``factor`` (< 1 compresses time, raising the load)."""
        if factor == 1.0:
            return self
        scaled = [
            WorkloadRequest(
                r.request_id, r.arrival_s * factor, r.prompt_token_ids, r.max_tokens, r.session_id
            )
            for r in self.requests
        ]
        return Workload(self.name, scaled, self.token_scale, self.block_tokens, dict(self.meta))


def prompt_tokens(requests: Sequence[WorkloadRequest]) -> int:
    return sum(len(r.prompt_token_ids) for r in requests)
