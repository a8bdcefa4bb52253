"""A workload: requests with arrival times and prompt token ids, independent of any target."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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
