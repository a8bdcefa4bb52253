"""Endpoint discovery: where the set of model-server endpoints comes from.

A source yields *full* endpoint sets (never deltas), each replacing the previous one; the
serving process hands every set to ``Scheduler.set_endpoints`` and starts or stops the
per-endpoint scraping and KV-event subscriptions from the difference. A static list (the
config file, ``--endpoint`` flags) is one source; the Kubernetes InferencePool watcher
(``scheduler.adapters.kubernetes.pools``) is another behind the same ``EndpointSource``
interface.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.core.scheduler import Endpoint

# vLLM's default KV-event ports in the GIE / llm-d deployment guides (shared PROTOCOLS.md §1).
DEFAULT_KV_PORT = 5557
DEFAULT_REPLAY_PORT = 5558


class EndpointSource(Protocol):
    """Yields the complete desired endpoint set, first at once, then whenever it changes."""

    def updates(self) -> AsyncIterator[list[Endpoint]]: ...


def split_address(address: str) -> tuple[str, int]:
    """``ip:port``, ``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address as [addr]:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r}: port must be 1-65535")
    return host, int(port_text)


_TOPIC_FIELDS = {"host": "h", "port": 1, "address": "h:1", "name": "n"}


def check_topic_template(topic: str) -> str:
    """A topic may name {host}, {port}, {address} and {name}; anything else is an error."""
    try:
        topic.format(**_TOPIC_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"topic {topic!r}: bad placeholder {exc} (known: {{host}}, {{port}}, {{address}}, {{name}})"
        ) from None
    return topic


@dataclass(frozen=True, slots=True)
class EndpointDefaults:
    """Pool-wide settings an endpoint entry may leave out."""

    kv_events: bool = True
    kv_port: int = DEFAULT_KV_PORT
    replay_port: int | None = DEFAULT_REPLAY_PORT
    # May name {host}, {port}, {address} or {name}; "" subscribes to every topic.
    kv_topic: str = ""
    metrics_path: str = "/metrics"


class StaticEndpointSpec(BaseModel):
    """One endpoint as written in the config file or an ``--endpoint`` flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(description="host:port the gateway routes to (x-gateway-destination-endpoint).")
    name: str | None = Field(None, description="Stable id; defaults to the address.")
    metrics_url: str | None = Field(None, description="Defaults to http://<address>/metrics.")
    kv_events: str | bool | None = Field(
        None,
        description="tcp://host:port of the pod's KV-event publisher; true = <host>:kv_events.port, "
        "false = this pod publishes none (approximate mode); unset = the pool default.",
    )
    kv_replay: str | bool | None = Field(
        None,
        description="tcp://host:port of the replay socket; false = none; "
        "unset = <host>:kv_events.replay_port when the live endpoint is derived too.",
    )
    kv_topic: str | None = Field(None, description="ZMQ topic prefix; unset = the pool default.")
    data_parallel_size: int = Field(1, ge=1, le=64, description="Rank r publishes on the KV ports + r.")
    endpoint_class: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("kv_events", "kv_replay")
    @classmethod
    def _check_zmq(cls, value: str | bool | None) -> str | bool | None:
        if isinstance(value, str) and not value.startswith(("tcp://", "ipc://")):
            raise ValueError(f"{value!r} is not a ZMQ endpoint (tcp://host:port)")
        return value

    @field_validator("kv_topic")
    @classmethod
    def _check_topic(cls, value: str | None) -> str | None:
        return None if value is None else check_topic_template(value)

    @field_validator("metrics_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    def to_endpoint(self, defaults: EndpointDefaults) -> Endpoint:
        host, port = split_address(self.address)
        name = self.name or self.address
        events: str | None
        derived = False
        if self.kv_events is False or (self.kv_events is None and not defaults.kv_events):
            events = None
        elif isinstance(self.kv_events, str):
            events = self.kv_events
        else:
            events, derived = f"tcp://{host}:{defaults.kv_port}", True
        replay: str | None = None
        if events is not None:
            if isinstance(self.kv_replay, str):
                replay = self.kv_replay
            elif defaults.replay_port is not None and (
                self.kv_replay is True or (self.kv_replay is None and derived)
            ):
                replay = f"tcp://{host}:{defaults.replay_port}"
        topic = self.kv_topic if self.kv_topic is not None else defaults.kv_topic
        if "{" in topic:
            topic = topic.format(host=host.strip("[]"), port=port, address=self.address, name=name)
        return Endpoint(
            name=name,
            address=self.address,
            kv_events=events,
            kv_replay=replay,
            kv_topic=topic,
            data_parallel_size=self.data_parallel_size,
            metrics_url=self.metrics_url or f"http://{self.address}{defaults.metrics_path}",
            endpoint_class=self.endpoint_class,
            labels=dict(self.labels),
        )


_FLAG_KEYS = {
    "name": "name",
    "metrics": "metrics_url",
    "metrics_url": "metrics_url",
    "kv": "kv_events",
    "kv_events": "kv_events",
    "replay": "kv_replay",
    "kv_replay": "kv_replay",
    "topic": "kv_topic",
    "kv_topic": "kv_topic",
    "dp": "data_parallel_size",
    "data_parallel_size": "data_parallel_size",
    "class": "endpoint_class",
    "endpoint_class": "endpoint_class",
}
_BOOLS = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False, "none": False}


def parse_endpoint_flag(text: str) -> dict[str, Any]:
    """``ADDR[,key=value...]`` (keys: name, metrics, kv, replay, topic, dp, class, label.K) -> a
    StaticEndpointSpec mapping, validated later with the rest of the config."""
    address, *pairs = [part.strip() for part in text.split(",")]
    spec: dict[str, Any] = {"address": address}
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--endpoint {text!r}: {pair!r} is not key=value")
        if key.startswith("label."):
            labels[key[len("label.") :]] = value
            continue
        field = _FLAG_KEYS.get(key)
        if field is None:
            raise ValueError(
                f"--endpoint {text!r}: unknown key {key!r} (known: {', '.join(sorted(_FLAG_KEYS))})"
            )
        if field in ("kv_events", "kv_replay") and value.lower() in _BOOLS:
            spec[field] = _BOOLS[value.lower()]
        else:
            spec[field] = value
    if labels:
        spec["labels"] = labels
    return spec


def build_endpoints(specs: Iterable[StaticEndpointSpec], defaults: EndpointDefaults) -> list[Endpoint]:
    endpoints = [spec.to_endpoint(defaults) for spec in specs]
    names = [endpoint.name for endpoint in endpoints]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate endpoint names: {', '.join(duplicates)}")
    return endpoints


class StaticEndpointSource:
    """A fixed endpoint list; ``replace`` swaps in a new one (a reloaded config file)."""

    def __init__(self, endpoints: Sequence[Endpoint] = ()) -> None:
        self._endpoints = list(endpoints)
        self._version = 0
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def replace(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = list(endpoints)
        self._version += 1
        self._changed.set()

    def close(self) -> None:
        """End every ``updates()`` iteration."""
        self._closed = True
        self._changed.set()

    async def updates(self) -> AsyncIterator[list[Endpoint]]:
        seen = -1
        while not self._closed:
            if seen != self._version:
                seen = self._version
                yield list(self._endpoints)
                continue
            changed = self._changed
            await changed.wait()
            if changed is self._changed:
                self._changed = asyncio.Event()
