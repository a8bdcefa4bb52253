"""The two-filter Envoy layout end to end (``scheduler/demo/envoy.py``, ``EnvoySettings.observation``):
a real Envoy, kvsched (in process, or a ``kvsched serve`` child to SIGKILL), simulated vLLM
workers. The decision stream carries the request only; an observation stream carries the
response phase as copies. Each test runs once per ext_proc transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from scheduler.demo.envoy import (
    OBSERVATION_CLUSTER,
    OBSERVATION_FILTER,
    EnvoyGateway,
    EnvoySettings,
    EppReplica,
    render_config,
)
from scheduler.demo.run import local_serve_config
from scheduler.server.app import ServeApp
from scheduler.sim.pool import PoolConfig, SimPool
from tests.test_e2e_envoy import gateway_in_front, until

REPO = Path(__file__).resolve().parent.parent


def test_the_decision_filter_leaves_the_response_to_the_observation_filter() -> None:
    two = render_config(EnvoySettings("127.0.0.1", 9000))
    one = render_config(EnvoySettings("127.0.0.1", 9000, observation=False))

    def filters(config: dict[str, object]) -> list[dict[str, object]]:
        listener = config["static_resources"]["listeners"][0]  # type: ignore[index]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return manager["http_filters"]  # type: ignore[no-any-return]

    decision, observation, router = filters(two)
    assert observation["name"] == OBSERVATION_FILTER and router["name"] == "envoy.filters.http.router"
    mode = decision["typed_config"]["processing_mode"]  # type: ignore[index]
    assert (mode["response_header_mode"], mode["response_body_mode"]) == ("SKIP", "NONE")
    observe = observation["typed_config"]
    assert observe["observability_mode"] and observe["failure_mode_allow"]  # type: ignore[index]
    # The same replicas, balanced apart from the decision streams.
    assert observe["grpc_service"]["envoy_grpc"]["cluster_name"] == OBSERVATION_CLUSTER  # type: ignore[index]
    clusters = {c["name"]: c for c in two["static_resources"]["clusters"]}  # type: ignore[index]
    assert (
        clusters[OBSERVATION_CLUSTER]["load_assignment"]["endpoints"]
        == clusters["ext_proc"]["load_assignment"]["endpoints"]
    )
    assert OBSERVATION_CLUSTER not in {c["name"] for c in one["static_resources"]["clusters"]}  # type: ignore[index]
    single = [f["name"] for f in filters(one)]
    assert single == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    assert filters(one)[0]["typed_config"]["processing_mode"]["response_body_mode"] == "FULL_DUPLEX_STREAMED"  # type: ignore[index]


@contextlib.asynccontextmanager
async def in_process_stack(
    transport: str, *, observation: bool
) -> AsyncIterator[tuple[ServeApp, EnvoyGateway, str]]:
    async with SimPool(2, PoolConfig(speed=5.0)) as pool:
        config = local_serve_config(pool, extproc={"transport": transport})
        async with gateway_in_front(pool, config, observation=observation) as stack:
            yield stack.app, stack.envoy, stack.model


async def _accounting(
    transport: str, caplog: pytest.LogCaptureFixture, *, observation: bool
) -> dict[str, object]:
    """What kvsched learnt from one streamed and one non-streamed request."""
    async with in_process_stack(transport, observation=observation) as (app, envoy, model):
        # After the app's start, which sets the audit logger up.
        caplog.set_level(logging.INFO, logger="kvsched.audit")
        caplog.clear()
        scheduler = app.scheduler
        async with aiohttp.ClientSession() as session:
            for stream in (True, False):
                body = {"model": model, "prompt": list(range(1, 200)), "max_tokens": 6, "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                async with session.post(f"{envoy.url}/v1/completions", json=body) as resp:
                    text = await resp.text()
                    assert resp.status == 200, f"{text}\n{envoy.log_tail()}"
        outcomes = app.server.stats.outcomes
        await until(lambda: outcomes["completed"] == 2)
        await until(lambda: all(scheduler.inflight(e.name) == (0, 0) for e in scheduler.endpoints()))
        audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvsched.audit"]
        return {
            "completed": outcomes["completed"],
            "failed": outcomes["cancelled"] + outcomes["expired"] + outcomes["upstream_error"],
            "completions": scheduler.completions,
            "observations": outcomes["observation"],
            "pending": len(app.server.observations),
            # Per request, in order: what the response path told kvsched.
            "responses": [
                (
                    line["outcome"],
                    line["http_status"],
                    line["completion_tokens"],
                    0 < line["ttft_ms"] <= line["e2e_ms"],
                )
                for line in audit
            ],
        }


async def test_both_layouts_account_for_responses_alike(
    extproc_transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    single = await _accounting(extproc_transport, caplog, observation=False)
    two = await _accounting(extproc_transport, caplog, observation=True)
    # The response phase reached kvsched once per request in both layouts: first token,
    # status and usage alike, completions learnt, nothing left in flight.
    assert two["observations"] == 2 and single["observations"] == 0
    assert single["responses"] == two["responses"] == [("completed", 200, 6, True)] * 2
    for result in (single, two):
        assert result["completed"] == result["completions"] == 2
        assert result["failed"] == 0 and result["pending"] == 0


def _serve_command(ready: Path, endpoints: list[str], transport: str) -> list[str]:
    command = [sys.executable, "-m", "scheduler", "serve", "--host", "127.0.0.1"]
    command += ["--grpc-port", "0", "--health-port", "0", "--metrics-port", "0", "--plaintext"]
    for address in endpoints:
        command += ["--endpoint", f"{address},kv=false"]
    command += ["--set", f"extproc.transport={transport}", "--ready-file", str(ready)]
    return command


@pytest.mark.parametrize("observation", [True, False], ids=["two_filters", "single_filter"])
async def test_a_killed_replica_leaves_a_streamed_response_in_flight_alone(
    extproc_transport: str, observation: bool, tmp_path: Path
) -> None:
    """FailClose, one kvsched replica SIGKILLed after the response's first chunk. Two filters:
    the client gets the whole response. Single filter: Envoy had handed the response's
    full-duplex chunks to the dead processor and resets the client's stream."""
    async with SimPool(1, PoolConfig(speed=1.0)) as pool:
        ready = tmp_path / "ready.json"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        addresses = [d.address for d in pool.descriptors]
        process = subprocess.Popen(
            _serve_command(ready, addresses, extproc_transport),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await until(lambda: ready.exists() or process.poll() is not None, timeout=60)
            assert process.poll() is None, process.communicate()[1].decode()
            ports = json.loads(ready.read_text())["ports"]
            settings = EnvoySettings(
                "127.0.0.1",
                ports["grpc"],
                epp_health_port=ports["health"],
                fail_open=False,
                pool=addresses,
                observation=observation,
            )
            async with EnvoyGateway(settings) as envoy, aiohttp.ClientSession() as session:
                body = {
                    "model": pool.descriptors[0].model,
                    "prompt": list(range(1, 64)),
                    "max_tokens": 120,
                    "stream": True,
                }
                events: list[bytes] = []
                cut = False
                async with session.post(f"{envoy.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, envoy.log_tail()
                    try:
                        async for line in resp.content:
                            if not line.startswith(b"data:"):
                                continue
                            events.append(line)
                            if len(events) == 3:
                                process.send_signal(signal.SIGKILL)
                                await asyncio.to_thread(process.wait, 10)
                    except aiohttp.ClientPayloadError:
                        cut = True
            done = bool(events) and events[-1].strip() == b"data: [DONE]"
            assert process.returncode == -signal.SIGKILL
            if observation:
                assert not cut and done, f"{len(events)} events, cut={cut}\n{envoy.log_tail()}"
                assert sum(1 for e in events[:-1] if json.loads(e[5:])["choices"]) == 120
            else:
                assert cut or not done, f"the single layout kept the stream: {len(events)} events"
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_observations_landing_on_the_other_replica_reach_the_routing_one(
    extproc_transport: str,
) -> None:
    """Two replicas behind one Envoy: each filter's streams are balanced on their own, so an
    observation lands on the replica that did not route its request about half the time. That
    replica forwards it over the sync channel; both end with every request completed, nothing
    in flight and nothing left to expire."""
    requests = 16
    async with SimPool(2, PoolConfig(speed=5.0)) as pool, contextlib.AsyncExitStack() as stack:
        sync_ports = [_free_port(), _free_port()]
        apps = []
        for i in range(2):
            config = local_serve_config(
                pool,
                extproc={"transport": extproc_transport},
                scheduler={"sync": {"enabled": True}},
                peer_sync={
                    "port": sync_ports[i],
                    "replica": f"replica-{i}",
                    "peers": [f"tcp://127.0.0.1:{sync_ports[1 - i]}"],
                },
            )
            apps.append(await stack.enter_async_context(ServeApp(config)))
        for app in apps:
            await app.until_ready()
        settings = EnvoySettings(
            "127.0.0.1",
            apps[0].grpc_port,
            epp_health_port=apps[0].health_port,
            more_epps=[EppReplica("127.0.0.1", apps[1].grpc_port, apps[1].health_port)],
            pool=[d.address for d in pool.descriptors],
        )
        envoy = await stack.enter_async_context(EnvoyGateway(settings))
        model = pool.descriptors[0].model
        async with aiohttp.ClientSession() as session:
            for i in range(requests):
                body = {
                    "model": model,
                    "prompt": list(range(1 + i, 100 + i)),
                    "max_tokens": 3,
                    "stream": i % 2 == 0,
                }
                async with session.post(f"{envoy.url}/v1/completions", json=body) as resp:
                    text = await resp.text()
                    assert resp.status == 200, f"{text}\n{envoy.log_tail()}"
        outcomes = [app.server.stats.outcomes for app in apps]
        await until(lambda: sum(o["completed"] for o in outcomes) == requests)
        for app in apps:
            scheduler = app.scheduler
            await until(lambda s=scheduler: all(s.inflight(e.name) == (0, 0) for e in s.endpoints()))  # type: ignore[misc]
            assert len(app.server.observations) == 0
        # Decisions are balanced over both replicas (round-robin: 8 and 8).
        assert all(o["routed"] >= requests // 4 for o in outcomes), [o["routed"] for o in outcomes]
        forwarded = sum(o["observation_forwarded"] for o in outcomes)
        assert forwarded == sum(o["observation_remote"] for o in outcomes)
        assert sum(o["observation"] for o in outcomes) + forwarded == requests
        assert not any(o["expired"] or o["cancelled"] or o["observation_unknown"] for o in outcomes)
        assert sum(app.scheduler.completions for app in apps) == requests


async def _observation_streams(envoy: EnvoyGateway, stat: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{envoy.admin_url}/stats?format=json") as resp,
    ):
        stats = (await resp.json(content_type=None))["stats"]
    name = f"cluster.{OBSERVATION_CLUSTER}.{stat}"
    return int(next((s["value"] for s in stats if s.get("name") == name), 0))


async def test_a_refused_request_costs_the_observation_nothing(extproc_transport: str) -> None:
    """A refusal is answered by the decision filter; the observation filter may still see the
    local reply's response headers, with no routed request behind them: nothing is counted
    as a request that ended before its decision."""
    async with in_process_stack(extproc_transport, observation=True) as (app, envoy, model):
        outcomes = app.server.stats.outcomes
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{envoy.url}/v1/completions",
                data=b'{"prompt": ',
                headers={"content-type": "application/json"},
            ) as resp:
                assert resp.status == 400
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while await _observation_streams(envoy, "upstream_rq_active"):
                assert loop.time() < deadline, "Envoy kept an observation stream open"
                await asyncio.sleep(0.05)
            # Envoy 1.40 did open one for the local reply.
            assert await _observation_streams(envoy, "upstream_rq_total") == 1
            # A routed request after it: by its completion kvsched has heard the first one's end.
            body = {"model": model, "prompt": list(range(1, 50)), "max_tokens": 2}
            async with session.post(f"{envoy.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
        await until(lambda: outcomes["completed"] == 1)
        assert outcomes["bad_request"] == 1
        assert outcomes["cancelled_before_decision"] == 0, dict(outcomes)
        assert outcomes["observation"] == 1 and len(app.server.observations) == 0
