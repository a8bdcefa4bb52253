"""InferencePool discovery: pools and pods -> endpoint sets, against tests/fake_kube_apiserver.py.

The fake stands in for a kube-apiserver, which does not exist on these machines (see its
docstring). Waits are on delivered endpoint sets, with timeouts only as a safety net.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fake_kube_apiserver import FakeKubeAPIServer

from scheduler.adapters.discovery import EndpointDefaults
from scheduler.adapters.kubernetes.client import KubeClient
from scheduler.adapters.kubernetes.pools import (
    POOL_V1ALPHA2,
    InferencePoolSource,
    PoolSpec,
    PoolSpecError,
    parse_pool,
    pod_endpoints,
    pod_is_ready,
    pool_endpoints,
)
from scheduler.adapters.kubernetes.reflector import Backoff
from scheduler.core.scheduler import Endpoint

NS = "llm"
PODS = ("", "v1", "pods")
POOLS_V1 = ("inference.networking.k8s.io", "v1", "inferencepools")
POOLS_V1ALPHA2 = ("inference.networking.x-k8s.io", "v1alpha2", "inferencepools")
FAST = Backoff(initial_s=0.01, max_s=0.05)


def v1_pool(name: str, labels: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels},
            "targetPorts": [{"number": port} for port in ports],
            "endpointPickerRef": {"name": "kvsched", "port": {"number": 9002}},
        },
    }


def v1alpha2_pool(name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": labels, "targetPortNumber": port, "extensionRef": {"name": "kvsched"}},
    }


def pod(
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {"app": "vllm"}}
    if annotations:
        metadata["annotations"] = annotations
    if terminating:
        metadata["deletionTimestamp"] = "2026-01-05T10:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": metadata, "spec": {"containers": [{"name": "vllm"}]}, "status": status}


# --- pure mapping ---------------------------------------------------------------------------


def test_parse_both_pool_versions() -> None:
    v1 = parse_pool(v1_pool("p", {"app": "vllm"}, [8000, 8001]))
    assert v1 == PoolSpec(NS, "p", {"app": "vllm"}, (8000, 8001))
    old = parse_pool(v1alpha2_pool("q", {"app": "old"}, 8200))
    assert old == PoolSpec(NS, "q", {"app": "old"}, (8200,))
    with pytest.raises(PoolSpecError, match="selector"):
        parse_pool(v1_pool("p", {}, [8000]))
    with pytest.raises(PoolSpecError, match="ports"):
        parse_pool(v1_pool("p", {"a": "b"}, []))


def test_readiness_rules() -> None:
    assert pod_is_ready(pod("a", "10.0.0.1"))
    assert not pod_is_ready(pod("a", "10.0.0.1", ready=False))
    assert not pod_is_ready(pod("a", None))
    assert not pod_is_ready(pod("a", "10.0.0.1", terminating=True))
    assert not pod_is_ready({"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.1"}})


def test_one_endpoint_per_target_port_with_rank_offset_kv_ports() -> None:
    pool = PoolSpec(NS, "p", {"app": "vllm"}, (8000, 8001))
    first, second = pod_endpoints(pool, pod("vllm-0", "10.0.0.7"), EndpointDefaults())
    assert first == Endpoint(
        name="llm/vllm-0:8000",
        address="10.0.0.7:8000",
        kv_events="tcp://10.0.0.7:5557",
        kv_replay="tcp://10.0.0.7:5558",
        kv_topic="",
        metrics_url="http://10.0.0.7:8000/metrics",
        labels={"kvsched.io/pool": "llm/p", "kvsched.io/pod": "vllm-0"},
    )
    assert (second.address, second.kv_events, second.kv_replay) == (
        "10.0.0.7:8001",
        "tcp://10.0.0.7:5558",
        "tcp://10.0.0.7:5559",
    )


def test_annotations_override_the_pool_defaults() -> None:
    pool = PoolSpec(NS, "p", {"app": "vllm"}, (8000,))
    defaults = EndpointDefaults(kv_topic="kv@{host}")
    annotated = pod(
        "a",
        "10.0.0.1",
        annotations={
            "kvsched.io/kv-events-port": "6000",
            "kvsched.io/kv-replay-port": "none",
            "kvsched.io/kv-topic": "kv@{name}",
        },
    )
    (endpoint,) = pod_endpoints(pool, annotated, defaults)
    assert (endpoint.kv_events, endpoint.kv_replay, endpoint.kv_topic) == (
        "tcp://10.0.0.1:6000",
        None,
        "kv@llm/a:8000",
    )
    (silent,) = pod_endpoints(
        pool, pod("b", "10.0.0.2", annotations={"kvsched.io/kv-events-port": "0"}), defaults
    )
    assert silent.kv_events is None and silent.kv_replay is None
    (templated,) = pod_endpoints(pool, pod("c", "10.0.0.3"), defaults)
    assert templated.kv_topic == "kv@10.0.0.3"
    (bad,) = pod_endpoints(
        pool, pod("d", "10.0.0.4", annotations={"kvsched.io/kv-events-port": "x"}), defaults
    )
    assert bad.kv_events == "tcp://10.0.0.4:5557"
    (off,) = pod_endpoints(pool, pod("e", "10.0.0.5"), EndpointDefaults(kv_events=False))
    assert off.kv_events is None


def test_ipv6_pods_are_bracketed() -> None:
    pool = PoolSpec(NS, "p", {"app": "vllm"}, (8000,))
    (endpoint,) = pod_endpoints(pool, pod("a", "fd00::7"), EndpointDefaults())
    assert endpoint.address == "[fd00::7]:8000"
    assert endpoint.kv_events == "tcp://[fd00::7]:5557"


def test_selectors_and_shared_pods() -> None:
    pools = [
        PoolSpec(NS, "a", {"app": "vllm"}, (8000,)),
        PoolSpec(NS, "b", {"tier": "big"}, (8000,)),
    ]
    pods = [
        pod("x", "10.0.0.1", labels={"app": "vllm", "tier": "big"}),
        pod("y", "10.0.0.2", labels={"app": "other", "tier": "big"}),
        pod("z", "10.0.0.3", labels={"app": "vllm"}, ready=False),
    ]
    endpoints = pool_endpoints(pools, pods, EndpointDefaults())
    assert [(e.name, e.labels["kvsched.io/pool"]) for e in endpoints] == [
        ("llm/x:8000", "llm/a"),
        ("llm/y:8000", "llm/b"),
    ]


# --- against the fake API server --------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeKubeAPIServer]:
    with FakeKubeAPIServer() as fake:
        fake.install(*PODS, "Pod")
        fake.install(*POOLS_V1, "InferencePool")
        fake.install(*POOLS_V1ALPHA2, "InferencePool")
        yield fake


class Sets:
    """Consumes a source's ``updates()`` into a queue of endpoint sets."""

    def __init__(self, source: InferencePoolSource) -> None:
        self.source = source
        self.queue: asyncio.Queue[list[Endpoint]] = asyncio.Queue()
        self.history: list[list[Endpoint]] = []
        self._task: asyncio.Task[None] | None = None

    async def _consume(self) -> None:
        async for endpoints in self.source.updates():
            self.history.append(endpoints)
            self.queue.put_nowait(endpoints)

    def start(self) -> None:
        self.source.start()
        self._task = asyncio.create_task(self._consume())

    async def stop(self) -> None:
        await self.source.stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)

    async def until(
        self, predicate: Callable[[list[Endpoint]], bool], timeout: float = 10.0
    ) -> list[Endpoint]:
        async with asyncio.timeout(timeout):
            while True:
                endpoints = await self.queue.get()
                if predicate(endpoints):
                    return endpoints


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return sorted(endpoint.address for endpoint in endpoints)


@pytest.fixture
async def sets(server: FakeKubeAPIServer) -> AsyncIterator[Sets]:
    source = InferencePoolSource(
        KubeClient.connect(api_server=server.url), NS, ["llama"], EndpointDefaults(), backoff=FAST
    )
    consumer = Sets(source)
    yield consumer
    await consumer.stop()


async def test_pool_and_pods_become_endpoint_sets(server: FakeKubeAPIServer, sets: Sets) -> None:
    server.create(POOLS_V1, v1_pool("llama", {"app": "vllm"}, [8000, 8001]))
    server.create(PODS, pod("vllm-0", "10.0.0.1"))
    server.create(PODS, pod("vllm-1", "10.0.0.2", ready=False))
    server.create(PODS, pod("other", "10.0.0.3", labels={"app": "web"}))
    sets.start()
    first = await sets.until(lambda e: True)
    assert addresses(first) == ["10.0.0.1:8000", "10.0.0.1:8001"]

    # Readiness turns on: the pod's endpoints join.
    server.replace(PODS, pod("vllm-1", "10.0.0.2"))
    both = await sets.until(lambda e: len(e) == 4)
    assert addresses(both) == ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001"]

    # Readiness turns off, then a pod is deleted, then one starts terminating.
    server.replace(PODS, pod("vllm-1", "10.0.0.2", ready=False))
    await sets.until(lambda e: addresses(e) == ["10.0.0.1:8000", "10.0.0.1:8001"])
    server.replace(PODS, pod("vllm-1", "10.0.0.2"))
    await sets.until(lambda e: len(e) == 4)
    server.delete(PODS, NS, "vllm-0")
    await sets.until(lambda e: addresses(e) == ["10.0.0.2:8000", "10.0.0.2:8001"])
    server.replace(PODS, pod("vllm-1", "10.0.0.2", terminating=True))
    await sets.until(lambda e: e == [])

    # The pool's port list changes.
    server.create(PODS, pod("vllm-2", "10.0.0.4"))
    await sets.until(lambda e: len(e) == 2)
    server.replace(POOLS_V1, v1_pool("llama", {"app": "vllm"}, [9000]))
    await sets.until(lambda e: addresses(e) == ["10.0.0.4:9000"])

    # The pool goes away: no endpoints, and they come back with it.
    server.delete(POOLS_V1, NS, "llama")
    await sets.until(lambda e: e == [])
    server.create(POOLS_V1, v1_pool("llama", {"app": "vllm"}, [8000]))
    await sets.until(lambda e: addresses(e) == ["10.0.0.4:8000"])
    # Only changes are yielded: no two consecutive sets are equal.
    assert all(a != b for a, b in zip(sets.history, sets.history[1:], strict=False))


async def test_older_v1alpha2_pool(server: FakeKubeAPIServer) -> None:
    server.create(POOLS_V1ALPHA2, v1alpha2_pool("legacy", {"app": "vllm"}, 8200))
    server.create(POOLS_V1, v1_pool("legacy", {"app": "nothing"}, [1]))
    server.create(PODS, pod("vllm-0", "10.0.0.1"))
    source = InferencePoolSource(
        KubeClient.connect(api_server=server.url),
        NS,
        ["legacy"],
        EndpointDefaults(),
        pool_resource=POOL_V1ALPHA2,
        backoff=FAST,
    )
    sets = Sets(source)
    sets.start()
    try:
        (endpoint,) = await sets.until(lambda e: True)
        assert endpoint.address == "10.0.0.1:8200"
        server.create(PODS, pod("vllm-1", "10.0.0.2"))
        await sets.until(lambda e: addresses(e) == ["10.0.0.1:8200", "10.0.0.2:8200"])
    finally:
        await sets.stop()


async def test_several_pools_and_changed_defaults(server: FakeKubeAPIServer) -> None:
    server.create(POOLS_V1, v1_pool("a", {"app": "a"}, [8000]))
    server.create(POOLS_V1, v1_pool("b", {"app": "b"}, [8000]))
    server.create(POOLS_V1, v1_pool("not-served", {"app": "c"}, [8000]))
    for i, app in enumerate("abc"):
        server.create(PODS, pod(f"{app}-0", f"10.0.1.{i}", labels={"app": app}))
    source = InferencePoolSource(
        KubeClient.connect(api_server=server.url), NS, ["a", "b", "missing"], EndpointDefaults(), backoff=FAST
    )
    sets = Sets(source)
    sets.start()
    try:
        first = await sets.until(lambda e: True)
        assert {e.labels["kvsched.io/pool"] for e in first} == {"llm/a", "llm/b"}
        assert [p.name for p in source.pools()] == ["a", "b"]
        source.set_defaults(EndpointDefaults(kv_port=6000, replay_port=None))
        changed = await sets.until(lambda e: True)
        assert {(e.kv_events, e.kv_replay) for e in changed} == {
            ("tcp://10.0.1.0:6000", None),
            ("tcp://10.0.1.1:6000", None),
        }
    finally:
        await sets.stop()


async def test_state_survives_a_relist(server: FakeKubeAPIServer, sets: Sets) -> None:
    server.create(POOLS_V1, v1_pool("llama", {"app": "vllm"}, [8000]))
    server.create(PODS, pod("vllm-0", "10.0.0.1"))
    server.create(PODS, pod("vllm-1", "10.0.0.2"))
    sets.start()
    await sets.until(lambda e: len(e) == 2)
    server.pause_watches()
    server.delete(PODS, NS, "vllm-0")
    server.compact()
    server.resume_watches()
    await sets.until(lambda e: addresses(e) == ["10.0.0.2:8000"])
    assert sets.source.pod_reflector.stats.relists_gone == 1
    # vllm-1 was never reported gone while the pods were relisted.
    assert all("10.0.0.2:8000" in addresses(e) for e in sets.history)
