"""InferencePool discovery: the pool's ready pods as kvsched endpoints (an ``EndpointSource``).

Two watches per namespace: the InferencePools, and every Pod of the namespace (matched to
each pool's selector here, so a changed selector needs no new watch; this is also what the
Inference Extension's own EPP does through its informer cache). Pool API facts (shared
PROTOCOLS.md §4):

- ``inference.networking.k8s.io/v1``: ``spec.selector.matchLabels`` (1-64 labels) and
  ``spec.targetPorts[].number`` (1-8 ports);
- ``inference.networking.x-k8s.io/v1alpha2``: ``spec.selector`` is the label map itself and
  ``spec.targetPortNumber`` the one port.

A pod is an endpoint when it is Ready (``status.conditions[type=Ready].status == "True"``),
has ``status.podIP`` and is not terminating (no ``metadata.deletionTimestamp``): one endpoint
per target port, addressed ``podIP:port`` (what the gateway receives in
``x-gateway-destination-endpoint``) and named ``namespace/pod:port``.

KV events: the pool default (``kv_events`` of the config, or the SchedulingPolicy's
``kvEvents``) unless the pod's annotations say otherwise. The i-th target port is taken to be
data-parallel rank i of the pod, which vLLM publishes on the KV ports + i.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.adapters.discovery import EndpointDefaults, StaticEndpointSpec
from scheduler.adapters.kubernetes.client import PODS, KubeClient, ResourceType
from scheduler.adapters.kubernetes.reflector import Backoff, Reflector, Snapshot
from scheduler.core.scheduler import POOL_LABEL, Endpoint
from scheduler.core.scoring.disaggregation import ROLE_LABEL

log = logging.getLogger(__name__)

POOL_V1 = ResourceType("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
POOL_V1ALPHA2 = ResourceType("inference.networking.x-k8s.io", "v1alpha2", "inferencepools", "InferencePool")
POOL_RESOURCES = {resource.api_version: resource for resource in (POOL_V1, POOL_V1ALPHA2)}

# Pod annotations that override the pool's KV-event defaults for one pod. A port of "0"
# (or "none"/"false") means: no KV events (approximate mode), or no replay socket.
KV_EVENTS_PORT_ANNOTATION = "kvsched.io/kv-events-port"
KV_REPLAY_PORT_ANNOTATION = "kvsched.io/kv-replay-port"
KV_TOPIC_ANNOTATION = "kvsched.io/kv-topic"

POD_LABEL = "kvsched.io/pod"

_OFF = {"0", "none", "false", "off"}


@dataclass(frozen=True, slots=True)
class PoolSpec:
    namespace: str
    name: str
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PoolSpecError(ValueError):
    """An InferencePool object kvsched cannot use."""


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    api_version = str(obj.get("apiVersion", POOL_V1.api_version))
    selector: Any
    ports: list[Any]
    if api_version == POOL_V1ALPHA2.api_version:
        selector = spec.get("selector")
        number = spec.get("targetPortNumber")
        ports = [] if number is None else [number]
    else:
        selector = (spec.get("selector") or {}).get("matchLabels")
        ports = [entry.get("number") for entry in spec.get("targetPorts") or [] if isinstance(entry, Mapping)]
    if not isinstance(selector, Mapping) or not selector:
        # An empty selector would match every pod of the namespace; the API requires >= 1 label.
        raise PoolSpecError("no selector labels")
    if not ports or not all(isinstance(port, int) and 0 < port < 65536 for port in ports):
        raise PoolSpecError(f"target ports {ports!r} are not 1-65535")
    return PoolSpec(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        selector={str(k): str(v) for k, v in selector.items()},
        target_ports=tuple(dict.fromkeys(ports)),
    )


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in status.get("conditions") or []
    )


def selects(selector: Mapping[str, str], pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def _port_annotation(annotations: Mapping[str, str], key: str, pod: str) -> int | bool | None:
    """The annotated port, False for "no socket", None when absent or unusable (logged)."""
    text = annotations.get(key)
    if text is None:
        return None
    text = str(text).strip().lower()
    if text in _OFF:
        return False
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    log.warning("pod %s: annotation %s=%r is not a port; using the pool default", pod, key, text)
    return None


def pod_endpoints(pool: PoolSpec, pod: Mapping[str, Any], defaults: EndpointDefaults) -> list[Endpoint]:
    """The endpoints of one ready pod of ``pool``, one per target port."""
    metadata = pod.get("metadata") or {}
    name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace", pool.namespace))
    ip = str((pod.get("status") or {}).get("podIP"))
    host = f"[{ip}]" if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address) else ip
    annotations = metadata.get("annotations") or {}
    kv_port = _port_annotation(annotations, KV_EVENTS_PORT_ANNOTATION, name)
    replay_port = _port_annotation(annotations, KV_REPLAY_PORT_ANNOTATION, name)
    topic = annotations.get(KV_TOPIC_ANNOTATION)
    labels = {POOL_LABEL: pool.key, POD_LABEL: name}
    # The prefill/decode role travels with the endpoint (core/scoring/disaggregation.py).
    role = (metadata.get("labels") or {}).get(ROLE_LABEL)
    if role is not None:
        labels[ROLE_LABEL] = str(role)
    endpoints = []
    for rank, port in enumerate(pool.target_ports):
        kv_events: str | bool = False
        kv_replay: str | bool = False
        if defaults.kv_events and kv_port is not False:
            live = defaults.kv_port if kv_port is None else kv_port
            kv_events = f"tcp://{host}:{live + rank}"
            replay = defaults.replay_port if replay_port is None else replay_port
            if replay is not None and replay is not False:
                kv_replay = f"tcp://{host}:{replay + rank}"
        spec = StaticEndpointSpec(
            address=f"{host}:{port}",
            name=f"{namespace}/{name}:{port}",
            kv_events=kv_events,
            kv_replay=kv_replay,
            kv_topic=None if topic is None else str(topic),
            labels=labels,
        )
        endpoints.append(spec.to_endpoint(defaults))
    return endpoints


def pool_endpoints(
    pools: Sequence[PoolSpec], pods: Iterable[Mapping[str, Any]], defaults: EndpointDefaults
) -> list[Endpoint]:
    """Every endpoint of the pools, sorted by name; a pod in two pools counts once (first pool)."""
    ready = [pod for pod in pods if pod_is_ready(pod)]
    found: dict[str, Endpoint] = {}
    for pool in pools:
        for pod in ready:
            if (pod.get("metadata") or {}).get("namespace", pool.namespace) != pool.namespace:
                continue
            if not selects(pool.selector, pod):
                continue
            try:
                endpoints = pod_endpoints(pool, pod, defaults)
            except ValueError as exc:
                log.warning("pod %s skipped: %s", (pod.get("metadata") or {}).get("name"), exc)
                continue
            for endpoint in endpoints:
                found.setdefault(endpoint.name, endpoint)
    return [found[name] for name in sorted(found)]


class InferencePoolSource:
    """The endpoints of the named InferencePools of one namespace, as full sets on every change."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pools: Sequence[str],
        defaults: EndpointDefaults,
        *,
        pool_resource: ResourceType = POOL_V1,
        backoff: Backoff | None = None,
        watch_timeout_s: float | None = None,
    ) -> None:
        self.namespace = namespace
        self.pool_names = tuple(pools)
        self.pool_resource = pool_resource
        self._defaults = defaults
        watch_options: dict[str, Any] = {"backoff": backoff}
        if watch_timeout_s is not None:
            watch_options["watch_timeout_s"] = watch_timeout_s
        self.pool_reflector = Reflector(client, pool_resource, namespace, self._on_pools, **watch_options)
        self.pod_reflector = Reflector(client, PODS, namespace, self._on_pods, **watch_options)
        self._pools: Snapshot | None = None
        self._pods: Snapshot | None = None
        self._endpoints: list[Endpoint] | None = None
        self._version = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._reported: dict[str, str] = {}

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.pool_reflector.start()
        self.pod_reflector.start()

    async def stop(self) -> None:
        self._closed = True
        self._changed.set()
        await asyncio.gather(self.pool_reflector.stop(), self.pod_reflector.stop())

    # --- inputs --------------------------------------------------------------------------

    @property
    def defaults(self) -> EndpointDefaults:
        return self._defaults

    def set_defaults(self, defaults: EndpointDefaults) -> None:
        """New pool-wide KV-event defaults (a SchedulingPolicy's ``kvEvents``)."""
        if defaults != self._defaults:
            self._defaults = defaults
            self._recompute()

    def _on_pools(self, snapshot: Snapshot) -> None:
        self._pools = snapshot
        self._recompute()

    def _on_pods(self, snapshot: Snapshot) -> None:
        self._pods = snapshot
        self._recompute()

    def pools(self) -> list[PoolSpec]:
        """The served pools that exist and are usable, in configured order."""
        found = []
        for name in self.pool_names:
            key = f"{self.namespace}/{name}"
            obj = (self._pools or {}).get(key)
            problem = ""
            if obj is None:
                problem = f"InferencePool {key} ({self.pool_resource.api_version}) not found"
            else:
                try:
                    found.append(parse_pool(obj))
                except PoolSpecError as exc:
                    problem = f"InferencePool {key} is unusable: {exc}"
            self._report(key, problem)
        return found

    def _report(self, key: str, problem: str) -> None:
        """Log a pool's problem once when it appears and once when it is gone."""
        previous = self._reported.get(key, "")
        if problem == previous:
            return
        self._reported[key] = problem
        if problem:
            log.warning("%s; it contributes no endpoints", problem)
        elif previous:
            log.info("InferencePool %s is usable again", key)

    def _recompute(self) -> None:
        if self._pools is None or self._pods is None:
            return  # not both listed yet: an empty set now would be a false "no endpoints"
        endpoints = pool_endpoints(self.pools(), self._pods.values(), self._defaults)
        if endpoints != self._endpoints:
            self._endpoints = endpoints
            self._version += 1
            self._changed.set()

    # --- EndpointSource ------------------------------------------------------------------

    @property
    def endpoints(self) -> list[Endpoint] | None:
        """The current set; None until both watches have listed."""
        return None if self._endpoints is None else list(self._endpoints)

    async def updates(self) -> AsyncIterator[list[Endpoint]]:
        seen = 0
        while not self._closed:
            if seen != self._version and self._endpoints is not None:
                seen = self._version
                yield list(self._endpoints)
                continue
            changed = self._changed
            await changed.wait()
            if changed is self._changed:
                self._changed = asyncio.Event()
