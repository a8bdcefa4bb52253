"""The virtual pool's prefill/decode disaggregation: the prompt on the prefill pod, its KV
across at the stated bandwidth, the output on the decode pod; and ``kvsched bench pd``."""

from __future__ import annotations

import math
from typing import Any

import pytest

from scheduler.bench.pd_bench import (
    add_ratios,
    ahead_on_both,
    document_requests,
    long_requests,
    run,
    sweep,
    sweep_table,
    table,
)
from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring.disaggregation import DisaggregationConfig
from scheduler.sim.virtual import KV_BYTES_PER_TOKEN, VirtualPool, VirtualPoolConfig

PROMPT = 4000


def _one(prefill_workers: int, bandwidth: float = 25e9) -> tuple[VirtualPool, float, str]:
    config = SchedulerConfig(disaggregation=DisaggregationConfig(enabled=prefill_workers > 0))
    pool = VirtualPool(
        VirtualPoolConfig(
            workers=2,
            capacity_blocks=4096,
            prefill_workers=prefill_workers,
            kv_transfer_bytes_per_s=bandwidth,
        ),
        config,
    )
    (request,) = long_requests(seed=1, requests=1, rate=1.0, prompt=(PROMPT, PROMPT), output=(20, 20))
    (outcome,) = pool.run([request])
    assert outcome.ok and outcome.ttft_s is not None and outcome.completion_tokens == 20
    return pool, outcome.ttft_s, outcome.endpoint or ""


def test_the_prefill_pod_computes_the_prompt_and_the_decode_pod_the_output() -> None:
    pool, ttft, endpoint = _one(prefill_workers=1)
    prefill, decode = pool.workers
    assert endpoint == decode.name
    # The prefill pod holds the prompt's blocks (it computed one token more); the decode pod
    # received them and holds the output's full blocks too (4000 + 20 tokens: one more).
    blocks = PROMPT // 16
    assert pool.scheduler.index.worker_blocks(prefill.name) == blocks
    assert pool.scheduler.index.worker_blocks(decode.name) == blocks + 1
    _, aggregated_ttft, _ = _one(prefill_workers=0)
    transfer = PROMPT * KV_BYTES_PER_TOKEN / 25e9
    assert aggregated_ttft + transfer < ttft < aggregated_ttft + transfer + 0.02
    # Half the bandwidth, twice the transfer.
    _, slower, _ = _one(prefill_workers=1, bandwidth=12.5e9)
    assert slower - ttft == pytest.approx(transfer, rel=0.01)


def test_bench_pd_reports_both_shapes_on_one_workload() -> None:
    report = run(requests=30, rate=4.0, workers=4, prefill=1, prompt=(1000, 2000), output=(50, 100))
    aggregated, disaggregated = report["rows"]
    assert (aggregated["prefill_pods"], disaggregated["prefill_pods"]) == (0, 1)
    assert aggregated["failed"] == disaggregated["failed"] == 0
    assert aggregated["vs_aggregated"]["ttft_p99"] == 1.0
    assert disaggregated["ttft_ms"]["p50"] != aggregated["ttft_ms"]["p50"]
    assert "disaggregated (1P+3D)" in table(report)


def test_bench_pd_with_shared_documents_shares_their_prefill() -> None:
    requests = document_requests(
        seed=2, requests=40, rate=4.0, documents=3, document_tokens=512, suffix=(64, 128), output=(8, 16)
    )
    heads = {tuple(r.prompt_token_ids[:512]) for r in requests}
    assert len(heads) <= 3 and all(64 <= len(r.prompt_token_ids) - 512 <= 128 for r in requests)
    report = run(
        requests=40,
        rate=4.0,
        workers=4,
        prefill=1,
        prompt=(64, 128),
        output=(8, 16),
        documents=3,
        document_tokens=512,
    )
    assert report["documents"] == 3 and "3 shared documents of 512 tokens" in table(report)
    assert all(row["failed"] == 0 and row["ttft_ms"]["p50"] > 0 for row in report["rows"])


def test_bench_pd_sweep_prints_one_table_over_outputs_rates_splits_and_thresholds() -> None:
    report = sweep(
        duration_s=6.0,
        workers=4,
        prompt=(1000, 2000),
        outputs=((20, 40), (60, 80)),
        rates=(4.0,),
        prefill_pods=(1, 2),
        thresholds=(0, 1500),
    )
    groups = report["groups"]
    assert [(g["output_tokens"], g["requests"]) for g in groups] == [([20, 40], 24), ([60, 80], 24)]
    for group in groups:
        rows = group["rows"]
        assert [(r["prefill_pods"], r.get("non_cached_tokens_threshold")) for r in rows] == [
            (0, None),
            (1, 0),
            (1, 1500),
            (2, 0),
            (2, 1500),
        ]
        assert rows[0]["vs_aggregated"]["ttft_p99"] == 1.0
        assert all(r["failed"] == 0 for r in rows)
        # About half the prompts are under 1,500 tokens and skip the prefill pod: their TTFT
        # has no transfer and no second pod, so the threshold moves the median.
        assert rows[1]["ttft_ms"]["p50"] != rows[2]["ttft_ms"]["p50"]
    text = sweep_table(report)
    assert text.count("\n") == 2 + 2 * 5 - 1
    assert "1P+3D" in text and "agg 4" in text


def test_a_pool_that_refused_requests_is_never_counted_ahead_or_a_baseline() -> None:
    def row(prefill: int, ttft_p99: float, tpot_p99: float, failed: int = 0) -> dict[str, Any]:
        return {
            "prefill_pods": prefill,
            "decode_pods": 8 - prefill,
            "failed": failed,
            "ttft_ms": {"p50": 1.0, "p99": ttft_p99},
            "tpot_ms": {"p50": 1.0, "p99": tpot_p99},
        }

    rows = [row(0, 300.0, 20.0), row(3, 290.0, 10.0), row(3, 200.0, 21.0), row(3, 100.0, 5.0, failed=1)]
    add_ratios(rows)
    assert [ahead_on_both(r, rows[0]) for r in rows] == [False, True, False, False]
    refused = [row(0, math.inf, 20.0, failed=9), row(3, 290.0, 10.0)]
    add_ratios(refused)
    assert refused[1]["vs_aggregated"]["ttft_p99"] is None
    assert not ahead_on_both(refused[1], refused[0])
