"""``kvsched serve`` in process (ServeApp) and as a real process stopped by SIGTERM.

Endpoints are simulated vLLM workers (HTTP /metrics in vLLM's format, ZMQ KV events) plus one
minimal aiohttp stand-in whose /metrics a test can break and repair.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.discovery import StaticEndpointSource
from scheduler.adapters.extproc.native import native_available
from scheduler.core.scheduler import Endpoint, SchedulingRequest
from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.worker import LLMD_TOPIC

REPO = Path(__file__).resolve().parents[1]
STAND_IN_PAGE = (
    'vllm:num_requests_waiting{model_name="m"} 4.0\n'
    'vllm:num_requests_running{model_name="m"} 2.0\n'
    'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
)


class StandIn:
    """A /metrics endpoint that answers 503 while ``broken``."""

    def __init__(self) -> None:
        self.broken = False
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def handle(self, _: web.Request) -> web.Response:
        if self.broken:
            return web.Response(status=503, text="down")
        return web.Response(text=STAND_IN_PAGE, content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def serve_config(pool: SimPool, stand_in: StandIn, **extra: object) -> ServeConfig:
    endpoints: list[dict[str, object]] = [
        {"address": d.address, "kv_events": d.kv_endpoint, "kv_replay": d.replay_endpoint or False}
        for d in pool.descriptors
    ]
    endpoints.append({"address": stand_in.address, "name": "stand-in", "kv_events": False})
    return ServeConfig.model_validate(
        {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "health_port": 0,
            "metrics_port": 0,
            "tls": {"mode": "plaintext"},
            "scrape_interval_s": 0.02,
            # Every endpoint at the fast rate: the tests watch figures of requests sent to the
            # workers directly, which at the idle rate (1 s) can start and end between scrapes.
            "scrape_idle_interval_s": None,
            "shutdown_grace_s": 0.5,
            "endpoints": endpoints,
            "scheduler": {"health": {"unhealthy_after_failures": 2}},
            **extra,
        }
    )


@dataclass
class Stack:
    pool: SimPool
    stand_in: StandIn
    app: ServeApp

    def scraped(self, name: str) -> bool:
        return self.app.scheduler.endpoint_state(name, time.monotonic()).metrics_age_s is not None


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    stand_in = StandIn()
    await stand_in.start()
    try:
        async with (
            SimPool(2, PoolConfig(speed=20.0)) as pool,
            ServeApp(serve_config(pool, stand_in)) as app,
        ):
            yield Stack(pool, stand_in, app)
    finally:
        await stand_in.stop()


async def fetch_metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def by_endpoint(samples: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    return {labels["endpoint"]: value for labels, value in samples}


async def test_scrapes_reach_the_scheduler(stack: Stack) -> None:
    names = [endpoint.name for endpoint in stack.app.scheduler.endpoints()]
    assert sorted(names) == sorted([d.address for d in stack.pool.descriptors] + ["stand-in"])
    await until(lambda: all(stack.scraped(name) for name in names))
    state = stack.app.scheduler.endpoint_state("stand-in", time.monotonic())
    assert (state.waiting, state.running, state.kv_usage, state.healthy) == (4, 2, 0.25, True)
    # A real worker's page: a long generation shows up as a running request.
    worker = stack.pool.descriptors[0]
    body = {"model": worker.model, "prompt": list(range(1, 200)), "max_tokens": 2000, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{worker.http_url}/v1/completions", json=body) as response,
    ):
        assert response.status == 200
        await until(lambda: stack.app.scheduler.endpoint_state(worker.address, time.monotonic()).running == 1)


async def test_failing_endpoint_becomes_unhealthy_and_recovers(stack: Stack) -> None:
    scheduler = stack.app.scheduler
    await until(lambda: stack.scraped("stand-in") and scheduler.is_healthy("stand-in"))
    stack.stand_in.broken = True
    await until(lambda: not scheduler.is_healthy("stand-in"))
    request = SchedulingRequest("r1", list(range(64)))
    for attempt in range(20):
        result = scheduler.pick(SchedulingRequest(f"r{attempt}", request.token_ids), time.monotonic())
        assert result.status == "ok"
        assert stack.stand_in.address not in result.endpoints
        scheduler.on_completed(f"r{attempt}", time.monotonic())
    samples = await fetch_metrics(stack.app.metrics_port or 0)
    assert by_endpoint(samples["kvsched_endpoint_healthy"])["stand-in"] == 0.0
    assert by_endpoint(samples["kvsched_scrape_failures_total"])["stand-in"] >= 2
    stack.stand_in.broken = False
    await until(lambda: scheduler.is_healthy("stand-in"))


async def test_kv_events_reach_the_index(stack: Stack) -> None:
    worker = stack.pool.descriptors[1]
    body = {"model": worker.model, "prompt": list(range(1000, 1000 + 16 * 8)), "max_tokens": 2}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{worker.http_url}/v1/completions", json=body) as r,
    ):
        assert r.status == 200
    index = stack.app.scheduler.index
    await until(lambda: index.worker_blocks(worker.address) >= 8)
    samples = await fetch_metrics(stack.app.metrics_port or 0)
    assert by_endpoint(samples["kvsched_kv_batches_applied_total"])[worker.address] >= 1
    assert by_endpoint(samples["kvsched_endpoint_index_blocks"])[worker.address] >= 8
    assert samples["kvsched_index_blocks"][0][1] >= 8
    assert "stand-in" not in by_endpoint(samples["kvsched_kv_batches_applied_total"])


@pytest.mark.parametrize("topic", ["", LLMD_TOPIC], ids=["vllm-default", "llm-d"])
async def test_kv_events_under_either_topic_convention_reach_the_index(topic: str) -> None:
    async with SimPool(1, PoolConfig(speed=1000.0, topic=topic)) as pool:
        worker = pool.descriptors[0]
        assert worker.topic == topic.format(address=worker.address, model=worker.model)
        config = ServeConfig.model_validate(
            {
                "host": "127.0.0.1",
                "grpc_port": 0,
                "health_port": None,
                "metrics_port": None,
                "tls": {"mode": "plaintext"},
                "endpoints": [{"address": worker.address, "kv_events": worker.kv_endpoint}],
            }
        )
        async with ServeApp(config) as app, aiohttp.ClientSession() as session:
            body = {"prompt": list(range(1, 16 * 4 + 1)), "max_tokens": 1}
            async with session.post(f"{worker.http_url}/v1/completions", json=body) as response:
                assert response.status == 200
            await until(lambda: app.scheduler.index.worker_blocks(worker.address) >= 4)


async def test_metrics_page_parses_and_covers_every_component(stack: Stack) -> None:
    await until(lambda: all(stack.scraped(e.name) for e in stack.app.scheduler.endpoints()))
    samples = await fetch_metrics(stack.app.metrics_port or 0)
    names = {d.address for d in stack.pool.descriptors} | {"stand-in"}
    for family in (
        "kvsched_endpoint_healthy",
        "kvsched_endpoint_waiting_requests",
        "kvsched_endpoint_metrics_age_seconds",
        "kvsched_endpoint_inflight_requests",
        "kvsched_scrapes_total",
        "kvsched_scrape_failures_total",
    ):
        assert set(by_endpoint(samples[family])) == names, family
    assert samples["kvsched_endpoints"][0][1] == 3
    outcomes = {labels["outcome"] for labels, _ in samples["kvsched_picker_requests_total"]}
    assert {"routed", "no_endpoints", "shed", "bad_request", "internal_error"} <= outcomes
    assert "kvsched_picker_decision_seconds_bucket" in samples
    for family in (
        "kvsched_index_bytes",
        "kvsched_index_evictions_total",
        "process_cpu_seconds_total",
        "kvsched_pool_saturated",
        "kvsched_flow_requests_total",
        "kvsched_predictor_source",
        "kvsched_predictor_fits_total",
        "kvsched_decision_matched_blocks_bucket",
        "kvsched_decisions_prefix_matched_total",
        "kvsched_prefix_served_cached_tokens_total",
        "kvsched_tokenization_mismatch",
    ):
        assert family in samples, family
    # The background trainer is running with the Scheduler's own predictor.
    assert stack.app.trainer.predictor is stack.app.scheduler.predictor


async def test_health_reports_serving(stack: Stack) -> None:
    # Readiness waits for a warm view (every replay done): SERVING from then on, not before.
    await stack.app.until_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.app.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_discovery_changes_start_and_stop_scraping_and_subscriptions(stack: Stack) -> None:
    app = stack.app
    source = app.source
    assert isinstance(source, StaticEndpointSource)
    assert app.ingest is not None
    first, second = stack.pool.descriptors
    await until(lambda: set(app.ingest.subscribers) == {first.address, second.address})  # type: ignore[union-attr]
    kept = [e for e in source.endpoints if e.name != second.address]
    source.replace(kept)
    await until(lambda: second.address not in app.scraper.targets)
    assert [e.name for e in app.scheduler.endpoints()] == [e.name for e in kept]
    assert set(app.ingest.subscribers) == {first.address}
    assert app.scheduler.index.worker_blocks(second.address) == 0
    moved = Endpoint(name="renamed", address=second.address, metrics_url=f"{second.http_url}/metrics")
    source.replace([*kept, moved])
    await until(lambda: "renamed" in app.scraper.targets and stack.scraped("renamed"))
    assert "renamed" not in app.ingest.subscribers  # no KV events configured for it


def free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_stop_leaves_nothing_running() -> None:
    stand_in = StandIn()
    await stand_in.start()
    try:
        async with SimPool(1, PoolConfig(speed=20.0)) as pool:
            before = asyncio.all_tasks()
            app = ServeApp(serve_config(pool, stand_in))
            async with app:
                await until(lambda: all(app.scraper.all_stats()[n].scrapes > 0 for n in app.scraper.targets))
                ports = [p for p in app.ports.values() if p is not None]
                assert len(ports) == 3
                assert not any(free(port) for port in ports)
                assert app.ingest is not None and app.ingest.subscribers
            assert asyncio.all_tasks() == before
            assert all(free(port) for port in ports)
            assert app.scraper.targets == {}
            assert app.ingest.subscribers == {}
    finally:
        await stand_in.stop()


async def test_start_failure_cleans_up() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServeConfig.model_validate(
            {
                "host": "127.0.0.1",
                "grpc_port": 0,
                "health_port": 0,
                "metrics_port": port,
                "tls": {"mode": "plaintext"},
            }
        )
        before = asyncio.all_tasks()
        app = ServeApp(config)
        with pytest.raises(OSError):
            async with app:
                pass
        assert asyncio.all_tasks() == before
        assert app.server.port is not None and free(app.server.port)


async def test_serve_process_stops_on_sigterm(tmp_path: Path) -> None:
    stand_in = StandIn()
    await stand_in.start()
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [
        sys.executable,
        "-m",
        "scheduler",
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--plaintext",
        "--endpoint",
        f"{stand_in.address},name=stand-in,kv=false",
        "--scrape-interval",
        "0.05",
        "--ready-file",
        str(ready),
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await until(lambda: ready.exists() or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.communicate()[1].decode()
        ports = json.loads(ready.read_text())["ports"]
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}

        async def scraped_once() -> bool:
            nonlocal samples
            samples = await fetch_metrics(ports["metrics"])
            return by_endpoint(samples.get("kvsched_scrapes_total", [])).get("stand-in", 0) > 0

        deadline = time.monotonic() + 30
        while not await scraped_once():
            assert time.monotonic() < deadline, "the serve process never scraped its endpoint"
            await asyncio.sleep(0.05)
        assert by_endpoint(samples["kvsched_endpoint_healthy"]) == {"stand-in": 1.0}
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 0, stderr.decode()
        log = stderr.decode()
        assert "SIGTERM received" in log
        # It says which ext_proc transport it runs ('auto': the native one where it was built).
        assert f"{'native' if native_available() else 'python'} transport" in log
        assert log.rstrip().endswith("stopped")
        assert all(free(port) for port in ports.values())
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        await stand_in.stop()
