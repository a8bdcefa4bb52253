"""``kvsched bench pd``: prefill/decode disaggregation against aggregated pods, in virtual time.

One workload of long prompts and long outputs (distinct prompts: no prefix to share), served
twice by the same number of simulated pods in the same run: every pod serving requests whole
(kvsched's pipeline as configured), and a disaggregated pool (``prefill`` pods labelled
prefill, the rest decode; kvsched picks both pods, the prompt's KV crosses at the virtual
pool's bandwidth, ``sim/virtual.py``). TTFT and TPOT p50/p99, and ratios against the
aggregated pool. Virtual time: a run is a pure function of the workload and the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scheduler.bench.policies import ttft_percentiles_ms
from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring.disaggregation import DisaggregationConfig
from scheduler.sim.virtual import KV_BYTES_PER_TOKEN, KV_TRANSFER_BYTES_PER_S, VirtualPool, VirtualPoolConfig
from scheduler.workloads.model import RequestOutcome, WorkloadRequest

# KV blocks per pod: an H100's 80 GB less 16 GB of Llama-3-8B weights and activations, at
# 90% GPU memory utilisation, is ~55 GB of KV, 420k tokens at 128 KiB each; 16,384 blocks of
# 16 (262k tokens) stays below it. The virtual pool's default (1024) would make these
# prompts KV-bound at two or three per pod.
CAPACITY_BLOCKS = 16_384


def long_requests(
    *, seed: int, requests: int, rate: float, prompt: tuple[int, int], output: tuple[int, int]
) -> list[WorkloadRequest]:
    """Poisson arrivals of distinct prompts and outputs, each length uniform in its bounds."""
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0 / rate, requests))
    out = []
    for i in range(requests):
        length = int(rng.integers(prompt[0], prompt[1] + 1))
        tokens = [int(t) for t in rng.integers(1, 31_000, length)]
        out.append(
            WorkloadRequest(f"pd-{i}", float(at[i]), tokens, int(rng.integers(output[0], output[1] + 1)))
        )
    return out


def tpot_percentiles_ms(outcomes: Sequence[RequestOutcome]) -> dict[str, float]:
    """TPOT p50/p99 over the served requests with two or more output tokens."""
    values = sorted(o.tpot_s * 1000.0 for o in outcomes if o.ok and o.tpot_s is not None)
    if not values:
        return {"p50": math.inf, "p99": math.inf}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 99)}


def run_shape(
    label: str, requests: list[WorkloadRequest], *, workers: int, prefill: int, bandwidth: float, seed: int
) -> dict[str, Any]:
    config = SchedulerConfig(seed=seed, disaggregation=DisaggregationConfig(enabled=prefill > 0))
    pool = VirtualPool(
        VirtualPoolConfig(
            workers=workers,
            capacity_blocks=CAPACITY_BLOCKS,
            prefill_workers=prefill,
            kv_transfer_bytes_per_s=bandwidth,
        ),
        config,
    )
    outcomes = pool.run(requests)
    served = [o for o in outcomes if o.ok]
    return {
        "label": label,
        "prefill_pods": prefill,
        "decode_pods": workers - prefill,
        "requests": len(outcomes),
        "failed": len(outcomes) - len(served),
        "ttft_ms": ttft_percentiles_ms(outcomes),
        "tpot_ms": tpot_percentiles_ms(outcomes),
    }


def run(
    *,
    workers: int = 8,
    prefill: int = 3,
    requests: int = 400,
    rate: float = 8.0,
    prompt: tuple[int, int] = (3000, 8000),
    output: tuple[int, int] = (300, 800),
    bandwidth: float = KV_TRANSFER_BYTES_PER_S,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregated and disaggregated pools on the same workload; ratios against aggregated."""
    workload = long_requests(seed=seed, requests=requests, rate=rate, prompt=prompt, output=output)
    rows = [
        run_shape("aggregated", workload, workers=workers, prefill=0, bandwidth=bandwidth, seed=seed),
        run_shape(
            "disaggregated", workload, workers=workers, prefill=prefill, bandwidth=bandwidth, seed=seed
        ),
    ]
    base = rows[0]
    for row in rows:
        row["vs_aggregated"] = {
            f"{metric}_{q}": row[f"{metric}_ms"][q] / base[f"{metric}_ms"][q]
            if base[f"{metric}_ms"][q]
            else None
            for metric in ("ttft", "tpot")
            for q in ("p50", "p99")
        }
    return {
        "workers": workers,
        "prefill_pods": prefill,
        "requests": requests,
        "rate": rate,
        "prompt_tokens": list(prompt),
        "output_tokens": list(output),
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
        "kv_transfer_bytes_per_s": bandwidth,
        "seed": seed,
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['requests']} requests at {report['rate']:g}/s, prompts {report['prompt_tokens']} tokens, "
        f"outputs {report['output_tokens']}; {report['workers']} pods; KV "
        f"{report['kv_bytes_per_token'] / 1024:g} KiB/token "
        f"at {report['kv_transfer_bytes_per_s'] / 1e9:g} GB/s",
        f"{'pods':<28} {'TTFT p50 ms':>12} {'p99':>9} {'TPOT p50 ms':>12} {'p99':>7} "
        f"{'TTFT p99 x':>11} {'TPOT p99 x':>11} {'failed':>7}",
    ]
    for row in report["rows"]:
        ttft, tpot, ratio = row["ttft_ms"], row["tpot_ms"], row["vs_aggregated"]
        shape = (
            f"{row['label']} ({row['prefill_pods']}P+{row['decode_pods']}D)"
            if row["prefill_pods"]
            else f"{row['label']} ({row['decode_pods']})"
        )
        lines.append(
            f"{shape:<28} {ttft['p50']:>12.1f} {ttft['p99']:>9.1f} {tpot['p50']:>12.2f} {tpot['p99']:>7.2f} "
            f"{ratio['ttft_p99']:>11.2f} {ratio['tpot_p99']:>11.2f} {row['failed']:>7}"
        )
    return "\n".join(lines)
