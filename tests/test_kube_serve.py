"""``kvsched serve`` with ``discovery.type: kubernetes``, against tests/fake_kube_apiserver.py.

A real kube-apiserver does not exist on these machines; the fake speaks its list/watch,
status-patch and event protocol (its docstring lists what it leaves out). The whole serving
process runs here: pool pods become scraped, subscribed endpoints; the served pool's
SchedulingPolicy changes scoring, KV-event ports and the scrape period while serving; objectives
reach the Scheduler; a configuration file reload and a policy compose. Waits poll the state
under test with a timeout as a safety net.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_kube_apiserver import FakeKubeAPIServer

from scheduler.cli import main
from scheduler.server.app import ServeApp
from scheduler.server.config import ConfigError, ServeConfig, load_config

NS = "llm"
PODS = ("", "v1", "pods")
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")
POLICIES = ("kvsched.io", "v1alpha1", "schedulingpolicies")
EVENTS = ("", "v1", "events")
OBJECTIVES = ("llm-d.ai", "v1alpha2", "inferenceobjectives")


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def ready_pod(name: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "vllm"}},
        "spec": {},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
def server() -> Iterator[FakeKubeAPIServer]:
    with FakeKubeAPIServer() as fake:
        fake.install(*PODS, "Pod")
        fake.install(*POOLS, "InferencePool")
        fake.install(*POLICIES, "SchedulingPolicy")
        fake.install(*EVENTS, "Event")
        fake.install(*OBJECTIVES, "InferenceObjective")
        # Not installed: the older objective group, as in a cluster without that CRD.
        yield fake


def serve_config(server: FakeKubeAPIServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": None,
        "tls": {"mode": "plaintext"},
        "scrape_interval_s": 0.05,
        "shutdown_grace_s": 0,
        "pool": {"name": "llama", "namespace": NS},
        "discovery": {
            "type": "kubernetes",
            "kubernetes": {"api_server": server.url, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        },
        **extra,
    }


async def test_serving_from_a_pool_with_a_policy(server: FakeKubeAPIServer) -> None:
    server.create(
        POOLS,
        {
            "metadata": {"name": "llama", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}]},
        },
    )
    server.create(PODS, ready_pod("vllm-0", "127.0.0.2"))
    server.create(PODS, ready_pod("vllm-1", "127.0.0.3"))
    server.create(
        OBJECTIVES,
        {
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {"poolRef": {"name": "llama"}, "priority": 3},
        },
    )
    app = ServeApp(ServeConfig.model_validate(serve_config(server)))
    async with app:
        scheduler = app.scheduler
        assert sorted(e.address for e in scheduler.endpoints()) == ["127.0.0.2:8000", "127.0.0.3:8000"]
        assert app.ingest is not None
        assert sorted(app.ingest.subscribers) == ["llm/vllm-0:8000", "llm/vllm-1:8000"]
        await until(lambda: "chat" in scheduler.objectives.objectives)
        assert scheduler.objectives.objectives["chat"].priority == 3

        # A policy arrives: scoring, KV-event ports and the scrape period change in place.
        server.create(
            POLICIES,
            {
                "metadata": {"name": "llama", "namespace": NS},
                "spec": {
                    "poolRef": {"name": "llama"},
                    "scorerWeights": {"queueDepth": 7},
                    "kvEvents": {"port": 6000, "replayPort": 0},
                    "scrapeIntervalMs": 200,
                },
            },
        )
        await until(lambda: scheduler.config.scoring.weights["queue_depth"] == 7)
        await until(
            lambda: (
                {e.kv_events for e in scheduler.endpoints()}
                == {"tcp://127.0.0.2:6000", "tcp://127.0.0.3:6000"}
            )
        )
        assert {e.kv_replay for e in scheduler.endpoints()} == {None}
        assert app.scraper.base_interval_s == app.scraper.interval_s == 0.2
        assert app.scheduler is scheduler

        def accepted() -> bool:
            obj = server._objects[POLICIES][(NS, "llama")]
            conditions = (obj.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions)

        await asyncio.to_thread(server.wait_for, accepted)

        # A file reload and the policy compose: each keeps what the other set.
        reloaded = ServeConfig.model_validate(
            serve_config(server, scheduler={"scoring": {"temperature": 0.5}}, audit_log=True)
        )
        assert await app.reload(reloaded) == []
        assert scheduler.config.scoring.temperature == 0.5
        assert scheduler.config.scoring.weights["queue_depth"] == 7

        # A pod goes: its endpoint, scraping and KV subscription go with it.
        server.delete(PODS, NS, "vllm-0")
        await until(lambda: [e.name for e in scheduler.endpoints()] == ["llm/vllm-1:8000"])
        assert sorted(app.ingest.subscribers) == ["llm/vllm-1:8000"]

        # The policy goes: the configuration file's settings are back.
        server.delete(POLICIES, NS, "llama")
        await until(lambda: scheduler.config.scoring.weights["queue_depth"] == 1)
        assert scheduler.config.scoring.temperature == 0.5
        await until(lambda: {e.kv_events for e in scheduler.endpoints()} == {"tcp://127.0.0.3:5557"})
        assert app.scraper.interval_s == 0.05
    # Stopping the app stopped every watch thread.
    kube = app.kubernetes
    assert kube is not None and kube.policies is not None and kube.objectives is not None
    reflectors = [
        kube.source.pool_reflector,
        kube.source.pod_reflector,
        kube.policies.reflector,
        *kube.objectives.reflectors,
    ]
    assert all(r._thread is not None and not r._thread.is_alive() for r in reflectors)


async def test_no_pool_yet_serves_not_ready_then_picks_it_up(server: FakeKubeAPIServer) -> None:
    # Nothing publishes KV events at the pod's address here: no batch is waited for.
    config = ServeConfig.model_validate({**serve_config(server), "warmup": {"kv_first_batch_wait_s": 0}})
    async with ServeApp(config) as app:
        assert app.scheduler.endpoints() == []
        assert not app._ready()
        server.create(
            POOLS,
            {
                "metadata": {"name": "llama", "namespace": NS},
                "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}]},
            },
        )
        server.create(PODS, ready_pod("vllm-0", "127.0.0.2"))
        await until(lambda: len(app.scheduler.endpoints()) == 1)
        assert app._ready()


def test_discovery_configuration(server: FakeKubeAPIServer) -> None:
    config = ServeConfig.model_validate(serve_config(server))
    assert config.kubernetes_pools() == ["llama"]
    assert config.kubernetes_namespace({}) == NS
    assert config.pool_api_version() == "inference.networking.k8s.io/v1"
    legacy = ServeConfig.model_validate(
        {
            "pool": {"name": "old", "group": "inference.networking.x-k8s.io"},
            "discovery": {"type": "kubernetes"},
        }
    )
    assert legacy.pool_api_version() == "inference.networking.x-k8s.io/v1alpha2"
    assert legacy.kubernetes_namespace({"POD_NAMESPACE": "from-env"}) == "from-env"
    several = ServeConfig.model_validate(
        {"discovery": {"type": "kubernetes", "kubernetes": {"pools": ["a", "b"], "namespace": "x"}}}
    )
    assert several.kubernetes_pools() == ["a", "b"]
    assert ServeConfig().discovery.type == "static"

    with pytest.raises(ConfigError, match="endpoints are the static discovery source"):
        load_config(
            overrides={
                "discovery": {"type": "kubernetes"},
                "pool": {"name": "p"},
                "endpoints": [{"address": "10.0.0.1:8000"}],
            }
        )
    with pytest.raises(ConfigError, match="must name the InferencePool"):
        load_config(overrides={"discovery": {"type": "kubernetes"}})
    with pytest.raises(ConfigError, match=r"discovery\.kubernetes\.pools"):
        load_config(overrides={"discovery": {"type": "kubernetes", "kubernetes": {"pools": ["a", "a"]}}})
    with pytest.raises(ConfigError, match=r"discovery\.kubernetes\.pool_api_version"):
        load_config(overrides={"discovery": {"type": "kubernetes", "kubernetes": {"pool_api_version": "v9"}}})


def test_cli_without_credentials_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "pool: {name: llama, namespace: llm}\n"
        f"discovery: {{type: kubernetes, kubernetes: {{kubeconfig: {tmp_path / 'missing'}}}}}\n"
    )
    assert (
        main(["serve", "--config", str(config), "--plaintext", "--grpc-port", "0", "--health-port", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("kvsched serve: discovery.kubernetes: no usable API server credentials")
