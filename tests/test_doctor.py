"""``kvsched doctor`` against the simulated pool (real HTTP, real ZMQ, vLLM's wire format), once
healthy and once per misconfiguration, each injected as a real option of the simulated vLLM or
of kvsched's configuration; every failing case must name its cause. The in-cluster path runs
against tests/fake_kube_apiserver.py (no kube-apiserver here; its docstring says what it leaves
out) with a simulated worker as the pool's pod.

Waits on a pod that never answers are the behaviour under test (a missing publisher, a missing
replay socket); they run with a short per-step wait.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_kube_apiserver import FakeKubeAPIServer

from scheduler.cli import main
from scheduler.doctor.findings import Check, DoctorReport, Status
from scheduler.doctor.run import diagnose
from scheduler.server.config import ServeConfig
from scheduler.sim.engine import EngineConfig
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.worker import LLMD_TOPIC, WorkerDescriptor

WAIT_S = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def endpoint(d: WorkerDescriptor, **overrides: Any) -> dict[str, Any]:
    spec = {"address": d.address, "kv_events": d.kv_endpoint, "kv_replay": d.replay_endpoint or False}
    spec.update(overrides)
    return spec


def config(endpoints: list[dict[str, Any]], **extra: Any) -> ServeConfig:
    return ServeConfig.model_validate({"endpoints": endpoints, **extra})


async def doctor(pool: SimPool, *, index: dict[str, Any] | None = None, **extra: Any) -> DoctorReport:
    endpoints = extra.pop("endpoints", None) or [endpoint(d) for d in pool.descriptors]
    settings = config(endpoints, scheduler={"index": index or {}}, **extra)
    return await diagnose(settings, wait_s=WAIT_S)


def finding(report: DoctorReport, check: Check, index: int = 0) -> Any:
    where = report.pool if check is Check.TOKENIZER else report.endpoints[index]
    found = [f for f in where.findings if f.check is check]
    assert found, f"no {check.value} finding in {where.as_dict()}"
    return found[0]


def failed_checks(report: DoctorReport) -> set[Check]:
    return {f.check for r in [report.pool, *report.endpoints] for f in r.failed}


async def test_a_healthy_pool_passes_every_check() -> None:
    async with SimPool(2, PoolConfig(speed=50.0)) as pool:
        report = await doctor(pool)
    assert report.ok(strict=True), report.render()
    for index in range(2):
        match = finding(report, Check.PREFIX_MATCH, index)
        assert match.status is Status.OK
        assert match.details["matched"] == match.details["blocks"] >= 4
        assert finding(report, Check.REPLAY, index).status is Status.OK
        assert finding(report, Check.SEQUENCE, index).status is Status.OK
        assert finding(report, Check.CLOCK, index).status is Status.OK
    assert finding(report, Check.TOKENIZER).status is Status.OK
    assert "can work on all 2 endpoint(s)" in report.verdict()


async def test_vllm_hash_mode_with_the_pods_seed_passes() -> None:
    engine = EngineConfig(hash_seed="1234")
    async with SimPool(1, PoolConfig(speed=50.0, engine=engine, events_with_token_ids=False)) as pool:
        report = await doctor(pool, index={"hash_mode": "vllm", "vllm_hash_seed": "1234"})
    assert report.ok(), report.render()
    assert "seed '1234'" in finding(report, Check.HASH).message


async def test_wrong_block_size_is_named() -> None:
    async with SimPool(1, PoolConfig(speed=50.0, engine=EngineConfig(block_size=32))) as pool:
        report = await doctor(pool)
    block = finding(report, Check.BLOCK_SIZE)
    assert block.status is Status.FAIL
    assert "32 tokens" in block.message and "uses 16" in block.message
    assert "scheduler.index.block_size: 32" in block.fix
    match = finding(report, Check.PREFIX_MATCH)
    assert match.status is Status.FAIL and "the block size" in match.message
    assert not report.ok()


async def test_wrong_topic_is_named() -> None:
    async with SimPool(1, PoolConfig(speed=50.0, topic=LLMD_TOPIC)) as pool:
        report = await doctor(pool, kv_events={"topic": "vllm"})
        address = pool.descriptors[0].address
    topic = finding(report, Check.KV_TOPIC)
    assert topic.status is Status.FAIL
    assert f"kv@{address}@" in topic.message and "'vllm'" in topic.message
    assert "the topic" in finding(report, Check.PREFIX_MATCH).message


async def test_wrong_kv_port_is_named() -> None:
    port = free_port()
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        d = pool.descriptors[0]
        report = await doctor(pool, endpoints=[endpoint(d, kv_events=f"tcp://127.0.0.1:{port}")])
    connect = finding(report, Check.KV_CONNECT)
    assert connect.status is Status.FAIL
    assert f"tcp://127.0.0.1:{port}" in connect.message and "no KV-event publisher answers" in connect.message
    assert "kv-events-config" in connect.fix
    assert failed_checks(report) == {Check.KV_CONNECT}


async def test_missing_replay_socket_is_named() -> None:
    port = free_port()
    async with SimPool(1, PoolConfig(speed=50.0, replay=False)) as pool:
        d = pool.descriptors[0]
        assert d.replay_endpoint is None
        report = await doctor(pool, endpoints=[endpoint(d, kv_replay=f"tcp://127.0.0.1:{port}")])
    replay = finding(report, Check.REPLAY)
    assert replay.status is Status.FAIL
    assert f"no replay socket answers at tcp://127.0.0.1:{port}" in replay.message
    assert "replay_port: null" in replay.fix
    assert failed_checks(report) == {Check.REPLAY}


async def test_no_replay_configured_is_a_warning() -> None:
    async with SimPool(1, PoolConfig(speed=50.0, replay=False)) as pool:
        report = await doctor(pool)
    replay = finding(report, Check.REPLAY)
    assert replay.status is Status.WARN and "no replay socket configured" in replay.message
    assert report.ok() and not report.ok(strict=True)


async def test_mismatched_tokenizer_is_named() -> None:
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        report = await doctor(pool, tokenizer_mode="bytes")
    tokenizer = finding(report, Check.TOKENIZER)
    assert tokenizer.status is Status.FAIL
    assert "byte stand-in" in tokenizer.message and "first differing at position" in tokenizer.message
    assert "tokenizer_dir" in tokenizer.fix
    # The KV path itself is sound: the probe goes in as token ids.
    assert finding(report, Check.PREFIX_MATCH).status is Status.OK


async def test_wrong_hash_seed_in_vllm_mode_is_named() -> None:
    # The pods run without PYTHONHASHSEED (vLLM's default seed); kvsched expects '1234'.
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        report = await doctor(pool, index={"hash_mode": "vllm", "vllm_hash_seed": "1234"})
    hashed = finding(report, Check.HASH)
    assert hashed.status is Status.FAIL
    assert "seed 'vllm-none-hash'" in hashed.message and "'1234'" in hashed.message
    assert "vllm_hash_seed: 'vllm-none-hash'" in hashed.fix
    assert "the block hashes" in finding(report, Check.PREFIX_MATCH).message


async def test_an_unguessable_hash_seed_says_what_to_align() -> None:
    engine = EngineConfig(hash_seed="42")
    async with SimPool(1, PoolConfig(speed=50.0, engine=engine)) as pool:
        report = await doctor(pool, index={"hash_mode": "vllm", "vllm_hash_seed": "1234"})
    hashed = finding(report, Check.HASH)
    assert hashed.status is Status.FAIL
    assert "PYTHONHASHSEED differs from vllm_hash_seed" in hashed.message
    assert "events carry token ids" in hashed.message  # own mode would work here
    assert "PYTHONHASHSEED" in hashed.fix


async def test_wrong_hash_algorithm_in_vllm_mode_is_named() -> None:
    engine = EngineConfig(hash_algo="sha256")
    async with SimPool(1, PoolConfig(speed=50.0, engine=engine)) as pool:
        report = await doctor(pool, index={"hash_mode": "vllm"})
    hashed = finding(report, Check.HASH)
    assert hashed.status is Status.FAIL
    assert "--prefix-caching-hash-algo sha256)" in hashed.message
    assert "--prefix-caching-hash-algo sha256_cbor" in hashed.fix
    assert "hash sha256" in finding(report, Check.PREFIX_CACHING).message


async def test_events_without_token_ids_in_own_mode_are_named() -> None:
    async with SimPool(1, PoolConfig(speed=50.0, events_with_token_ids=False)) as pool:
        report = await doctor(pool)
    hashed = finding(report, Check.HASH)
    assert hashed.status is Status.FAIL and "carry no token ids" in hashed.message
    assert "hash_mode: vllm" in hashed.fix


async def test_missing_metric_is_named() -> None:
    async with SimPool(1, PoolConfig(speed=50.0, omit_metrics=("vllm:kv_cache_usage_perc",))) as pool:
        report = await doctor(pool)
    metrics = finding(report, Check.METRICS)
    assert metrics.status is Status.FAIL
    assert "vllm:kv_cache_usage_perc" in metrics.message
    assert "scrape_metric_names" in metrics.fix
    assert failed_checks(report) == {Check.METRICS}


async def test_unreachable_worker_is_named_and_the_others_still_checked() -> None:
    port = free_port()
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        dead = {"address": f"127.0.0.1:{port}", "kv_events": f"tcp://127.0.0.1:{free_port()}"}
        report = await doctor(pool, endpoints=[endpoint(pool.descriptors[0]), dead])
    reachable = finding(report, Check.REACHABLE, 1)
    assert reachable.status is Status.FAIL and f"http://127.0.0.1:{port}" in reachable.message
    assert finding(report, Check.KV_EVENTS, 1).status is Status.SKIP
    assert not report.endpoints[0].failed
    assert "1 of 2 endpoint(s)" in report.verdict()


async def test_a_skewed_clock_is_a_warning() -> None:
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        settings = config([endpoint(d) for d in pool.descriptors])
        # This machine's clock 30 s ahead of the pod's (the pod stamps batches with its time.time()).
        report = await diagnose(settings, wait_s=WAIT_S, wall_clock=lambda: time.time() + 30.0)
    clock = finding(report, Check.CLOCK)
    assert clock.status is Status.WARN and "30." in clock.message and "behind" in clock.message
    assert "NTP" in clock.fix
    assert report.ok() and not report.ok(strict=True)


async def test_endpoints_without_kv_events_are_approximate_mode() -> None:
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        report = await doctor(pool, kv_events={"enabled": False})
    events = finding(report, Check.KV_EVENTS)
    assert events.status is Status.WARN and "approximate mode" in events.message


def test_cli_exit_status_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code = main(["doctor", "--endpoint", f"127.0.0.1:{port}", "--json", "--wait", "0.5", "--attempts", "1"])
    assert code == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False
    checks = {c["check"]: c for c in document["endpoints"][0]["checks"]}
    assert checks["reachable"]["status"] == "fail" and "fix" in checks["reachable"]
    assert main(["doctor", "--set", "scheduler.index.block_size=-1"]) == 2


# --- in the cluster: the pool's pods through the Kubernetes discovery ---------------------------

NS = "llm"
PODS = ("", "v1", "pods")
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")


@pytest.fixture
def server() -> Iterator[FakeKubeAPIServer]:
    with FakeKubeAPIServer() as fake:
        fake.install(*PODS, "Pod")
        fake.install(*POOLS, "InferencePool")
        yield fake


async def test_inference_pool_pods_are_checked(server: FakeKubeAPIServer) -> None:
    async with SimPool(1, PoolConfig(speed=50.0)) as pool:
        d = pool.descriptors[0]
        assert d.replay_port is not None
        server.create(
            POOLS,
            {
                "metadata": {"name": "llama", "namespace": NS},
                "spec": {
                    "selector": {"matchLabels": {"app": "vllm"}},
                    "targetPorts": [{"number": d.http_port}],
                },
            },
        )
        server.create(
            PODS,
            {
                "metadata": {
                    "name": "vllm-0",
                    "namespace": NS,
                    "labels": {"app": "vllm"},
                    "annotations": {
                        "kvsched.io/kv-events-port": str(d.kv_port),
                        "kvsched.io/kv-replay-port": str(d.replay_port),
                    },
                },
                "spec": {},
                "status": {"podIP": d.host, "conditions": [{"type": "Ready", "status": "True"}]},
            },
        )
        settings = ServeConfig.model_validate(
            {
                "pool": {"name": "llama", "namespace": NS},
                "discovery": {"type": "kubernetes", "kubernetes": {"api_server": server.url}},
            }
        )
        report = await diagnose(settings, wait_s=WAIT_S)
    assert report.source == "InferencePool(s) llama"
    assert [r.address for r in report.endpoints] == [d.address]
    assert report.ok(strict=True), report.render()


async def test_a_missing_inference_pool_is_named(server: FakeKubeAPIServer) -> None:
    settings = ServeConfig.model_validate(
        {
            "pool": {"name": "nowhere", "namespace": NS},
            "discovery": {"type": "kubernetes", "kubernetes": {"api_server": server.url}},
        }
    )
    report = await diagnose(settings, wait_s=WAIT_S)
    problems = [f.message for f in report.pool.failed]
    assert any(f"InferencePool {NS}/nowhere" in p and "not found" in p for p in problems)
    assert not report.ok()
