"""``dynamo``: NVIDIA Dynamo's KV router, its default worker selector and active-block accounting.

Follows ai-dynamo/dynamo v0.4.x, where the selector is the documented cost function
(https://docs.nvidia.com/dynamo/archive/0.4.0/components/router/README.html, "Cost Function"):

* ``lib/llm/src/kv_router/scheduler.rs``, ``DefaultWorkerSelector::select_worker``: per
  worker ``logit = overlap_score_weight * potential_prefill_blocks + potential_decode_blocks``,
  lowest wins; ``softmax_sample``: at temperature 0 a uniformly random one of the workers
  whose logit equals the minimum, above 0 a draw from ``softmax(-logit / (max - min) /
  temperature)`` (every worker equally likely when all logits are equal);
* ``lib/llm/src/kv_router/sequence.rs``, ``ActiveSequences``: per worker the requests the
  router sent there and has not freed. ``potential_prefill_blocks`` is (the prefill tokens of
  those requests still before their first token, plus this request's new tokens
  ``isl - overlap * block_size``) / block_size; ``potential_decode_blocks`` is the number of
  distinct blocks of those requests' prompts plus the blocks of this prompt not among them.
  So a new request's own prefill counts on both sides, and a prompt sharing blocks with
  requests already running there adds only its new blocks. A request's prefill tokens are
  dropped at its first token (``mark_prefill_completed``), its blocks when it is freed;
  output blocks are not tracked (``router_track_output_blocks`` defaults to false in later
  versions, and v0.4 has no such tracking);
* ``lib/llm/src/kv_router.rs``, ``KvRouterConfig::default``: ``overlap_score_weight`` 1.0,
  ``router_temperature`` 0.0.

``overlap`` is the worker's matched prefix in blocks from KV events (kvsched's index, every
tier counted as Dynamo 0.4's indexer does). Dynamo returns one worker; the fallbacks
listed after it are the rest by logit, lowest first. Dynamo's five-minute force-expiry of
requests it never hears the end of is left out: every request routed here completes or
fails through the Scheduler's lifecycle calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.core.policies.base import (
    NO_HEALTHY_ENDPOINT,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
    eligible,
)
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import NO_ELIGIBLE_IN_SUBSET

DYNAMO_OVERLAP_SCORE_WEIGHT = 1.0
DYNAMO_ROUTER_TEMPERATURE = 0.0


@dataclass(frozen=True, slots=True)
class DynamoParams:
    overlap_score_weight: float = DYNAMO_OVERLAP_SCORE_WEIGHT
    temperature: float = DYNAMO_ROUTER_TEMPERATURE


@dataclass(slots=True)
class _Worker:
    """``ActiveSequences`` of one worker: block -> requests holding it, prefill tokens pending."""

    block_refs: dict[int, int] = field(default_factory=dict)
    active_prefill_tokens: int = 0

    def new_blocks(self, keys: list[int]) -> int:
        refs = self.block_refs
        return sum(1 for key in keys if key not in refs)


@dataclass(slots=True)
class _Request:
    endpoint: str
    keys: list[int]
    prefill_tokens: int  # counted in the worker's active prefill until the first token


class DynamoKVRouter(RoutingPolicy):
    def __init__(self, setup: PolicySetup, params: DynamoParams | None = None) -> None:
        self.block_size = setup.block_size
        self.params = params or DynamoParams()
        self._workers: dict[str, _Worker] = {}
        self._requests: dict[str, _Request] = {}
        self._keys: tuple[str, list[int]] = ("", [])  # the last routed request's block keys

    # --- routing ------------------------------------------------------------------------------

    def logits(self, data: PolicyInput, names: list[str], keys: list[int]) -> list[float]:
        """Each named worker's cost for this request (lower is better)."""
        block_size = self.block_size
        isl = data.request.prompt_tokens
        weight = self.params.overlap_score_weight
        out = []
        for name in names:
            worker = self._workers.get(name) or _Worker()
            match = data.matches.get(name)
            overlap = match.total_blocks if match is not None else 0
            new_tokens = max(isl - overlap * block_size, 0)
            prefill_blocks = (worker.active_prefill_tokens + new_tokens) / block_size
            decode_blocks = len(worker.block_refs) + worker.new_blocks(keys)
            out.append(weight * prefill_blocks + decode_blocks)
        return out

    def route(self, data: PolicyInput) -> Routing:
        candidates = eligible(data.endpoints, data.request.subset)
        if not candidates:
            reason = NO_ELIGIBLE_IN_SUBSET if data.request.subset is not None else NO_HEALTHY_ENDPOINT
            return Routing([], reason, {"policy": "dynamo"})
        keys = [int(key) for key in data.block_keys]
        self._keys = (data.request.request_id, keys)
        # Name order, so that the draw below does not depend on discovery order.
        names = sorted(s.name for s in candidates)
        logits = self.logits(data, names, keys)
        primary = self._select(logits, data)
        rest = sorted((i for i in range(len(names)) if i != primary), key=lambda i: (logits[i], names[i]))
        order = [names[i] for i in [primary, *rest]][: data.wanted]
        explanation = {"policy": "dynamo", "logits": dict(zip(names, logits, strict=True)), "order": order}
        return Routing(order, "", explanation)

    def _select(self, logits: list[float], data: PolicyInput) -> int:
        """``softmax_sample``: the position of the chosen worker."""
        temperature = self.params.temperature
        if temperature == 0.0:
            lowest = min(logits)
            ties = [i for i, logit in enumerate(logits) if logit == lowest]
            return ties[data.rng.randrange(len(ties))] if len(ties) > 1 else ties[0]
        low, high = min(logits), max(logits)
        if low == high:
            weights = [1.0] * len(logits)
        else:
            scaled = [-logit / (high - low) / temperature for logit in logits]
            top = max(scaled)
            weights = [math.exp(value - top) for value in scaled]
        total = sum(weights)
        sample = data.rng.random()
        cumulative = 0.0
        for position, weight in enumerate(weights):
            cumulative += weight / total
            if sample <= cumulative:
                return position
        return len(logits) - 1

    # --- active sequences -------------------------------------------------------------------

    def on_routed(
        self, request_id: str, endpoint: str, prompt_tokens: int, prefill_tokens: int, now: float
    ) -> None:
        previous = self._requests.pop(request_id, None)
        if previous is not None:
            self._free(previous)
            keys = previous.keys
        else:
            rid, routed_keys = self._keys
            keys = routed_keys if rid == request_id else []
        worker = self._workers.setdefault(endpoint, _Worker())
        refs = worker.block_refs
        for key in keys:
            refs[key] = refs.get(key, 0) + 1
        worker.active_prefill_tokens += prefill_tokens
        self._requests[request_id] = _Request(endpoint, keys, prefill_tokens)

    def on_first_token(self, request_id: str, now: float) -> None:
        request = self._requests.get(request_id)
        if request is not None and request.prefill_tokens:
            self._workers[request.endpoint].active_prefill_tokens -= request.prefill_tokens
            request.prefill_tokens = 0

    def on_completed(self, request_id: str, now: float) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._free(request)

    def _free(self, request: _Request) -> None:
        worker = self._workers[request.endpoint]
        worker.active_prefill_tokens -= request.prefill_tokens
        refs = worker.block_refs
        for key in request.keys:
            count = refs[key] - 1
            if count:
                refs[key] = count
            else:
                del refs[key]

    def active(self, endpoint: str) -> tuple[int, int]:
        """(distinct active blocks, prefill tokens before their first token) on ``endpoint``."""
        worker = self._workers.get(endpoint) or _Worker()
        return len(worker.block_refs), worker.active_prefill_tokens


register_policy(
    "dynamo",
    DynamoKVRouter,
    description="NVIDIA Dynamo's KV router: overlap weight x prefill blocks + active decode blocks, lowest.",
)
