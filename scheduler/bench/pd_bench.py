"""``kvsched bench pd``: prefill/decode disaggregation against aggregated pods, in virtual time.

One workload of long prompts and long outputs (distinct prompts: no prefix to share), served
twice by the same number of simulated pods in the same run: every pod serving requests whole
(kvsched's pipeline as configured), and a disaggregated pool (``prefill`` pods labelled
prefill, the rest decode; kvsched picks both pods, the prompt's KV crosses at the virtual
pool's bandwidth, ``sim/virtual.py``). TTFT and TPOT p50/p99, and ratios against the
aggregated pool. The engines allocate KV blocks on demand and preempt as vLLM does
(``EngineConfig.preemption``). ``sweep`` repeats the comparison over output lengths, rates,
prefill:decode splits and llm-d's ``non_cached_tokens_threshold``. Virtual time: a run is a
pure function of the workload and the seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scheduler.bench.policies import ttft_percentiles_ms
from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring.disaggregation import DisaggregationConfig
from scheduler.sim.engine import DEFAULT_CAPACITY_BLOCKS
from scheduler.sim.virtual import KV_BYTES_PER_TOKEN, KV_TRANSFER_BYTES_PER_S, VirtualPool, VirtualPoolConfig
from scheduler.workloads.model import RequestOutcome, WorkloadRequest

# KV blocks per pod: the engine's default, Llama-3-8B bf16 on an 80 GB H100 at vLLM's 0.9
# GPU memory utilisation (~443k tokens; derivation in sim/engine.py). A smaller figure makes
# the decode pods of a disaggregated pool KV-bound first (at 16,384 blocks, outputs of
# 1,000-2,000 tokens at 8/s on 3P+5D: TTFT p99 26x aggregated) since they hold every running
# request's KV on fewer pods.
CAPACITY_BLOCKS = DEFAULT_CAPACITY_BLOCKS


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


def document_requests(
    *,
    seed: int,
    requests: int,
    rate: float,
    documents: int,
    document_tokens: int,
    suffix: tuple[int, int],
    output: tuple[int, int],
) -> list[WorkloadRequest]:
    """Poisson arrivals of prompts that share a prefix: one of ``documents`` documents of
    ``document_tokens`` tokens (Zipf popularity, s = 1), then a suffix of its own. The case
    where prefill pods could gain most: their caches hold documents only, while an
    aggregated pod's cache also holds its decoding requests' KV."""
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0 / rate, requests))
    texts = [[int(t) for t in rng.integers(1, 31_000, document_tokens)] for _ in range(documents)]
    popularity = 1.0 / np.arange(1, documents + 1)
    popularity /= popularity.sum()
    out = []
    for i in range(requests):
        document = texts[int(rng.choice(documents, p=popularity))]
        tail = [int(t) for t in rng.integers(1, 31_000, int(rng.integers(suffix[0], suffix[1] + 1)))]
        out.append(
            WorkloadRequest(
                f"pd-{i}", float(at[i]), document + tail, int(rng.integers(output[0], output[1] + 1))
            )
        )
    return out


def tpot_percentiles_ms(outcomes: Sequence[RequestOutcome]) -> dict[str, float]:
    """TPOT p50/p99 over the served requests with two or more output tokens."""
    values = sorted(o.tpot_s * 1000.0 for o in outcomes if o.ok and o.tpot_s is not None)
    if not values:
        return {"p50": math.inf, "p99": math.inf}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 99)}


def run_shape(
    label: str,
    requests: list[WorkloadRequest],
    *,
    workers: int,
    prefill: int,
    bandwidth: float,
    seed: int,
    capacity_blocks: int = CAPACITY_BLOCKS,
    threshold: int = 0,
) -> dict[str, Any]:
    config = SchedulerConfig(
        seed=seed,
        disaggregation=DisaggregationConfig(enabled=prefill > 0, non_cached_tokens_threshold=threshold),
    )
    pool = VirtualPool(
        VirtualPoolConfig(
            workers=workers,
            capacity_blocks=capacity_blocks,
            prefill_workers=prefill,
            kv_transfer_bytes_per_s=bandwidth,
            # KV blocks on demand with vLLM's preemption: long outputs make decode pods
            # KV-bound, where worst-case reservation would hold back requests vLLM runs.
            preemption=True,
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
    capacity_blocks: int = CAPACITY_BLOCKS,
    threshold: int = 0,
    documents: int = 0,
    document_tokens: int = 6000,
) -> dict[str, Any]:
    """Aggregated and disaggregated pools on the same workload; ratios against aggregated.
    ``documents``: prompts of one of that many shared documents and a suffix of ``prompt``'s
    length bounds (``document_requests``); 0: distinct prompts of ``prompt``'s bounds."""
    workload = (
        document_requests(
            seed=seed,
            requests=requests,
            rate=rate,
            documents=documents,
            document_tokens=document_tokens,
            suffix=prompt,
            output=output,
        )
        if documents
        else long_requests(seed=seed, requests=requests, rate=rate, prompt=prompt, output=output)
    )
    common = {"workers": workers, "bandwidth": bandwidth, "seed": seed, "capacity_blocks": capacity_blocks}
    rows = [
        run_shape("aggregated", workload, prefill=0, **common),  # type: ignore[arg-type]
        run_shape("disaggregated", workload, prefill=prefill, threshold=threshold, **common),  # type: ignore[arg-type]
    ]
    add_ratios(rows)
    return {
        "workers": workers,
        "prefill_pods": prefill,
        "requests": requests,
        "rate": rate,
        "prompt_tokens": list(prompt),
        "output_tokens": list(output),
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
        "kv_transfer_bytes_per_s": bandwidth,
        "capacity_blocks": capacity_blocks,
        "non_cached_tokens_threshold": threshold,
        "documents": documents,
        "document_tokens": document_tokens if documents else 0,
        "seed": seed,
        "rows": rows,
    }


def _ratio(value: float, base: float) -> float | None:
    """``value / base``; None where that says nothing (a percentile reaching a refused request
    is infinite, and so is every ratio against it)."""
    if not base or not math.isfinite(base):
        return None
    return value / base


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's p50/p99 over the first row's (the aggregated pool's)."""
    base = rows[0]
    for row in rows:
        row["vs_aggregated"] = {
            f"{metric}_{q}": _ratio(row[f"{metric}_ms"][q], base[f"{metric}_ms"][q])
            for metric in ("ttft", "tpot")
            for q in ("p50", "p99")
        }


def ahead_on_both(row: dict[str, Any], base: dict[str, Any]) -> bool:
    """A disaggregated row with TTFT p99 and TPOT p99 under the aggregated pool's, neither
    pool having refused anything."""
    ratio = row["vs_aggregated"]
    ttft, tpot = ratio["ttft_p99"], ratio["tpot_p99"]
    return (
        row["prefill_pods"] > 0
        and row["failed"] == base["failed"] == 0
        and ttft is not None
        and tpot is not None
        and ttft < 1.0
        and tpot < 1.0
    )


def _times(ratio: float | None) -> str:
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}"


# The sweep: output lengths; arrival rates from light to where the pools saturate (a 5,500
# token prefill is ~207 ms of one pod, so 16/s keeps 3.3 pods prefilling: more than 2 or 3
# prefill pods have, a third of the aggregated pool; 24/s is 5 pods' worth, and at 16/s
# with 1,000-2,000 token outputs each aggregated pod holds ~60 requests of ~7k tokens, its
# whole 432k-token cache); prefill:decode splits; and llm-d's selective disaggregation
# (prompts with fewer uncached tokens than the threshold skip the prefill pod).
SWEEP_OUTPUTS: tuple[tuple[int, int], ...] = ((300, 800), (1000, 2000))
SWEEP_RATES: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0)
SWEEP_PREFILL_PODS: tuple[int, ...] = (2, 3, 4)
SWEEP_THRESHOLDS: tuple[int, ...] = (0, 5000)


def sweep(
    *,
    workers: int = 8,
    duration_s: float = 60.0,
    prompt: tuple[int, int] = (3000, 8000),
    outputs: Sequence[tuple[int, int]] = SWEEP_OUTPUTS,
    rates: Sequence[float] = SWEEP_RATES,
    prefill_pods: Sequence[int] = SWEEP_PREFILL_PODS,
    thresholds: Sequence[int] = SWEEP_THRESHOLDS,
    bandwidth: float = KV_TRANSFER_BYTES_PER_S,
    seed: int = 0,
    capacity_blocks: int = CAPACITY_BLOCKS,
) -> dict[str, Any]:
    """Every (outputs, rate): the aggregated pool, then each split and threshold, on one workload
    of ``duration_s`` of arrivals (``rate * duration_s`` requests): a fixed count would end the
    arrivals at 24/s before the first 1,500-token output finishes, short of a steady state."""
    groups = []
    for output in outputs:
        for rate in rates:
            requests = max(round(rate * duration_s), 1)
            workload = long_requests(seed=seed, requests=requests, rate=rate, prompt=prompt, output=output)
            common = {
                "workers": workers,
                "bandwidth": bandwidth,
                "seed": seed,
                "capacity_blocks": capacity_blocks,
            }
            rows = [run_shape("aggregated", workload, prefill=0, **common)]  # type: ignore[arg-type]
            for prefill in prefill_pods:
                for threshold in thresholds:
                    row = run_shape("disaggregated", workload, prefill=prefill, threshold=threshold, **common)  # type: ignore[arg-type]
                    row["non_cached_tokens_threshold"] = threshold
                    rows.append(row)
            add_ratios(rows)
            groups.append({"rate": rate, "requests": requests, "output_tokens": list(output), "rows": rows})
    return {
        "workers": workers,
        "duration_s": duration_s,
        "prompt_tokens": list(prompt),
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
        "kv_transfer_bytes_per_s": bandwidth,
        "capacity_blocks": capacity_blocks,
        "seed": seed,
        "groups": groups,
    }


def sweep_table(report: dict[str, Any]) -> str:
    """One line per (outputs, rate, shape); both ratios under 1 marked ``both``."""
    lines = [
        f"{report['duration_s']:g} s of arrivals at each rate, prompts {report['prompt_tokens']} tokens; "
        f"{report['workers']} pods of {report['capacity_blocks']} KV blocks; "
        f"KV at {report['kv_transfer_bytes_per_s'] / 1e9:g} GB/s",
        f"{'outputs':>10} {'rate':>5} {'pods':<10} {'threshold':>9} {'TTFT p50':>9} {'p99':>8} "
        f"{'TPOT p50':>9} {'p99':>7} {'TTFT p99 x':>11} {'TPOT p99 x':>11} {'failed':>7} {'ahead':>6}",
    ]
    for group in report["groups"]:
        out = "-".join(str(n) for n in group["output_tokens"])
        for row in group["rows"]:
            ttft, tpot, ratio = row["ttft_ms"], row["tpot_ms"], row["vs_aggregated"]
            pods = (
                f"{row['prefill_pods']}P+{row['decode_pods']}D"
                if row["prefill_pods"]
                else f"agg {row['decode_pods']}"
            )
            threshold = row.get("non_cached_tokens_threshold")
            ahead = "both" if ahead_on_both(row, group["rows"][0]) else ""
            lines.append(
                f"{out:>10} {group['rate']:>5g} {pods:<10} {'-' if threshold is None else threshold:>9} "
                f"{ttft['p50']:>9.1f} {ttft['p99']:>8.1f} {tpot['p50']:>9.2f} {tpot['p99']:>7.2f} "
                f"{_times(ratio['ttft_p99']):>11} {_times(ratio['tpot_p99']):>11} "
                f"{row['failed']:>7} {ahead:>6}"
            )
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    prompts = (
        f"prompts one of {report['documents']} shared documents of {report['document_tokens']} tokens "
        f"+ {report['prompt_tokens']} tokens"
        if report.get("documents")
        else f"prompts {report['prompt_tokens']} tokens"
    )
    lines = [
        f"{report['requests']} requests at {report['rate']:g}/s, {prompts}, "
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
            f"{_times(ratio['ttft_p99']):>11} {_times(ratio['tpot_p99']):>11} {row['failed']:>7}"
        )
    return "\n".join(lines)
