"""``kvsched bench policies`` at its tiny size: the table's shape, the goals, and decisions
that repeat for a seed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from scheduler.bench.policies import (
    POLICIES,
    policy_table,
    pool_seeds,
    run_task,
    run_tasks,
    summarise,
    summary_table,
    tasks_for,
    ttft_percentiles_ms,
)
from scheduler.bench.policies_suite import LOAD_LEVELS, TINY, build_workload, offered_utilisation
from scheduler.workloads.model import RequestOutcome
from scheduler.workloads.mooncake import load_mooncake

DETERMINISTIC = ["kvsched", "dynamo", "llmd", "vllm_router_kv_aware"]


def test_a_trace_reaches_its_load_level_exactly_and_a_generated_workload_nearly(shared_dir: Path) -> None:
    data = shared_dir / "data" / "mooncake"
    for spec_name, tolerance in (("synthetic", 1e-9), ("rag", 0.2)):
        spec = next(t.workload for t in tasks_for(workloads=[spec_name], size="tiny", data_dir=data))
        for level in LOAD_LEVELS:
            workload = build_workload(spec, level, TINY, 0, data)
            utilisation = offered_utilisation(workload, TINY.workers)
            assert utilisation == pytest.approx(level.utilisation, rel=tolerance)


def test_the_conversation_rows_spread_the_traces_arrival_steps_by_seed(shared_dir: Path) -> None:
    """The conversation trace records arrivals in 3,000 ms steps: replayed as recorded, a step's
    requests arrive at one instant. Its rows spread each step's requests over the step, in
    recorded order, the same for a seed and not for another; the synthetic trace, recorded to
    the millisecond, keeps its times."""
    data = shared_dir / "data" / "mooncake"
    spec = next(t.workload for t in tasks_for(workloads=["conversation"], size="tiny", data_dir=data))
    level = LOAD_LEVELS[0]
    spread = build_workload(spec, level, TINY, 0, data)
    recorded = load_mooncake(data / spec.source, block_tokens=16, limit=TINY.trace_limit)
    assert len({r.arrival_s for r in recorded.requests}) < len(recorded.requests) / 2
    assert len({r.arrival_s for r in spread.requests}) == len(spread.requests)
    order = {r.request_id: i for i, r in enumerate(recorded.requests)}
    positions = [order[r.request_id] for r in spread.requests]
    assert positions == sorted(positions)
    assert [r.arrival_s for r in build_workload(spec, level, TINY, 0, data).requests] == [
        r.arrival_s for r in spread.requests
    ]
    assert [r.arrival_s for r in build_workload(spec, level, TINY, 1, data).requests] != [
        r.arrival_s for r in spread.requests
    ]
    synthetic = next(t.workload for t in tasks_for(workloads=["synthetic"], size="tiny", data_dir=data))
    assert synthetic.arrival_step_ms is None
    # The report says which rows were spread.
    [row] = summarise(
        [
            run_task(t)
            for t in tasks_for(
                workloads=["conversation"],
                levels=["moderate"],
                policies=["round_robin"],
                size="tiny",
                data_dir=data,
            )
        ]
    )
    assert row["arrival_step_ms"] == 3000.0
    assert "the trace's 3,000 ms arrival steps spread" in policy_table(row)


def test_tiny_run_fills_the_table_and_repeats_its_decisions_for_a_seed(shared_dir: Path) -> None:
    data = shared_dir / "data" / "mooncake"
    tasks = tasks_for(
        workloads=["synthetic", "rag"], policies=[*DETERMINISTIC, "round_robin"], size="tiny", data_dir=data
    )
    first = run_tasks(tasks, jobs=1)
    again = run_tasks(
        tasks_for(workloads=["synthetic", "rag"], policies=DETERMINISTIC, size="tiny", data_dir=data)
    )
    digests = {(r["workload"], r["level"], r["policy"]): r["decisions"] for r in first}
    assert {
        (r["workload"], r["level"], r["policy"]): r["decisions"] for r in again
    }.items() <= digests.items()
    rows = summarise(first)
    assert [(row["workload"], row["level"]) for row in rows] == [
        (w, level.name) for w in ("synthetic", "rag") for level in LOAD_LEVELS
    ]
    for row in rows:
        assert list(row["policies"]) == [*DETERMINISTIC, "round_robin"]
        assert set(row["goals"]) == {"p50_le_best", "p99_le_0.9_best", "hit_ge_0.97_ceiling", "mape_le_0.15"}
        assert row["best_p50"] in row["policies"] and row["best_p50"] != "kvsched"
        assert 0.0 < row["capacity_ceiling_hit_ratio"] <= 1.0
        table = policy_table(row).splitlines()
        assert len(table) == 4 + len(row["policies"]) and table[2].count("|") == 11
        kvsched = row["policies"]["kvsched"]
        mape = kvsched["ttft_mape"]
        assert set(mape) == {
            "all",
            "scored",
            "idle",
            "loaded",
            "saturated",
            "counts",
            "from_arrival",
            "scope",
            "answered_by",
        }
        assert mape["scope"] in ("model", "all") and set(mape["answered_by"]) <= {"model", "prior"}
        assert sum(mape["answered_by"].values()) == kvsched["completed"]
        assert kvsched["predictor"]["ttft_source"] in ("model", "prior")
    summary = summary_table(rows).splitlines()
    assert len(summary) == 2 + len(rows)


def test_seeds_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        tasks_for(workloads=["chat"], size="tiny", seeds=0)


def test_unknown_names_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown workload, load level or policy: nope"):
        tasks_for(policies=["nope"])
    assert len(tasks_for(workloads=["chat"], size="tiny")) == len(LOAD_LEVELS) * len(POLICIES)


def test_a_failed_request_counts_as_never_served_in_the_percentiles() -> None:
    served = [RequestOutcome(f"r{i}", ok=True, start_s=0.0, first_token_s=(i + 1) / 1000) for i in range(98)]
    failed = [RequestOutcome(f"f{i}", ok=False, start_s=0.0, error="http 503") for i in range(2)]
    everyone = ttft_percentiles_ms(served + failed)
    assert everyone["p50"] == pytest.approx(50.5) and math.isinf(everyone["p99"])
    assert ttft_percentiles_ms(served)["p99"] == pytest.approx(97.03)


def test_the_latency_model_retrains_on_the_predictors_own_cadence_not_the_pools_floor(
    shared_dir: Path,
) -> None:
    """A row of 10 s of arrivals: the predictor retrains every 2,000 samples (and when they
    double), not once in 120 virtual seconds beyond the doublings."""
    data = shared_dir / "data" / "mooncake"
    (task,) = tasks_for(
        workloads=["chat"], levels=["moderate"], policies=["kvsched"], size="short", data_dir=data
    )
    result = run_task(task)
    # 4,730 requests: doublings at 200, 400, 800, 1,600, 3,200 observations (5 fits), and
    # every 2,000 new ones on top.
    assert result["requests"] > 4000 and result["predictor"]["trainings"] >= 6


def test_seeds_pool_every_request_of_each_seeds_run(shared_dir: Path) -> None:
    data = shared_dir / "data" / "mooncake"
    tasks = tasks_for(
        workloads=["rag"],
        levels=["saturated"],
        policies=["kvsched", "round_robin"],
        size="tiny",
        data_dir=data,
        seed=4,
        seeds=2,
    )
    assert [(t.seed, t.policy) for t in tasks] == [
        (4, "kvsched"),
        (4, "round_robin"),
        (5, "kvsched"),
        (5, "round_robin"),
    ]
    results = run_tasks(tasks, jobs=1)
    pooled = {result["policy"]: result for result in pool_seeds(results)}
    assert set(pooled) == {"kvsched", "round_robin"}
    for policy, merged in pooled.items():
        runs = [result for result in results if result["policy"] == policy]
        assert merged["seed"] == [4, 5] and merged["requests"] == sum(r["requests"] for r in runs)
        # The seeds' workloads differ, and every request of both is in the pooled figures.
        assert runs[0]["decisions"] != runs[1]["decisions"]
        every = sorted(v for r in runs for v in r["samples"]["ttft_ms"]) + [math.inf] * merged["failed"]
        position = 0.99 * (len(every) - 1)
        low, high = every[math.floor(position)], every[math.ceil(position)]
        assert merged["ttft_ms"]["p99"] == pytest.approx(
            low + (high - low) * (position - math.floor(position))
        )
        assert merged["hit_ratio"] == pytest.approx(
            sum(r["cached_tokens"] for r in runs) / sum(r["prompt_tokens"] for r in runs)
        )
        scored = [r["ttft_mape"]["scored"] for r in runs]
        if policy == "kvsched" and all(scored):
            assert merged["ttft_mape"]["all"] == pytest.approx(
                sum(r["ttft_mape"]["all"] * n for r, n in zip(runs, scored, strict=True)) / sum(scored)
            )
        assert [kept["decisions"] for kept in merged["per_seed"]] == [r["decisions"] for r in runs]
        assert merged["samples"] is None and all(kept["samples"] is None for kept in merged["per_seed"])
    (row,) = summarise(list(pooled.values()))
    assert row["goals"] and row["requests"] == pooled["kvsched"]["requests"]
    assert "seeds 4-5 pooled" in policy_table(row).splitlines()[0]
    # One seed alone is reported as run.
    (alone,) = pool_seeds(results[:1])
    assert alone["ttft_ms"] == results[0]["ttft_ms"] and alone["seed"] == 4
