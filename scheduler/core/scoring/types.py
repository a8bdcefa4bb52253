"""What the scoring pipeline reads: a snapshot of endpoints, their prefix matches, one request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The prefix index's own match record (an immutable NamedTuple: total_blocks, gpu_blocks,
# cpu_blocks, storage_blocks). Reused rather than mirrored so a lookup's result goes into a
# pick without a conversion per matching endpoint.
from scheduler.core.index import PrefixMatch

__all__ = ["EndpointState", "LatencyEstimate", "LoraSlots", "PickRequest", "PrefixMatch"]


@dataclass(frozen=True, slots=True)
class LoraSlots:
    """An endpoint's LoRA adapters as vLLM reports them in ``vllm:lora_requests_info``.

    ``running`` and ``waiting`` are the adapters of its running and waiting requests, so
    both hold a GPU adapter slot or are about to; vLLM runs at most ``max_lora`` adapters
    in one batch (vLLM ``vllm/v1/core/sched/scheduler.py``: a waiting request whose
    adapter would make ``len(scheduled_loras) > max_loras`` is skipped until one finishes).
    An adapter loaded but idle appears in neither: taking its slot costs nobody a wait.
    """

    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_lora: int = 0
    # Adapters kvsched routed there lately (at most max_lora, newest kept): likely still
    # loaded, since vLLM keeps an idle adapter until its slot is needed (LRU).
    recent: frozenset[str] = frozenset()

    def has_free_slot(self) -> bool:
        """Some slot is not busy with a running or waiting request's adapter."""
        return len(self.running | self.waiting) < self.max_lora

    def affinity(self, adapter: str) -> float:
        """How well this endpoint suits a request for ``adapter``, in [0, 1]; the scale is
        ``scoring/lora_affinity.py``'s (resident 1, recently routed 0.8, a slot not busy 0.5,
        every slot busy with other adapters 0)."""
        if adapter in self.running or adapter in self.waiting:
            return LORA_RESIDENT
        if not self.has_free_slot():
            return LORA_SLOTS_BUSY
        return LORA_RECENT if adapter in self.recent else LORA_FREE_SLOT


# LoraSlots.affinity's scale; an endpoint that reports no adapter figures gets LORA_UNKNOWN.
LORA_RESIDENT, LORA_RECENT, LORA_FREE_SLOT, LORA_UNKNOWN, LORA_SLOTS_BUSY = 1.0, 0.8, 0.5, 0.5, 0.0


# Not frozen: one is built per endpoint per pick, and a frozen dataclass costs 4.5x more to
# build (5.9 against 1.3 us with these 17 fields, measured): 290 us of a pick over 64
# endpoints. Treat it as immutable all the same (``dataclasses.replace`` for a changed copy).
@dataclass(slots=True)
class EndpointState:
    """One endpoint as known at decision time. Names are unique within one pick."""

    name: str  # stable id, normally the address
    address: str  # "ip:port" to route to
    # Scraped from the model server: vllm:num_requests_waiting, vllm:num_requests_running,
    # vllm:kv_cache_usage_perc (0..1). Trusted only while metrics_age_s is within the limit.
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    metrics_age_s: float | None = None  # None: never scraped
    healthy: bool = True  # decided by the adapter (scrape failures, readiness)
    # kvsched's own accounting: routed there and not finished / not yet past prefill.
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_decode_requests: int = 0  # routed there and past their first token
    # Estimated prefill tokens still queued there ahead of a new request (kvsched's routed
    # tokens drained at the endpoint's measured rate, core/prefillqueue.py), and that rate
    # in tokens per second (0: not measured yet).
    queued_prefill_tokens: float = 0.0
    prefill_tokens_per_s: float = 0.0
    # Seconds since the endpoint was last seen ending an engine iteration (a first token, a
    # finished request, or a KV-event batch); None: never seen.
    last_event_age_s: float | None = None
    # Estimated time of the prefill queued ahead of a new request there (kvsched's in-flight
    # prefill tokens at the latency model's per-token cost), for saturation detection; None
    # when not estimated.
    prefill_ms_ahead: float | None = None
    endpoint_class: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    # Scraped vllm:lora_requests_info, with the adapters of kvsched's own in-flight requests
    # there added to ``running`` (a scrape cannot know them yet); None: not reported (the
    # endpoint serves no adapters, or has not been scraped).
    lora: LoraSlots | None = None
    # Prompt tokens of kvsched's requests decoding there (routed, past their first token):
    # the context every engine iteration reads for them, shared prefixes counted per request.
    inflight_decode_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PickRequest:
    """The request as the pipeline sees it. Fields added later (SLOs, priority) get defaults."""

    request_id: str
    prompt_blocks: int  # full blocks in the prompt
    prompt_tokens: int
    subset: frozenset[str] | None = None  # addresses allowed by a gateway subset hint; None = no hint
    # Latency objectives (request headers, else the InferenceObjective's defaults); None = none.
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    priority: int = 0
    # The session the request names (a configured header); None = none.
    session_id: str | None = None
    # The LoRA adapter the request names as its model; None: the base model.
    adapter: str | None = None
    # Several replicas picking at once (core/peerload.py): this replica's place among them
    # and how many. The primary is then the pick one replica would make for the
    # ``spread_slot``-th of ``spread_of`` requests like this one arriving together, load
    # ties broken by ``spread_key``. (0, 1): the best, as one replica picks.
    spread_slot: int = 0
    spread_of: int = 1
    spread_key: str = ""
    # Leading blocks of the prompt that are a hot prefix (core/hotprefix.py): the load
    # scorers price them as cached on every endpoint. 0: none.
    hot_prefix_blocks: int = 0


@dataclass(frozen=True, slots=True)
class LatencyEstimate:
    """Predicted latency of the request on each candidate, in candidate order."""

    ttft_ms: Sequence[float]
    tpot_ms: Sequence[float]
    source: str  # what answered: "model", "prior", ...
