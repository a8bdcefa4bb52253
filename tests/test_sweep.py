"""The load sweep: simulated runs at several loads, the headline summary, and its plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scheduler.cli import main
from scheduler.replay.sweep import run_sweep, save_sweep_plot, summarize
from scheduler.workloads.model import SLOTargets
from scheduler.workloads.mooncake import load_mooncake

TRACE = Path(__file__).resolve().parents[1].parent / "shared/data/mooncake/conversation_trace.jsonl"
needs_trace = pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/data/mooncake")


def _level(**attainment: float) -> dict[str, Any]:
    return {p: {"slo_attainment": a} for p, a in attainment.items()}


def test_summary_reports_the_first_load_where_every_baseline_is_under_80_percent() -> None:
    runs = {
        "1": _level(kvsched=0.95, round_robin=0.85, queue_only=0.7),
        "1.5": _level(kvsched=0.9, round_robin=0.6, queue_only=0.75),
        "2": _level(kvsched=0.5, round_robin=0.1, queue_only=0.2),
    }
    summary = summarize(runs, ["kvsched", "round_robin", "queue_only"])
    assert summary["threshold_load"] == 1.5 and summary["best_baseline"] == "queue_only"
    assert summary["lead_points"] == pytest.approx(15.0)
    # Never reached: no threshold.
    assert summarize({"1": runs["1"]}, ["kvsched", "round_robin", "queue_only"])["threshold_load"] is None


@needs_trace
def test_sweep_runs_each_policy_at_each_load_and_higher_load_hurts(tmp_path: Path) -> None:
    workload = load_mooncake(TRACE, block_tokens=16, limit=400)
    sweep = run_sweep(
        workload,
        policies=["kvsched", "round_robin"],
        multipliers=[1.0, 8.0],
        workers=4,
        slo=SLOTargets(ttft_ms=2000.0),
    )
    assert set(sweep["runs"]) == {"1", "8"}
    for level in sweep["runs"].values():
        assert set(level) == {"kvsched", "round_robin"}
        for report in level.values():
            assert report["completed"] + report["failed"] == 400 and "samples" not in report
    light, heavy = sweep["runs"]["1"]["round_robin"], sweep["runs"]["8"]["round_robin"]
    assert heavy["ttft_ms"]["p50"] > light["ttft_ms"]["p50"]
    assert heavy["slo_attainment"] <= light["slo_attainment"]
    plot = save_sweep_plot(sweep, tmp_path)
    assert plot.read_bytes().startswith(b"\x89PNG")


@needs_trace
def test_sweep_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    code = main(
        [
            "sweep",
            "--trace",
            str(TRACE),
            "--limit",
            "200",
            "--loads",
            "1,2",
            "--policy",
            "kvsched",
            "--workers",
            "2",
            "--slo-ttft-ms",
            "1500",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["multipliers"] == [1.0, 2.0] and document["slo"]["ttft_ms"] == 1500.0
    assert 0.0 <= document["runs"]["2"]["kvsched"]["slo_attainment"] <= 1.0


def test_sweep_without_objectives_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--trace", "x.jsonl"]) == 2
    assert "--slo-ttft-ms" in capsys.readouterr().err
