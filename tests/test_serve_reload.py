"""Live configuration reload of ``kvsched serve``: file changes and SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from scheduler.server.app import ServeApp
from scheduler.server.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parents[1]
PAGE = "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.5\n"


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def metrics_addresses() -> AsyncIterator[list[str]]:
    """Two loopback /metrics stand-ins serving a fixed vLLM-format page."""
    runners = []
    addresses = []

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/plain")

    for _ in range(2):
        app = web.Application()
        app.router.add_get("/metrics", page)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        addresses.append(f"127.0.0.1:{runner.addresses[0][1]}")
    yield addresses
    for runner in runners:
        await runner.cleanup()


def base(addresses: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "health_port": 0,
        "metrics_port": None,
        "tls": {"mode": "plaintext"},
        "scrape_interval_s": 0.02,
        "reload_interval_s": 0.02,
        "shutdown_grace_s": 0,
        "kv_events": {"enabled": False},
        "endpoints": [{"address": address} for address in addresses],
        **extra,
    }


async def test_file_changes_apply_live(tmp_path: Path, metrics_addresses: list[str]) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(base(metrics_addresses)))
    app = ServeApp(load_config(path), config_loader=lambda: load_config(path), watch_file=path)
    async with app:
        scheduler = app.scheduler
        assert len(scheduler.endpoints()) == 2
        assert scheduler.config.scoring.num_fallbacks == 2
        changed = base(metrics_addresses[:1], scheduler={"scoring": {"num_fallbacks": 1}})
        path.write_text(yaml.safe_dump(changed))
        await until(lambda: scheduler.config.scoring.num_fallbacks == 1)
        await until(lambda: [e.address for e in scheduler.endpoints()] == metrics_addresses[:1])
        await until(lambda: list(app.scraper.targets) == metrics_addresses[:1])

        # A bad edit leaves the running configuration alone; the next good one applies.
        running = app.config
        path.write_text("scheduler: {scoring: {num_fallbacks: -3}}\n")
        await until(lambda: app.reload_errors == 1)
        assert app.config is running
        assert scheduler.config.scoring.num_fallbacks == 1
        # ... and /debug/status says so, with the reason.
        reported = app.status()["config"]
        assert reported["reload_errors"] == 1 and "scheduler.scoring.num_fallbacks" in reported["last_error"]
        good = base(metrics_addresses, scheduler={"scoring": {"num_fallbacks": 0}})
        path.write_text(yaml.safe_dump(good))
        await until(lambda: scheduler.config.scoring.num_fallbacks == 0 and len(scheduler.endpoints()) == 2)


async def test_reload_reports_what_needs_a_restart(metrics_addresses: list[str]) -> None:
    config = ServeConfig.model_validate(base(metrics_addresses, reload_interval_s=0))
    async with ServeApp(config) as app:
        changed = ServeConfig.model_validate(
            base(
                metrics_addresses,
                reload_interval_s=0,
                grpc_port=1234,
                scrape_interval_s=0.5,
                scheduler={"index": {"block_size": 32}, "scoring": {"mode": "softmax"}},
                audit_log=True,
            )
        )
        pending = await app.reload(changed)
        assert sorted(pending) == ["grpc_port", "scheduler.index", "scrape_interval_s"]
        assert app.scheduler.config.scoring.mode == "softmax"  # live part applied
        assert app.scheduler.config.index.block_size == 16  # fixed part kept
        assert app.config.grpc_port == 0
        assert app.config.audit_log
        with pytest.raises(RuntimeError, match="no configuration loader"):
            await app.reload()


async def endpoint_count(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        if family.name == "kvsched_endpoints":
            return float(family.samples[0].value)
    raise AssertionError("kvsched_endpoints missing")


async def test_sighup_reloads_the_serve_process(tmp_path: Path, metrics_addresses: list[str]) -> None:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(base(metrics_addresses, reload_interval_s=0, metrics_port=0)))
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "scheduler", "serve", "--config", str(path), "--ready-file", str(ready)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await until(lambda: ready.exists() or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.communicate()[1].decode()
        metrics_url = f"http://127.0.0.1:{json.loads(ready.read_text())['ports']['metrics']}/metrics"
        assert await endpoint_count(metrics_url) == 2
        path.write_text(json.dumps(base(metrics_addresses[:1], reload_interval_s=0, metrics_port=0)))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while await endpoint_count(metrics_url) != 1:
            assert time.monotonic() < deadline, "SIGHUP did not reload the endpoint list"
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
        log = stderr.decode()
        assert process.returncode == 0, log
        assert "configuration reloaded" in log
        assert "-1: " + metrics_addresses[1] in log  # the endpoint dropped by the reload
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
