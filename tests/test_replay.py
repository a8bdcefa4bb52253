"""Replay: report arithmetic, simulator determinism, live replay against a simulated worker."""

from __future__ import annotations

import json

import pytest

from scheduler.cli import main
from scheduler.replay.live import replay_live
from scheduler.replay.report import RequestOutcome, build_report
from scheduler.replay.simulate import simulate
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.workloads.generators import chat
from scheduler.workloads.model import Workload, WorkloadRequest


def test_report_arithmetic() -> None:
    outcomes = [
        RequestOutcome(
            "a",
            True,
            0.0,
            "w1",
            prompt_tokens=100,
            cached_tokens=50,
            completion_tokens=3,
            first_token_s=0.1,
            end_s=0.5,
        ),
        RequestOutcome(
            "b",
            True,
            1.0,
            "w2",
            prompt_tokens=100,
            cached_tokens=0,
            completion_tokens=5,
            first_token_s=1.3,
            end_s=2.0,
        ),
        RequestOutcome("c", False, 1.5, "w1", error="http 503: no endpoint", end_s=1.6),
    ]
    report = build_report(outcomes, policy="p", mode="live", workers=2, oracle_hit_ratio=0.4)
    assert (report["requests"], report["completed"], report["failed"]) == (3, 2, 1)
    assert report["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert report["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert report["e2e_ms"]["p99"] == pytest.approx(995.0)
    assert report["tpot_ms"]["p50"] == pytest.approx((200.0 + 175.0) / 2)
    assert report["hit_ratio"] == pytest.approx(0.25)
    assert report["throughput_rps"] == pytest.approx(1.0)  # 2 done over 2 s
    assert report["failures"] == {"http 503": 1}
    assert report["per_endpoint"] == {"w1": 1, "w2": 1}


def test_unreported_usage_gives_no_hit_ratio() -> None:
    outcome = RequestOutcome("a", True, 0.0, prompt_tokens=10, first_token_s=0.1, end_s=0.2)
    assert (
        build_report([outcome], policy="p", mode="live", workers=1, oracle_hit_ratio=None)["hit_ratio"]
        is None
    )


def test_simulation_is_deterministic_and_cache_aware_routing_wins() -> None:
    workload = chat(seed=1, sessions=30, turns=4, rate=3.0)
    first = simulate(workload, policy="kvsched", workers=4, seed=7)
    assert json.dumps(first, sort_keys=True) == json.dumps(
        simulate(workload, policy="kvsched", workers=4, seed=7), sort_keys=True
    )
    baseline = simulate(workload, policy="round_robin", workers=4, seed=7)
    assert first["completed"] == baseline["completed"] == len(workload.requests)
    assert first["hit_ratio"] > baseline["hit_ratio"]
    assert 0 < first["oracle_hit_ratio"] < 1


def test_replay_cli_simulate_writes_json_and_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    code = main(
        [
            "replay",
            "--simulate",
            "--workload",
            "rag",
            "--limit",
            "60",
            "--workers",
            "2",
            "--policy",
            "kvsched",
            "--policy",
            "random",
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    reports = json.loads(out.read_text())
    assert set(reports) == {"kvsched", "random"}
    assert reports["kvsched"]["mode"] == "simulate" and reports["kvsched"]["requests"] == 60
    assert (tmp_path / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_live_replay_against_simulated_workers() -> None:
    workload = Workload(
        "tiny",
        [WorkloadRequest(f"r{i}", 0.01 * i, list(range(1, 65)) + [100 + i] * 8, 4) for i in range(6)],
    )
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        url = pool.descriptors[0].http_url
        outcomes = await replay_live(workload, url, model=pool.descriptors[0].model, concurrency=2)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert all(o.completion_tokens == 4 and o.endpoint for o in outcomes)
    assert all((o.ttft_s or 0) > 0 and (o.e2e_s or 0) >= (o.ttft_s or 0) for o in outcomes)
    # The shared 64-token prefix is served from cache once it has been computed.
    assert max(o.cached_tokens or 0 for o in outcomes) >= 64


async def test_live_replay_counts_http_errors() -> None:
    workload = Workload("bad", [WorkloadRequest("r0", 0.0, [], 4)])  # empty prompt: the server says 400
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        (outcome,) = await replay_live(workload, pool.descriptors[0].http_url, model=pool.descriptors[0].model)
    assert not outcome.ok and outcome.error.startswith("http 400")
