"""``kvsched replay``: live against simulated workers on 127.0.0.1, and in the simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

import scheduler.replay.commands as commands
import scheduler.sim.virtual as virtual
from scheduler.cli import main
from scheduler.replay.report import latency_summary
from scheduler.replay.simulate import simulate
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.workloads.generators import chat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_live_replay_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "live.json"
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        argv = [
            "replay",
            "--workload",
            "rag",
            "--requests",
            "12",
            "--rate",
            "50",
            "--target",
            pool.descriptors[0].http_url,
            "--concurrency",
            "4",
            "--policy-label",
            "direct",
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path / "plots"),
            "--quiet",
        ]
        # The command runs its own event loop; the pool keeps serving on this one.
        code = await asyncio.to_thread(main, argv)
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["policy"], report["mode"], report["api"]) == ("direct", "live", "completions")
    assert (report["token_scale"], report["workload_token_scale"]) == (1.0, 1.0)
    assert (report["requests"], report["completed"], report["failed"]) == (12, 12, 0)
    assert report["per_endpoint"] == {"sim-0": 12}
    # Shared preambles and documents hit; no run beats the infinite-cache ceiling.
    assert report["usage_reported"] == 12
    assert 0 < report["hit_ratio"] <= report["oracle_hit_ratio"] < 1
    assert "trace_oracle_hit_ratio" not in report  # generated workloads have no trace blocks
    assert report["ttft_ms"]["p50"] > 0 and len(report["samples"]["ttft_ms"]) == 12
    assert (tmp_path / "plots" / "replay.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "direct" in printed and "TTFT p50 ms" in printed


async def test_live_trace_reports_latencies_as_served(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 10 * i, "input_length": 1024, "output_length": 320, "hash_ids": [0, i]}
        for i in range(3)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "live.json"
    async with SimPool(1, PoolConfig(speed=20.0)) as pool:
        argv = ["replay", "--trace", str(trace), "--target", pool.descriptors[0].http_url, "--json", str(out)]
        assert await asyncio.to_thread(main, [*argv, "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 3 and report["trace_oracle_hit_ratio"] == pytest.approx(2 / 6)
    # The server generated 10 tokens per request: reported as served, not as 32x as many.
    assert (report["token_scale"], report["workload_token_scale"]) == (1.0, 32.0)
    assert report["output_tokens_per_s"] * report["duration_s"] == pytest.approx(30)


def test_simulate_writes_one_report_per_policy(tmp_path: Path) -> None:
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
    assert (tmp_path / "replay.png").read_bytes()[:8] == PNG_MAGIC


def test_seeds_pool_the_runs_of_each_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shape = ["replay", "--simulate", "--workload", "rag", "--limit", "40", "--workers", "2"]
    pooled_path = tmp_path / "pooled.json"
    assert main([*shape, "--seed", "3", "--seeds", "3", "--json", str(pooled_path)]) == 0
    assert "TTFT p50 / p99 ms by seed: 3:" in capsys.readouterr().out
    pooled = json.loads(pooled_path.read_text())
    singles = []
    for seed in (3, 4, 5):
        path = tmp_path / f"seed{seed}.json"
        assert main([*shape, "--seed", str(seed), "--json", str(path)]) == 0
        singles.append(json.loads(path.read_text()))
    # Each seed runs its own workload (the seeds' arrivals differ) ...
    assert len({json.dumps(single["samples"]) for single in singles}) == 3
    # ... and the pooled report is those three runs: each kept whole, and every request of
    # them in the percentiles and totals.
    assert pooled["seed"] == [3, 4, 5] and pooled["requests"] == 120
    assert pooled["workload"] == "rag" and pooled["replicas"] == 1
    for kept, single in zip(pooled["per_seed"], singles, strict=True):
        single.pop("samples")
        assert kept == single
    every_ttft = [
        v for single_path in ("seed3", "seed4", "seed5") for v in _samples(tmp_path / f"{single_path}.json")
    ]
    assert sorted(pooled["samples"]["ttft_ms"]) == sorted(every_ttft)
    # (The samples are rounded to the microsecond.)
    assert pooled["ttft_ms"] == pytest.approx(latency_summary([v / 1000.0 for v in every_ttft]), abs=1e-3)
    assert pooled["cached_tokens"] == sum(single["cached_tokens"] for single in singles)
    # Laid end to end in time, the pooled run's rate is about the runs' mean rate, not 3x it.
    mean_rate = sum(single["throughput_rps"] for single in singles) / 3
    assert pooled["throughput_rps"] == pytest.approx(mean_rate, rel=0.25)


def _samples(path: Path) -> list[float]:
    values: list[float] = json.loads(path.read_text())["samples"]["ttft_ms"]
    return values


def test_simulate_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 100 * i, "input_length": 900, "output_length": 40, "hash_ids": [0, i]} for i in range(8)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    code = main(
        ["replay", "--simulate", "--trace", str(trace), "--limit", "5", "--workers", "2", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["requests"], report["completed"], report["token_scale"]) == (5, 5, 32)
    # Block 0 is shared by all five requests: 4 of 10 trace blocks were seen before.
    assert report["trace_oracle_hit_ratio"] == pytest.approx(0.4)


def test_simulation_is_deterministic_and_cache_aware_routing_wins() -> None:
    workload = chat(seed=1, sessions=30, turns=4, rate=3.0)
    first = simulate(workload, policy="kvsched", workers=4, seed=7)
    assert json.dumps(first, sort_keys=True) == json.dumps(
        simulate(workload, policy="kvsched", workers=4, seed=7), sort_keys=True
    )
    baseline = simulate(workload, policy="round_robin", workers=4, seed=7)
    assert first["completed"] == baseline["completed"] == len(workload.requests)
    assert first["hit_ratio"] > baseline["hit_ratio"]


def test_simulator_hook_takes_over_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def run_from_args(args: argparse.Namespace) -> int:
        seen.append(args)
        return 3

    monkeypatch.setattr(virtual, "run_from_args", run_from_args, raising=False)
    assert (
        main(["replay", "--simulate", "--workload", "chat", "--policy", "random", "--policy", "kvsched"]) == 3
    )
    assert seen[0].policy == ["random", "kvsched"] and seen[0].workload == "chat"


def test_simulate_without_the_simulator_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(commands, "SIMULATOR_MODULE", "scheduler.sim.not_there")
    assert main(["replay", "--simulate", "--workload", "chat"]) == 2
    assert "--simulate needs the virtual-time simulator" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "chat"], "either --target URL"),
        (["--workload", "chat", "--simulate", "--target", "http://127.0.0.1:9"], "either --target URL"),
        (["--workload", "chat", "--target", "http://127.0.0.1:9", "--policy", "random"], "--policy-label"),
        (["--trace", "t.jsonl", "--rate", "3", "--simulate"], "use --limit"),
        (
            ["--workload", "chat", "--target", "http://127.0.0.1:9", "--seeds", "2"],
            "--seeds pools simulated runs",
        ),
    ],
)
def test_contradictory_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", *argv]) == 2
    assert message in capsys.readouterr().err


def test_seeds_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replay", "--simulate", "--workload", "chat", "--seeds", "0"])
    assert "need at least 1" in capsys.readouterr().err


def test_trace_and_workload_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        main(["replay", "--trace", "t.jsonl", "--workload", "chat", "--simulate"])
