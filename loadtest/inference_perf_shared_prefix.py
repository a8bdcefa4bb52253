"""inference-perf's shared_prefix run against the demo stack, kvsched against round-robin.

For each policy: a fresh stack (``kvsched demo --hold POLICY``: simulated pool, kvsched serve,
Envoy), then inference-perf (its own Python, >= 3.12) with ``inference-perf/shared-prefix.yaml``,
the gateway URL and the pool's tokenizer directory, then the workers' own prefix-cache counters
(``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``) and kvsched's matched-block
figures from /metrics, then the stack stops. Prints one table and writes JSON.

    python loadtest/inference_perf_shared_prefix.py --inference-perf ~/ip/bin/inference-perf \\
        --out inference-perf-results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).resolve().with_name("inference-perf") / "shared-prefix.yaml"
POLICIES = ("kvsched", "round_robin")


def scrape(url: str) -> dict[str, float]:
    """Sum of each unlabelled-or-labelled sample by name on a Prometheus page."""
    totals: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            try:
                totals[name] = totals.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return totals


def summary_report(directory: Path) -> dict[str, Any]:
    found = sorted(directory.rglob("summary_lifecycle_metrics.json"))
    if not found:
        raise RuntimeError(f"inference-perf wrote no summary_lifecycle_metrics.json under {directory}")
    report: dict[str, Any] = json.loads(found[-1].read_text())
    return report


def best_hit_ratios(directory: Path, tokenizer_dir: str) -> tuple[float | None, float | None]:
    """The best any router can do on the prompts inference-perf sent (counted with the pool's
    tokenizer, 16-token blocks, one infinite cache): the full-block oracle kvsched's reports
    use, and the same in the workers' own measure (cached prompt tokens / prompt tokens, at
    most ``(len - 1) // 16`` blocks per prompt, as vLLM always recomputes the last token)."""
    sys.path.insert(0, str(REPO))
    from scheduler.replay.text import ClientTokenizer
    from scheduler.workloads.model import WorkloadRequest
    from scheduler.workloads.oracle import oracle_hit_ratio, prefix_block_keys

    found = sorted(directory.rglob("per_request_lifecycle_metrics.json"))
    if not found:
        return None, None
    tokenizer = ClientTokenizer(tokenizer_dir)
    entries = json.loads(found[-1].read_text())
    entries.sort(key=lambda entry: entry.get("start_time", 0.0))
    requests = []
    for position, entry in enumerate(entries):
        request = entry.get("request")
        body = json.loads(request) if isinstance(request, str) else request
        if isinstance(body, dict) and isinstance(body.get("prompt"), str):
            ids = tokenizer.prompt_ids(body["prompt"])
            requests.append(WorkloadRequest(str(position), float(position), ids, 1))
    if not requests:
        return None, None
    seen: set[int] = set()
    cached = total = 0
    for request in requests:
        keys = prefix_block_keys(request.prompt_token_ids, 16)
        usable = keys[: (len(request.prompt_token_ids) - 1) // 16]
        hits = next((i for i, key in enumerate(usable) if key not in seen), len(usable))
        cached += 16 * hits
        total += len(request.prompt_token_ids)
        seen.update(keys)
    return oracle_hit_ratio(requests, 16), cached / total


def run_policy(policy: str, inference_perf: str, out: Path, workers: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stack = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "demo", "--hold", policy, "--workers", str(workers)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert stack.stdout is not None
        line = stack.stdout.readline()
        if not line:
            raise RuntimeError(f"the {policy} stack did not start")
        info = json.loads(line)
        reports = out / policy
        subprocess.run(
            [
                inference_perf,
                "--config_file",
                str(CONFIG),
                "--server.base_url",
                info["gateway"],
                "--server.model_name",
                info["model"],
                "--tokenizer.pretrained_model_name_or_path",
                info["tokenizer_dir"],
                "--storage.local_storage.path",
                str(reports),
            ],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        hits = queries = 0.0
        for worker in info["workers"]:
            page = scrape(worker + "/metrics")
            hits += page.get("vllm:prefix_cache_hits_total", 0.0)
            queries += page.get("vllm:prefix_cache_queries_total", 0.0)
        kvsched = scrape(info["kvsched_metrics"])
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
    summary = summary_report(reports)
    successes = summary["successes"]
    prompt = successes.get("prompt_tokens", {})
    return {
        "policy": policy,
        "requests": successes["count"],
        "failures": summary.get("failures", {}).get("count"),
        "ttft_ms_p50": 1000.0 * successes["latency"]["time_to_first_token"]["median"],
        "ttft_ms_p90": 1000.0 * successes["latency"]["time_to_first_token"]["p90"],
        "ttft_ms_p99": 1000.0 * successes["latency"]["time_to_first_token"]["p99"],
        "token_count_mismatches": successes.get("token_count_mismatches"),
        "prompt_tokens_mean": prompt.get("mean"),
        "worker_hit_ratio": hits / queries if queries else None,
        "client_cached_ratio": prompt["cached"] / prompt["total"] if prompt.get("total") else None,
        **dict(
            zip(
                ("oracle_hit_ratio", "best_served_ratio"),
                best_hit_ratios(reports, info["tokenizer_dir"]),
                strict=True,
            )
        ),
        "kvsched_decisions_prefix_matched": kvsched.get("kvsched_decisions_prefix_matched_total"),
        "kvsched_tokenization_mismatch": kvsched.get("kvsched_tokenization_mismatch"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference-perf", default="inference-perf", help="the inference-perf executable")
    parser.add_argument("--out", type=Path, default=Path("inference-perf-results"))
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_policy(policy, args.inference_perf, args.out, args.workers) for policy in POLICIES]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
