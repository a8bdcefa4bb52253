"""What the scoring pipeline reads: a snapshot of endpoints and one request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduler.core.index import PrefixMatch

__all__ = ["EndpointState", "PickRequest", "PrefixMatch"]


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One endpoint as the Scheduler knows it at decision time."""

    name: str
    address: str
    # Scraped from the model server (vllm:num_requests_waiting, ..._running, kv_cache_usage_perc).
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    metrics_age_s: float | None = None  # None: never scraped
    healthy: bool = True
    # kvsched's own accounting of what it routed there and is not finished yet.
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    endpoint_class: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PickRequest:
    request_id: str
    prompt_blocks: int
    prompt_tokens: int
    subset: frozenset[str] | None = None  # addresses allowed by a gateway subset hint
