"""``kvsched demo``, the README's main job, end to end at a small size: a simulated pool,
``kvsched serve`` and a real Envoy per policy, the replay client in a process of its own; the
reports come back whole for both policies and are written where asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_replays_every_request_through_both_stacks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scheduler", "demo", "--requests", "12", "--workers", "2", "--out", "out"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvsched vs round-robin: TTFT p50" in result.stdout
    reports = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert set(reports) == {"kvsched", "round_robin"}
    for policy, report in reports.items():
        assert (report["requests"], report["completed"], report["failed"]) == (12, 12, 0), policy
        assert report["ttft_ms"]["p50"] > 0 and report["usage_reported"] == 12
        # Every request was answered by a worker of the pool, through Envoy.
        served = report["per_endpoint"]
        assert sum(served.values()) == 12 and set(served) <= {"sim-0", "sim-1"}
    assert (tmp_path / "out" / "replay.png").is_file()
