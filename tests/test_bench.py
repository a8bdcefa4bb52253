"""The benchmarks run end to end at a small size and report what the README promises."""

from __future__ import annotations

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
