"""``kvsched demo --hold``: a whole stack (simulated pool, kvsched serve, real Envoy) in a child
process, for one's own load generator; it prints where everything is and stops on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_hold_serves_the_stack_until_interrupted(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "demo", "--hold", "kvsched", "--workers", "2"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert Path(info["tokenizer_dir"], "tokenizer.json").is_file() and len(info["workers"]) == 2
        body = json.dumps(
            {"model": info["model"], "prompt": "The gateway routes this text.", "max_tokens": 3}
        )
        request = urllib.request.Request(
            info["gateway"] + "/v1/completions",
            data=body.encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["text"] == "the model answers"
        status_url = info["kvsched_metrics"].replace("/metrics", "/debug/status")
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(status_url, timeout=10) as response:
                status = json.loads(response.read())
            if status["tokenizer"]["probe"]["status"] != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status["tokenizer"]["probe"]["status"] == "match"
        assert status["prefix_match"]["decisions"] == 1
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
