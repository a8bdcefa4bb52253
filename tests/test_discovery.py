"""Static endpoint discovery: endpoint entries with pool defaults, --endpoint flags, the source."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from scheduler.adapters.discovery import (
    EndpointDefaults,
    StaticEndpointSource,
    StaticEndpointSpec,
    build_endpoints,
    parse_endpoint_flag,
    split_address,
)
from scheduler.core.scheduler import Endpoint

DEFAULTS = EndpointDefaults()


def test_split_address() -> None:
    assert split_address("10.0.0.5:8000") == ("10.0.0.5", 8000)
    assert split_address("vllm-0.pool.svc:8000") == ("vllm-0.pool.svc", 8000)
    assert split_address("[fd00::5]:8000") == ("[fd00::5]", 8000)
    for bad in ("10.0.0.5", ":8000", "10.0.0.5:0", "10.0.0.5:70000", "fd00::5:8000", "[zz::1]:80", "h:x"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_address_only_gets_pool_defaults() -> None:
    endpoint = StaticEndpointSpec(address="10.0.0.5:8000").to_endpoint(DEFAULTS)
    assert endpoint == Endpoint(
        name="10.0.0.5:8000",
        address="10.0.0.5:8000",
        kv_events="tcp://10.0.0.5:5557",
        kv_replay="tcp://10.0.0.5:5558",
        kv_topic="",
        metrics_url="http://10.0.0.5:8000/metrics",
    )


def test_explicit_live_endpoint_has_no_derived_replay() -> None:
    spec = StaticEndpointSpec(address="10.0.0.5:8000", kv_events="tcp://10.0.0.9:6000")
    endpoint = spec.to_endpoint(DEFAULTS)
    assert (endpoint.kv_events, endpoint.kv_replay) == ("tcp://10.0.0.9:6000", None)
    with_replay = spec.model_copy(update={"kv_replay": True}).to_endpoint(DEFAULTS)
    assert with_replay.kv_replay == "tcp://10.0.0.5:5558"


def test_events_off_per_endpoint_and_per_pool() -> None:
    off = StaticEndpointSpec(address="10.0.0.5:8000", kv_events=False).to_endpoint(DEFAULTS)
    assert (off.kv_events, off.kv_replay) == (None, None)
    pool_off = EndpointDefaults(kv_events=False)
    assert StaticEndpointSpec(address="10.0.0.5:8000").to_endpoint(pool_off).kv_events is None
    forced = StaticEndpointSpec(address="10.0.0.5:8000", kv_events=True).to_endpoint(pool_off)
    assert forced.kv_events == "tcp://10.0.0.5:5557"
    no_replay = StaticEndpointSpec(address="10.0.0.5:8000", kv_replay=False).to_endpoint(DEFAULTS)
    assert (no_replay.kv_events, no_replay.kv_replay) == ("tcp://10.0.0.5:5557", None)
    pool_no_replay = EndpointDefaults(replay_port=None)
    assert StaticEndpointSpec(address="10.0.0.5:8000").to_endpoint(pool_no_replay).kv_replay is None


def test_topic_template_and_other_fields() -> None:
    defaults = EndpointDefaults(kv_topic="kv@{host}@{port}", kv_port=7000, replay_port=7001)
    spec = StaticEndpointSpec(
        address="[fd00::5]:8000",
        name="pod-a",
        data_parallel_size=2,
        endpoint_class="prefill",
        labels={"zone": "a"},
        metrics_url="http://[fd00::5]:9100/metrics",
    )
    endpoint = spec.to_endpoint(defaults)
    assert endpoint.kv_topic == "kv@fd00::5@8000"
    assert endpoint.kv_events == "tcp://[fd00::5]:7000"
    assert endpoint.kv_replay == "tcp://[fd00::5]:7001"
    assert endpoint.index_workers() == ["pod-a", "pod-a#dp1"]
    assert (endpoint.endpoint_class, dict(endpoint.labels)) == ("prefill", {"zone": "a"})
    assert endpoint.metrics_url == "http://[fd00::5]:9100/metrics"


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"address": "nohost"}, "address"),
        ({"address": "h:1", "kv_events": "http://h:5557"}, "kv_events"),
        ({"address": "h:1", "metrics_url": "h:1/metrics"}, "metrics_url"),
        ({"address": "h:1", "kv_topic": "kv@{model}"}, "kv_topic"),
        ({"address": "h:1", "data_parallel_size": 0}, "data_parallel_size"),
        ({"address": "h:1", "colour": "blue"}, "colour"),
    ],
)
def test_bad_entries_name_their_field(fields: dict[str, object], location: str) -> None:
    with pytest.raises(ValidationError) as caught:
        StaticEndpointSpec.model_validate(fields)
    assert [error["loc"][0] for error in caught.value.errors()] == [location]


def test_endpoint_flag() -> None:
    assert parse_endpoint_flag("10.0.0.5:8000") == {"address": "10.0.0.5:8000"}
    spec = parse_endpoint_flag(
        "10.0.0.5:8000,name=a,kv=tcp://10.0.0.5:6000,replay=off,topic=kv,dp=2,class=decode,label.zone=z1"
    )
    assert spec == {
        "address": "10.0.0.5:8000",
        "name": "a",
        "kv_events": "tcp://10.0.0.5:6000",
        "kv_replay": False,
        "kv_topic": "kv",
        "data_parallel_size": "2",
        "endpoint_class": "decode",
        "labels": {"zone": "z1"},
    }
    assert StaticEndpointSpec.model_validate(spec).data_parallel_size == 2
    with pytest.raises(ValueError, match="unknown key 'port'"):
        parse_endpoint_flag("10.0.0.5:8000,port=1")
    with pytest.raises(ValueError, match="not key=value"):
        parse_endpoint_flag("10.0.0.5:8000,dp")


def test_duplicate_names_are_refused() -> None:
    specs = [StaticEndpointSpec(address="h:1"), StaticEndpointSpec(address="h:2", name="h:1")]
    with pytest.raises(ValueError, match="duplicate endpoint names: h:1"):
        build_endpoints(specs, DEFAULTS)


async def test_static_source_yields_the_set_then_replacements() -> None:
    first = [Endpoint(name="a", address="h:1")]
    second = [Endpoint(name="b", address="h:2"), Endpoint(name="c", address="h:3")]
    source = StaticEndpointSource(first)
    updates = source.updates()
    assert await asyncio.wait_for(anext(updates), 5) == first
    pending = asyncio.ensure_future(anext(updates))
    await asyncio.sleep(0)
    assert not pending.done()  # nothing changed: the source waits
    source.replace(second)
    assert await asyncio.wait_for(pending, 5) == second
    source.replace(first)
    source.replace(second)  # two changes before the consumer looks: it sees the latest
    assert await asyncio.wait_for(anext(updates), 5) == second
    source.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(updates), 5)
