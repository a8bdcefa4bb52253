"""The benchmarks run end to end at a small size and report what the README promises."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from scheduler.bench.epp_bench import (
    format_report,
    format_scaling,
    judge,
    judge_scaling,
    measure_decision_scaling,
    request_bodies,
)
from scheduler.bench.epp_bench import run as run_epp
from scheduler.bench.index_bench import run as run_index


def test_index_benchmark_reports_every_figure() -> None:
    report = run_index(workers=4, blocks=5_000, prompt_blocks=32, lookups=50, reference_blocks=2_000, seed=1)
    for key in (
        "events_per_s",
        "lookups_per_s",
        "lookup_p50_us",
        "lookup_p99_us",
        "hash_tokens_per_s",
        "bytes_per_block",
    ):
        assert report[key] > 0 and report["reference"][key] > 0, key
    assert report["indexed_blocks"] >= 5_000
    # Every lookup prompt shares at least the system prompt with an indexed session.
    assert report["mean_matched_blocks"] >= 32
    assert set(report["goals"]) == {"lookup_p99_le_50us", "events_per_s_ge_1M", "lookups_ge_20x_reference"}


def test_epp_benchmark_measures_both_paths() -> None:
    report = run_epp(rate=50.0, prompt_tokens=256, requests=24, concurrency=8, workers=2, seed=3)
    assert report["direct_ms"]["p50"] > 0 and report["gateway_ms"]["p50"] > 0
    assert report["added_p50_ms"] == report["gateway_ms"]["p50"] - report["direct_ms"]["p50"]
    assert report["picks"]["picks_per_s"] > 0
    # Every process of the set-up was accounted for, and the run was too small to judge a goal.
    assert set(report["cpu_ms_per_request"]) == {"client", "envoy", "kvsched", "workers"}
    assert report["goals"] == {} and len(report["goal_conditions"]) == 2
    assert "via Envoy+kvsched" in format_report(report)


def test_epp_benchmark_runs_large_chat_prompts_in_a_closed_loop() -> None:
    report = run_epp(
        rate=0.0, prompt_tokens=0, requests=12, concurrency=4, workers=2, seed=4, prompt_bytes=50_000
    )
    assert report["prompt_bytes"] >= 50_000 and report["prompt_tokens"] is None
    assert report["gateway_ms"]["p99"] > 0 and report["direct_ms"]["p99"] > 0


def test_large_prompt_bodies_have_the_requested_size() -> None:
    path, bodies = request_bodies("m", random.Random(0), 3, prompt_tokens=0, prompt_bytes=220_000)
    assert path == "/v1/chat/completions"
    contents = [json.loads(body)["messages"][0]["content"] for body in bodies]
    assert all(len(content) == 220_000 for content in contents)
    # Distinct from the first byte: no two prompts share a cached prefix.
    assert len({content[:20] for content in contents}) == 3


def test_goals_are_judged_only_under_their_conditions() -> None:
    base = {"rate": 200.0, "achieved_rps": 199.0, "prompt_tokens": 8192, "prompt_bytes": None}
    report = {**base, "concurrency": 64, "added_p50_ms": 0.8, "added_p99_ms": 3.5}
    goals, skipped = judge(report)
    assert goals == {
        "added_p50_le_1ms_at_200rps_8k_tokens": True,
        "added_p99_le_3ms_at_200rps_8k_tokens": False,
    }
    assert list(skipped) == ["added_p99_le_20ms_at_220kb"]
    # A saturated run that could not reach the rate is not judged against the 200 req/s goal.
    goals, _ = judge({**report, "achieved_rps": 120.0})
    assert goals == {}
    large = {**base, "prompt_tokens": None, "prompt_bytes": 220_000, "concurrency": 150}
    goals, _ = judge({**large, "added_p50_ms": 5.0, "added_p99_ms": 12.0})
    assert goals == {"added_p99_le_20ms_at_220kb_150_concurrent": True}


def test_epp_benchmark_breaks_kvsched_cpu_down_by_stage() -> None:
    report = run_epp(rate=0.0, prompt_tokens=512, requests=16, concurrency=2, workers=2, seed=5)
    stages = report["kvsched_stages"]
    assert stages["routed_requests"] == 8
    # Every request went through each stage of the request path once.
    for stage in ("request_headers", "body_parse", "pick", "reply_build"):
        assert stages["calls"][stage] == 8, stage
        assert stages["us_per_request"][stage] > 0, stage
    pick = report["picks"]["stages"]
    assert pick["pick_total"] >= pick["block_hashing"] > 0
    assert "Scheduler.pick" in format_report(report)


def test_decision_scaling_reports_growth_in_endpoints_and_prompt_blocks() -> None:
    scaling = measure_decision_scaling(
        endpoints=(2, 8), prompt_tokens=(256, 1024), base_endpoints=2, base_tokens=256, budget_s=0.02
    )
    assert [r["endpoints"] for r in scaling["by_endpoints"]] == [2, 8]
    assert [r["prompt_tokens"] for r in scaling["by_prompt_tokens"]] == [256, 1024]
    assert all(r["pick_us"] > 0 for r in scaling["by_endpoints"] + scaling["by_prompt_tokens"])
    scaling["goals"] = judge_scaling(scaling)
    assert set(scaling["goals"]) == {
        "pick_cost_at_most_linear_in_prompt_blocks",
        "pick_cost_sublinear_in_endpoints",
    }
    assert "steepest growth in endpoints" in format_scaling(scaling)


def test_bench_epp_command_smoke() -> None:
    # The command as CI runs it: a short closed loop through the real Envoy, kvsched and
    # workers; every request must succeed and the report must carry every section.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scheduler",
            "bench",
            "epp",
            "--rate",
            "0",
            "--requests",
            "40",
            "--concurrency",
            "4",
            "--workers",
            "2",
            "--prompt-tokens",
            "1024",
            "--json",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["requests"] == 40 and report["completed"] == {"direct": 20, "gateway": 20}
    assert report["gateway_ms"]["p50"] > 0 and report["direct_ms"]["p50"] > 0
    assert set(report["cpu_ms_per_request"]) == {"client", "envoy", "kvsched", "workers"}
    assert report["kvsched_stages"]["calls"]["pick"] == 20
    assert report["picks"]["picks_per_s"] > 0
