"""``kvsched bench peers`` end to end at a tiny size, and the parts it is made of.

The run starts real processes: ``kvsched sim`` pools, ``kvsched serve`` with a real Envoy,
Envoy round-robin, and sglang-router / vllm-router when their wheels are installed
(``pip install 'kvsched[peers]'``); without them those two rows are skipped, and the report
says why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest

from scheduler.adapters.extproc.native import load_native
from scheduler.bench.peer_routers import ROUTERS
from scheduler.bench.peer_workloads import as_text, at_rate, floor, load_workload, offered_rate, rag_tenants
from scheduler.bench.peers import data_path_vs_floor, format_report, judge, run
from scheduler.replay.text import ClientTokenizer
from scheduler.sim.engine import EngineConfig
from scheduler.sim.tokenizer import MODEL_DIR, load
from scheduler.workloads.generators import rag
from scheduler.workloads.oracle import oracle_hit_ratio

PEER_MODULES = {"sglang": "sglang_router", "vllm": "vllm_router"}
PEER_DISTRIBUTIONS = {"sglang": "sglang-router", "vllm": "vllm-router"}


@pytest.fixture(scope="module")
def tokenizer() -> ClientTokenizer:
    return ClientTokenizer(MODEL_DIR)


def test_tiny_run_answers_every_request_and_counts_hits_at_the_workers() -> None:
    # Envoy's round-robin row is left out to keep this short (test_e2e_envoy runs that mode).
    routers = ["kvsched", "client-rr", *PEER_MODULES]
    report = run(
        workloads=["rag_tenants"],
        loads=[1.0],
        routers=routers,
        workers=2,
        capacity_blocks=512,
        requests=16,
        seed=1,
    )
    installed = {name for name, module in PEER_MODULES.items() if importlib.util.find_spec(module)}
    expected = {"kvsched", "client-rr"} | installed
    assert set(report["routers"]) == expected
    assert set(report["skipped"]) == set(PEER_MODULES) - installed
    (result,) = report["results"]
    assert set(result["rows"]) == expected
    for name, row in result["rows"].items():
        assert row["requests"] == row["ok"] == 16 and row["failed"] == 0, (name, row["failures"])
        # Every request's worker said how long it took itself; the path in front took the rest.
        assert row["worker_ttft_reported"] == 16
        assert row["data_path_ms"]["p50"] > 0 and row["ttft_ms"]["p50"] > row["data_path_ms"]["p50"]
        # The hit ratio is the workers' own counters: their queries are every prompt token
        # sent, their hits what the responses' usage reported as cached.
        assert row["prefix_cache_queries"] == sum(row_prompt_tokens(result, report))
        assert row["hit_ratio"] == row["prefix_cache_hits"] / row["prefix_cache_queries"]
        assert row["hit_ratio"] == pytest.approx(row["usage_hit_ratio"])
        assert sum(row["requests_per_worker"].values()) == 16 and len(row["requests_per_worker"]) == 2
        # Each response names its worker, so a tenant's requests can be traced to workers.
        assert 0.5 <= row["session_affinity"] <= 1.0
    # Routers that run processes of their own are charged their CPU; the client-side one none.
    assert set(result["rows"]["kvsched"]["cpu_s"]) == {"kvsched", "envoy"}
    assert result["rows"]["kvsched"]["router_cpu_s"] > 0
    assert result["rows"]["client-rr"]["cpu_s"] == {}
    kvsched_status = result["rows"]["kvsched"]["router_status"]
    assert kvsched_status["tokenizer"]["probe"]["status"] == "match"
    # Envoy's own counters: every request through the ext_proc exchange, none failed there.
    envoy = kvsched_status["envoy"]
    assert envoy["http.gw.downstream_rq_2xx"] == 16 and envoy.get("http.gw.downstream_rq_5xx", 0) == 0
    assert (
        envoy["http.gw.ext_proc.streams_started"] >= 16
        and envoy.get("http.gw.ext_proc.streams_failed", 0) == 0
    )
    # The floor has no queueing and an infinite cache: no router's workers do better.
    assert all(result["floor"]["hit_ratio"] >= row["hit_ratio"] - 1e-9 for row in result["rows"].values())
    assert result["goal"]["judged"] == bool(installed)
    table = format_report(report)
    assert all(f"| {name} | 16 / 0 |" in table for name in expected)


def row_prompt_tokens(result: dict[str, Any], report: dict[str, Any]) -> list[int]:
    workload = load_workload("rag_tenants", ClientTokenizer(MODEL_DIR), seed=report["seed"], requests=16)
    return [len(r.prompt_token_ids) for r in workload.requests]


@pytest.mark.skipif(load_native() is None, reason="the native ext_proc module is not built here")
def test_the_floor_row_runs_the_protocol_alone_behind_envoy_and_places_in_turn() -> None:
    """``envoy-floor``: Envoy with the protocol-only native ext_proc. Every request goes
    through the ext_proc exchange (Envoy's counters would not show it otherwise: a request
    the floor failed to answer is a 5xx) and the workers take turns, as behind Envoy alone."""
    report = run(
        workloads=["rag_tenants"],
        loads=[1.0],
        routers=["envoy-floor"],
        workers=2,
        capacity_blocks=512,
        requests=16,
        seed=1,
    )
    (result,) = report["results"]
    row = result["rows"]["envoy-floor"]
    assert row["requests"] == row["ok"] == 16 and row["failed"] == 0, row["failures"]
    assert sorted(row["requests_per_worker"].values()) == [8, 8]
    assert row["data_path_ms"]["p50"] > 0 and row["worker_ttft_reported"] == 16
    assert set(row["cpu_s"]) == {"extproc-floor", "envoy"} and row["cpu_s"]["extproc-floor"] > 0
    assert not ROUTERS["envoy-floor"].is_peer  # a floor: it sets no bar on the goal


def test_text_prompts_keep_the_id_prefixes_and_the_workers_count_them_alike(
    tokenizer: ClientTokenizer,
) -> None:
    base = rag(seed=2, requests=40, documents=4, document_tokens=256, preamble_tokens=64)
    text = as_text(base, tokenizer, tokenizer.single_token_words())
    worker = load(None)
    for before, after in zip(base.requests, text.requests, strict=True):
        assert after.prompt_text is not None
        # One word per id, after the BOS the worker adds: the same prefix structure.
        assert len(after.prompt_token_ids) == len(before.prompt_token_ids) + 1
        assert worker.completion_prompts(after.prompt_text) == [after.prompt_token_ids]
    assert oracle_hit_ratio(text.requests, 16) == pytest.approx(oracle_hit_ratio(base.requests, 16), abs=0.02)


def test_rag_tenants_is_one_poisson_stream_over_private_documents() -> None:
    workload = rag_tenants(seed=3, requests=400, rate=20.0, tenants=4, documents=3)
    assert len(workload.requests) == 400
    assert offered_rate(workload) == pytest.approx(20.0, rel=0.15)
    tenants = {r.session_id for r in workload.requests}
    assert len(tenants) == 4
    # Tenants share nothing: a request's first block identifies its tenant.
    first_blocks: dict[tuple[int, ...], set[str | None]] = {}
    for r in workload.requests:
        first_blocks.setdefault(tuple(r.prompt_token_ids[:16]), set()).add(r.session_id)
    assert all(len(owners) == 1 for owners in first_blocks.values()) and len(first_blocks) == 4
    assert at_rate(workload, 2.0).duration_s == pytest.approx(workload.duration_s / 2)


def test_floor_is_the_infinite_cache_without_queueing(tokenizer: ClientTokenizer) -> None:
    workload = load_workload("shared_prefix", tokenizer, requests=48)
    result = floor(workload, EngineConfig(capacity_blocks=64))
    assert result["requests"] == 48
    # Whole blocks of every earlier prompt hit, whatever the nominal capacity.
    assert result["hit_ratio"] == pytest.approx(oracle_hit_ratio(workload.requests, 16), abs=0.02)
    # Alone on an idle H100, an 865-token prompt prefills in tens of milliseconds.
    assert 1.0 < result["ttft_ms"]["p50"] < 100.0
    # On GPUs twice as slow (load 2), twice as long in real time.
    slower = floor(workload, EngineConfig(capacity_blocks=64), speed=0.5)
    assert slower["ttft_ms"]["p50"] == pytest.approx(2 * result["ttft_ms"]["p50"])


def _row(p50: float, p99: float, failed: int = 0) -> dict[str, Any]:
    return {"ttft_ms": {"p50": p50, "p99": p99}, "failed": failed}


def test_goal_compares_kvsched_with_the_best_peer_only() -> None:
    rows = {
        "kvsched": _row(20.0, 90.0),
        "sglang": _row(21.0, 100.0),
        "vllm": _row(30.0, 200.0),
        "client-rr": _row(5.0, 10.0),  # not a peer: the baselines do not set the bar
    }
    goal = judge(rows)
    assert goal["judged"] and goal["peers"] == ["sglang", "vllm"]
    assert goal["p50_met"] and goal["p99_met"] and goal["p99_vs_best_peer"] == pytest.approx(0.9)
    assert not judge({**rows, "kvsched": _row(20.0, 91.0)})["p99_met"]
    assert not judge({**rows, "sglang": _row(21.0, 100.0, failed=1)})["judged"]
    assert not judge({"kvsched": rows["kvsched"]})["judged"]
    assert {name for name, spec in ROUTERS.items() if spec.is_peer} == set(PEER_MODULES)


def test_kvsched_data_path_is_reported_against_the_floor_row() -> None:
    def path(p50: float, p99: float) -> dict[str, Any]:
        return {"data_path_ms": {"p50": p50, "p99": p99}}

    rows = {"kvsched": path(6.0, 30.0), "envoy-floor": path(4.0, 20.0), "sglang": path(2.0, 9.0)}
    assert data_path_vs_floor(rows) == {"p50": 1.5, "p99": 1.5}
    assert data_path_vs_floor({"kvsched": rows["kvsched"], "sglang": rows["sglang"]}) is None
    assert data_path_vs_floor({**rows, "envoy-floor": {"error": "did not start"}}) is None


@pytest.mark.parametrize("router", sorted(PEER_MODULES))
def test_peer_router_is_installed_at_the_pinned_version(router: str) -> None:
    # CI installs the `peers` extra (.ci/run), so there this runs; elsewhere it says why not.
    reason = ROUTERS[router].missing()
    if reason is not None:
        pytest.skip(f"bench peers runs without the {router} row here: {reason}")
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = dict(spec.split("==") for spec in pyproject["project"]["optional-dependencies"]["peers"])
    installed = importlib.metadata.version(PEER_DISTRIBUTIONS[router])
    # The README's figures and the router's description name this version.
    assert installed == pins[PEER_DISTRIBUTIONS[router]]
    assert f"{PEER_DISTRIBUTIONS[router]} {installed}" in ROUTERS[router].description
