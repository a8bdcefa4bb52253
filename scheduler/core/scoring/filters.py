"""Filters: which endpoints may take the request at all.

A hard filter removes endpoints outright. A soft filter (saturation) removes them only
while some candidate survives it; when it would remove every candidate the pipeline keeps
them all and flags the decision ``saturated``, so the caller chooses between shedding and
queueing on the least-loaded endpoints.

Stale metrics are deliberately not a filter: an endpoint whose scrape is late is still
reachable, so dropping it would shrink the pool exactly when the scraper struggles. Its
scraped figures are instead not trusted (``trusted[i]`` is False): scorers fall back to
kvsched's own in-flight accounting for it, and the saturation filter never judges it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.rendezvous import session_endpoint
from scheduler.core.scoring.types import LORA_SLOTS_BUSY, EndpointState, PickRequest

NO_ELIGIBLE_IN_SUBSET = "no eligible endpoint in subset hint"
NOT_SESSION_ENDPOINT = "not the session's endpoint"
LORA_SLOTS_ALL_BUSY = "every LoRA slot busy with other adapters"


class Filter(Protocol):
    """``reject`` returns position -> reason for each endpoint it rules out."""

    @property
    def name(self) -> str: ...
    @property
    def soft(self) -> bool: ...
    @property
    def empty_reason(self) -> str: ...

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]: ...


class SubsetHintFilter:
    """Only addresses the gateway allowed (x-gateway-destination-endpoint-subset)."""

    name = "subset_hint"
    soft = False
    empty_reason = NO_ELIGIBLE_IN_SUBSET
    reason = "not in subset hint"

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        subset = request.subset
        if subset is None:
            return {}
        reason = self.reason
        return {i: reason for i, s in enumerate(states) if s.address not in subset}


class HealthFilter:
    name = "unhealthy"
    soft = False
    empty_reason = "no healthy endpoint"
    reason = "unhealthy"

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        reason = self.reason
        return {i: reason for i, s in enumerate(states) if not s.healthy}


class SaturationFilter:
    """Too many waiting requests or too full a KV cache, by trusted metrics only."""

    name = "saturated"
    soft = True
    empty_reason = "every endpoint is saturated"

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        limits = config.limits
        max_waiting, max_kv = limits.max_waiting, limits.max_kv_usage
        over = [
            i
            for i, (s, t) in enumerate(zip(states, trusted, strict=True))
            if t and (s.waiting > max_waiting or s.kv_usage > max_kv)
        ]
        rejected: dict[int, str] = {}
        for i in over:
            s = states[i]
            if s.waiting > max_waiting:
                rejected[i] = f"saturated: {s.waiting} waiting > max_waiting {max_waiting}"
            else:
                rejected[i] = f"saturated: kv_usage {s.kv_usage:.3f} > max_kv_usage {max_kv}"
        return rejected


class SessionAffinityFilter:
    """With ``session_affinity.hard``: only the session's endpoint among those still eligible."""

    name = "session_affinity"
    soft = False
    empty_reason = "no endpoint for the session"

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        session = request.session_id
        if not config.session_affinity.hard or not session or not states:
            return {}
        home = session_endpoint(session, [s.name for s in states])
        return {i: NOT_SESSION_ENDPOINT for i in range(len(states)) if i != home}


class LoraSlotFilter:
    """For a request naming a LoRA adapter: leaves out the endpoints whose every adapter slot
    is busy with other adapters (the request would wait there for one to drain), while some
    candidate can take it without that; keeps them all otherwise. Applies while the
    ``lora_affinity`` scorer has a weight (``scoring/lora_affinity.py``)."""

    name = "lora_slots_busy"
    soft = False
    empty_reason = LORA_SLOTS_ALL_BUSY

    def reject(
        self,
        states: Sequence[EndpointState],
        trusted: Sequence[bool],
        request: PickRequest,
        config: ScoringConfig,
    ) -> dict[int, str]:
        adapter = request.adapter
        if adapter is None or not config.weights.get("lora_affinity", 0.0) > 0.0:
            return {}
        busy = [
            i
            for i, s in enumerate(states)
            if (slots := s.lora) is not None and slots.affinity(adapter) == LORA_SLOTS_BUSY
        ]
        if len(busy) == len(states):
            return {}
        return dict.fromkeys(busy, LORA_SLOTS_ALL_BUSY)


def default_filters() -> list[Filter]:
    # The subset hint first: an endpoint the gateway excluded is reported as such, whatever its
    # state. The session's endpoint is chosen among the healthy ones, so a session moves only
    # when its endpoint fails; saturation, a soft filter, then judges what is left.
    return [SubsetHintFilter(), HealthFilter(), SessionAffinityFilter(), LoraSlotFilter(), SaturationFilter()]
