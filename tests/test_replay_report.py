"""Replay report: arithmetic on hand-made per-request results, the comparison table, the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from scheduler.replay.plots import save_plots
from scheduler.replay.report import (
    COMPARISON_COLUMNS,
    RequestOutcome,
    build_report,
    comparison_columns,
    comparison_rows,
    comparison_table,
    latency_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outcomes() -> list[RequestOutcome]:
    return [
        RequestOutcome(
            "a",
            True,
            0.0,
            "w1",
            prompt_tokens=100,
            cached_tokens=50,
            completion_tokens=3,
            first_token_s=0.1,
            end_s=0.5,
        ),
        RequestOutcome(
            "b",
            True,
            1.0,
            "w2",
            prompt_tokens=100,
            cached_tokens=0,
            completion_tokens=5,
            first_token_s=1.3,
            end_s=2.0,
        ),
        # Failed requests: counted, explained, and kept out of every latency figure.
        RequestOutcome("c", False, 1.5, "w1", error="http 503: no endpoint", first_token_s=9.0, end_s=99.0),
        RequestOutcome("d", False, 1.6, None, error="TimeoutError: ", end_s=50.0),
    ]


def test_report_arithmetic() -> None:
    report = build_report(_outcomes(), policy="p", mode="live", workers=2, oracle_hit_ratio=0.4)
    assert (report["policy"], report["mode"], report["workers"]) == ("p", "live", 2)
    assert (report["requests"], report["completed"], report["failed"]) == (4, 2, 2)
    assert report["ttft_ms"] == pytest.approx({"p50": 200.0, "p90": 280.0, "p99": 298.0, "mean": 200.0})
    assert report["e2e_ms"]["p99"] == pytest.approx(500.0 + 0.99 * 500.0)
    # TPOT: (0.5 - 0.1) / 2 and (2.0 - 1.3) / 4.
    assert report["tpot_ms"]["p50"] == pytest.approx((200.0 + 175.0) / 2)
    assert report["hit_ratio"] == pytest.approx(0.25)
    assert report["oracle_hit_ratio"] == 0.4
    assert report["duration_s"] == pytest.approx(2.0)  # first start to the last completion
    assert report["throughput_rps"] == pytest.approx(1.0)
    assert report["output_tokens_per_s"] == pytest.approx(4.0)
    assert report["failures"] == {"http 503": 1, "TimeoutError": 1}
    assert report["per_endpoint"] == {"w1": 1, "w2": 1}
    assert report["samples"]["ttft_ms"] == [100.0, 300.0]
    json.dumps(report)  # the report is plain JSON


def test_percentiles_are_numpy_linear() -> None:
    summary = latency_summary([0.001, 0.002, 0.003, 0.004])
    assert summary == pytest.approx({"p50": 2.5, "p90": 3.7, "p99": 3.97, "mean": 2.5})
    assert latency_summary([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_missing_usage_gives_no_hit_ratio_and_partial_usage_counts_reporters_only() -> None:
    silent = RequestOutcome("a", True, 0.0, prompt_tokens=10, first_token_s=0.1, end_s=0.2)
    report = build_report([silent], policy="p", mode="live", workers=None, oracle_hit_ratio=None)
    assert report["hit_ratio"] is None and report["usage_reported"] == 0
    told = RequestOutcome("b", True, 0.0, prompt_tokens=40, cached_tokens=30, first_token_s=0.1, end_s=0.2)
    report = build_report([silent, told], policy="p", mode="live", workers=None, oracle_hit_ratio=None)
    assert report["hit_ratio"] == pytest.approx(0.75)


def test_all_failed_and_empty_runs() -> None:
    failed = RequestOutcome("a", False, 0.0, error="http 500: boom", end_s=1.0)
    report = build_report([failed], policy="p", mode="simulate", workers=1, oracle_hit_ratio=None)
    assert (report["completed"], report["failed"], report["throughput_rps"]) == (0, 1, 0.0)
    assert report["ttft_ms"]["p50"] is None and report["hit_ratio"] is None
    empty = build_report([], policy="p", mode="simulate", workers=1, oracle_hit_ratio=None)
    assert (empty["requests"], empty["duration_s"]) == (0, 0.0)


def test_token_scale_and_extra_keys() -> None:
    outcome = RequestOutcome("a", True, 0.0, completion_tokens=11, first_token_s=1.0, end_s=2.0)
    report = build_report(
        [outcome],
        policy="p",
        mode="simulate",
        workers=1,
        oracle_hit_ratio=None,
        token_scale=32,
        extra={"slo_attainment": 0.9},
    )
    assert report["tpot_ms"]["p50"] == pytest.approx(100.0 / 32)  # per real output token
    assert report["output_tokens_per_s"] == pytest.approx(11 * 32 / 2.0)
    assert report["slo_attainment"] == 0.9


def test_outcome_as_dict_carries_derived_latencies() -> None:
    outcome = RequestOutcome("a", True, 1.0, completion_tokens=3, first_token_s=1.5, end_s=2.5)
    row = outcome.as_dict()
    assert row["ttft_s"] == pytest.approx(0.5) and row["tpot_s"] == pytest.approx(0.5)
    assert row["e2e_s"] == pytest.approx(1.5) and row["request_id"] == "a"


def _two_reports() -> dict[str, dict[str, object]]:
    kv = build_report(_outcomes(), policy="kvsched", mode="simulate", workers=2, oracle_hit_ratio=0.4)
    rr = build_report(_outcomes()[1:], policy="round_robin", mode="simulate", workers=2, oracle_hit_ratio=0.4)
    return {"kvsched": kv, "round_robin": rr}


def test_comparison_table_rows() -> None:
    reports = _two_reports()
    rows = comparison_rows(reports)
    assert [len(r) for r in rows] == [len(COMPARISON_COLUMNS)] * 2
    assert rows[0] == ("kvsched", "2", "2", "200", "298", "187.5", "0.250", "0.400", "1.00")
    assert rows[1][0] == "round_robin" and rows[1][6] == "0.000"
    # A list of reports is labelled by policy, the same as a mapping.
    assert comparison_rows(list(reports.values())) == rows
    console = Console(width=160, record=True)
    console.print(comparison_table(reports, title="t"))
    text = console.export_text()
    assert "TTFT p50 ms" in text and "round_robin" in text and "0.250" in text


def test_plots_are_pngs(tmp_path: Path) -> None:
    paths = save_plots(_two_reports(), tmp_path / "plots", title="two policies")
    assert [p.name for p in paths] == ["replay.png"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    # Explicit samples, a report without usage, and no TTFTs at all still draw.
    silent = build_report([], policy="silent", mode="live", workers=None, oracle_hit_ratio=None)
    (other,) = save_plots([silent], tmp_path / "other", ttft_ms={"silent": []})
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_slo_attainment_and_goodput() -> None:
    outcomes = _outcomes()
    for outcome in outcomes:
        outcome.slo_ttft_ms = 200.0
        outcome.slo_tpot_ms = 150.0
    # a: TTFT 100 ms, TPOT 200 ms (misses TPOT); b: TTFT 300 ms (misses TTFT).
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["slo_attainment"] == 0.0 and report["goodput_rps"] == 0.0
    outcomes[0].slo_tpot_ms = 250.0
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["slo_attainment"] == pytest.approx(1 / 2)  # of the completed
    assert report["slo_attainment_all"] == pytest.approx(1 / 4)  # of everything sent
    assert report["goodput_rps"] == pytest.approx(1 / 2.0)  # one request in a 2 s makespan
    assert report["slo"] == {"ttft_ms": [200.0], "tpot_ms": [150.0, 250.0], "requests": 4}
    # A scaled trace's TPOT is judged in real tokens: 200 ms per workload token is 100 ms real.
    assert outcomes[0].meets_slo(token_scale=2.0) and not outcomes[1].meets_slo(token_scale=2.0)


def test_reports_without_objectives_or_predictions_have_no_such_keys() -> None:
    report = build_report(_outcomes(), policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert not {"slo_attainment", "goodput_rps", "ttft_mape", "tpot_mape"} & set(report)


def test_mape_scores_the_trained_models_predictions_only() -> None:
    outcomes = _outcomes()
    a, b = outcomes[0], outcomes[1]
    a.predicted_ttft_ms, a.predicted_tpot_ms, a.prediction_source = 110.0, 180.0, "model"  # 10%, 10%
    b.predicted_ttft_ms, b.predicted_tpot_ms, b.prediction_source = 30.0, 0.0, "prior"  # not scored
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["ttft_mape"] == pytest.approx(0.10) and report["tpot_mape"] == pytest.approx(0.10)
    assert report["predictions"] == {"model": 1, "prior": 1} and report["mape_scope"] == "model"
    a.prediction_source = "prior"
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    # No model prediction at all: every prediction is scored (TTFT of b: |30 - 300| / 300).
    assert report["mape_scope"] == "all"
    assert report["ttft_mape"] == pytest.approx((0.10 + 0.9) / 2)


def test_a_ttft_the_trees_answered_is_scored_when_the_prior_answered_the_tpot() -> None:
    outcomes = _outcomes()
    a, b = outcomes[0], outcomes[1]
    a.predicted_ttft_ms, a.predicted_tpot_ms, a.prediction_source = 110.0, 180.0, "model"  # 10%
    # The trees answered b's TTFT and the prior its TPOT: the pick's source is "mixed".
    b.predicted_ttft_ms, b.predicted_tpot_ms, b.prediction_source = 240.0, 0.0, "mixed"  # 20%
    b.predicted_ttft_source = "model"
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["ttft_mape"] == pytest.approx((0.10 + 0.20) / 2) and report["mape_scope"] == "model"
    assert report["tpot_mape"] == pytest.approx(0.10)  # b's TPOT came from the prior
    b.predicted_ttft_source = "prior"
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["ttft_mape"] == pytest.approx(0.10)


def test_ttft_predictions_are_scored_from_the_routing_decision_not_the_arrival() -> None:
    outcomes = _outcomes()
    b = outcomes[1]  # arrived at 1.0 s, first token at 1.3 s
    b.predicted_ttft_ms, b.prediction_source = 100.0, "model"
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["ttft_mape"] == pytest.approx(200.0 / 300.0)
    # It waited 0.2 s in flow control's waiting room and was routed at 1.2 s: 100 ms to its
    # first token from there, which is what the endpoint's prediction was of.
    b.routed_s = 1.2
    report = build_report(outcomes, policy="p", mode="simulate", workers=2, oracle_hit_ratio=None)
    assert report["ttft_mape"] == pytest.approx(0.0, abs=1e-9)
    assert report["ttft_ms"]["p50"] == pytest.approx(200.0)  # the latencies users see keep the wait


def test_comparison_table_gains_slo_and_mape_columns_when_reports_have_them() -> None:
    reports = _two_reports()
    assert comparison_columns(reports) == COMPARISON_COLUMNS
    reports["kvsched"] = {
        **reports["kvsched"],
        "slo_attainment": 0.875,
        "goodput_rps": 1.5,
        "ttft_mape": 0.08,
    }
    columns = comparison_columns(reports)
    assert columns[-3:] == ("SLO met", "goodput/s", "TTFT MAPE")
    rows = comparison_rows(reports)
    assert rows[0][-3:] == ("87.5%", "1.50", "8.0%") and rows[1][-3:] == ("-", "-", "-")
