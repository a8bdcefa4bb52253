"""``kvsched tune``: the trace (Mooncake or kvsched's own audit log), the time split, the search
space read from the scorer registry, the policy it writes (valid against the chart's CRD and
read back by kvsched's own SchedulingPolicy conversion), and a whole run on a small trace in
the virtual-time simulator with Optuna's seeded TPE sampler.

The audit log is written by a real ExtProcServer answering kvsched.v1 Pick/Report over gRPC,
through the ``kvsched.audit`` logger with the command line's log format.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import optuna
import pytest
import yaml
from test_crd_schema import apply_defaults, openapi_schema, policy_validator, to_json_schema

from scheduler.adapters.extproc import ExtProcConfig, ExtProcServer, TLSSettings
from scheduler.adapters.extproc.picker_api import load_picker_protos
from scheduler.adapters.kubernetes.policy import PolicySettings
from scheduler.cli import main
from scheduler.core.scheduler import Endpoint, Scheduler, SchedulerConfig
from scheduler.core.scoring.registry import SCORERS, register_scorer
from scheduler.core.scoring.scorers import QueueDepthScorer
from scheduler.tune.evaluate import latency_with_failures
from scheduler.tune.objectives import OBJECTIVES
from scheduler.tune.policy import applied, manifest
from scheduler.tune.space import apply_params, knobs, params_of, policy_spec, searched, suggest
from scheduler.tune.trace import load_trace, split_by_time, trace_kind
from scheduler.workloads.model import RequestOutcome

DEADLINE_S = 10.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # scheduler/cli.py's


def write_trace(path: Path, requests: int = 240, seed: int = 3) -> Path:
    """A Mooncake trace: conversations re-sending their growing history, over 4 minutes."""
    rng = random.Random(seed)
    rows = []
    histories: dict[int, list[int]] = {}
    next_id = 1
    for i in range(requests):
        session = rng.randrange(24)
        history = histories.setdefault(session, [0])
        history += list(range(next_id, next_id + rng.randint(1, 3)))
        next_id += 4
        rows.append(
            {
                "timestamp": i * 1000,
                "input_length": 512 * len(history) - rng.randrange(300),
                "output_length": rng.randint(20, 200),
                "hash_ids": list(history),
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- the audit log as a trace ------------------------------------------------------------------


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("kvsched.audit")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(level)
    handler.close()


async def test_an_audit_log_replays_as_a_trace_with_its_prefixes(audit_file: Path) -> None:
    protos = load_picker_protos()
    if protos is None:
        pytest.skip("scheduler._proto not generated: run python setup.py build_ext --inplace")
    picker_pb2, picker_pb2_grpc = protos
    scheduler = Scheduler(SchedulerConfig())
    scheduler.set_endpoints([Endpoint(name="10.0.0.1:8000", address="10.0.0.1:8000")], now=0.0)
    server = ExtProcServer(
        scheduler,
        host="127.0.0.1",
        port=0,
        health_port=None,
        tls=TLSSettings.plaintext(),
        config=ExtProcConfig(),
    )
    shared = list(range(100, 1124))  # two whole 512-token blocks
    prompts = {
        "a": shared + list(range(5000, 5300)),
        "b": shared + list(range(6000, 6100)),
        "c": list(range(7000, 8200)),
    }
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = picker_pb2_grpc.EndpointPickerStub(channel)
            for request_id, ids in prompts.items():
                reply = await stub.Pick(
                    picker_pb2.PickRequest(request_id=request_id, token_ids=picker_pb2.TokenIds(ids=ids)),
                    timeout=DEADLINE_S,
                )
                assert reply.status == picker_pb2.PickResponse.OK
                ack = await stub.Report(
                    picker_pb2.Completion(
                        request_id=request_id, ttft_ms=30.0, e2e_ms=250.0, completion_tokens=64
                    ),
                    timeout=DEADLINE_S,
                )
                assert ack.known
    finally:
        await server.stop(0)
    lines = [line for line in audit_file.read_text().splitlines() if line]
    assert len(lines) == 3 and " INFO kvsched.audit: {" in lines[0]
    assert trace_kind(audit_file) == "audit"
    workload = load_trace(audit_file, block_tokens=16)
    assert workload.meta["kind"] == "audit" and workload.token_scale == 32
    by_length = {len(r.prompt_token_ids): r for r in workload.requests}
    # 1,324 / 1,124 / 1,200 tokens: two full blocks and a partial one of 300 / 100 / 176 tokens,
    # scaled to 16 tokens a block: 32 + ceil(300/32), 32 + ceil(100/32), 32 + ceil(176/32).
    assert sorted(by_length) == [36, 38, 42]
    a, b, c = by_length[42], by_length[36], by_length[38]
    assert a.block_ids is not None and b.block_ids is not None and c.block_ids is not None
    assert a.block_ids[:2] == b.block_ids[:2] and a.block_ids[2] != b.block_ids[2]
    assert not set(c.block_ids) & set(a.block_ids)
    assert a.prompt_token_ids[:32] == b.prompt_token_ids[:32] != c.prompt_token_ids[:32]
    assert all(r.max_tokens == 2 for r in workload.requests)  # 64 real tokens at 1/32 scale
    # Arrivals are the logged times less e2e: the same order the picks were made in.
    assert [r.arrival_s for r in workload.requests] == sorted(r.arrival_s for r in workload.requests)


def test_audit_lines_without_prompt_blocks_replay_unshared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.log"
    record = {"request_id": "x", "decision": "routed", "prompt_tokens": 1000, "completion_tokens": 10}
    path.write_text(
        f"2026-01-01 10:00:00,000 INFO kvsched.audit: {json.dumps(record)}\n"
        f"2026-01-01 10:00:01,500 INFO kvsched.audit: {json.dumps({**record, 'e2e_ms': 500})}\n"
        "2026-01-01 10:00:02,000 INFO scheduler.server.app: something else\n"
    )
    with caplog.at_level(logging.WARNING):
        workload = load_trace(path)
    first, second = workload.requests
    assert second.arrival_s - first.arrival_s == pytest.approx(1.0)
    assert first.block_ids is not None and second.block_ids is not None
    assert not set(first.block_ids) & set(second.block_ids)
    assert "carry no prompt_blocks" in caplog.text


# --- split, space, policy ----------------------------------------------------------------------


def test_the_split_is_by_time(tmp_path: Path) -> None:
    workload = load_trace(write_trace(tmp_path / "t.jsonl", requests=101))
    split = split_by_time(workload, holdout=0.3, tune_s=30.0, warmup_s=10.0)
    assert (split.tune.start_s, split.tune.end_s) == (0.0, 30.0)
    assert split.holdout.start_s == pytest.approx(70.0) and split.holdout.warmup_s == 10.0
    held = [r for r in workload.requests if split.holdout.scored(r)]
    assert len(held) == 31 and held[-1].arrival_s == 100.0  # the last request is held out too
    assert len(split.holdout.replayed(workload.requests)) == 41
    whole = split_by_time(workload, holdout=0.3, tune_s=None, warmup_s=0.0)
    assert whole.tune.end_s == pytest.approx(70.0)


def test_the_search_space_follows_the_scorer_registry() -> None:
    register_scorer("tune_probe", QueueDepthScorer, weight=0.0, description="A scorer added later.")
    try:
        space = knobs()
        names = [k.param for k in space]
        assert {f"weight.{name}" for name in SCORERS.names()} <= set(names)
        assert "weight.tune_probe" in names
        trial = optuna.trial.FixedTrial(
            {
                **{f"weight.{name}": 1.0 for name in SCORERS.names()},
                "weight.tune_probe": 2.5,
                "picker.mode": "softmax",
                "picker.temperature": 0.2,
                "picker.tie_epsilon": 0.05,
                "picker.own_prefill_weight": 1.5,
                "picker.balance.abs_requests": 0,
                "picker.balance.rel": 2.0,
                "picker.hot_prefix.share": 2.0,
                "limits.max_waiting": 40,
                "flow.queue_depth_threshold": 8,
                "flow.kv_cache_threshold": 0.9,
            }
        )
        params = suggest(trial, searched(space, slo=False))
        config = apply_params(SchedulerConfig(), params, space)
        assert config.scoring.weights["tune_probe"] == 2.5
        assert (config.scoring.mode, config.scoring.temperature) == ("softmax", 0.2)
        assert config.flow_control.queue_depth_threshold == 8
        assert config.scoring.own_prefill_weight == 1.5
        assert (config.scoring.balance.abs_requests, config.scoring.balance.rel) == (0, 2.0)
        assert config.scoring.hot_prefix.share == 2.0
        assert "picker.slo_margin" not in params  # SLO knobs only for SLO objectives
        assert params_of(config, searched(space, slo=False)) == params
    finally:
        SCORERS.remove("tune_probe")


def test_the_written_policy_is_valid_and_means_what_was_tuned() -> None:
    space = searched(knobs(), slo=True)
    params = params_of(SchedulerConfig(), space)
    params.update(
        {
            "weight.prefix_overlap": 4.12345,
            "weight.queue_depth": 0.0,
            "picker.mode": "softmax",
            "picker.temperature": 0.0712,
            "flow.kv_cache_threshold": 0.93,
            "picker.slo_unmeetable": "fastest",
            "picker.own_prefill_weight": 1.25,
            "picker.balance.abs_requests": 64,
            "picker.hot_prefix.share": 1.5,
        }
    )
    tuned = apply_params(SchedulerConfig(), params, space)
    spec = policy_spec(tuned, space)
    document = manifest(spec, name="llama-tuned", pool="llama", namespace="llm")
    policy_validator().validate(document)  # the chart's CRD, as the API server would check it
    assert document["spec"]["picker"]["mode"] == "softmax"
    assert document["spec"]["flowControl"]["maxKVUtilization"] == 0.93
    defaulted = apply_defaults(to_json_schema(openapi_schema()), json.loads(json.dumps(document)))
    assert defaulted["spec"]["scorerWeights"]["prefixOverlap"] == 4.1235  # written to 4 places
    # kvsched's own conversion of the spec gives back the tuned settings (to the 4 places).
    back = applied(spec, SchedulerConfig())
    assert back == PolicySettings.from_spec(document["spec"]).scheduler_config(SchedulerConfig())
    assert back.scoring.weights["prefix_overlap"] == pytest.approx(4.12345, abs=1e-4)
    assert (back.scoring.mode, back.scoring.slo_unmeetable) == ("softmax", "fastest")
    assert document["spec"]["picker"]["balance"]["absRequests"] == 64
    assert document["spec"]["picker"]["hotPrefix"]["share"] == 1.5
    assert back.scoring.hot_prefix.share == 1.5
    assert (back.scoring.own_prefill_weight, back.scoring.balance.abs_requests) == (1.25, 64)
    assert params_of(back, space)["picker.temperature"] == pytest.approx(0.0712)


def test_latency_objectives_count_refused_requests_as_the_worst() -> None:
    done = [RequestOutcome(f"r{i}", ok=True, start_s=0.0, first_token_s=0.1 * (i + 1)) for i in range(9)]
    refused = RequestOutcome("x", ok=False, start_s=0.0, error="http 429: shed")
    too_long = RequestOutcome("y", ok=False, start_s=0.0, error="rejected: needs 9000 blocks")
    assert latency_with_failures(done)["ttft"]["p99"] == pytest.approx(900.0)
    assert math.isinf(latency_with_failures([*done, refused])["ttft"]["p99"])
    assert latency_with_failures([*done, too_long])["ttft"]["p99"] == pytest.approx(900.0)
    assert OBJECTIVES["ttft_p50"].improvement(100.0, 80.0) == pytest.approx(0.2)
    assert OBJECTIVES["goodput"].improvement(2.0, 3.0) == pytest.approx(0.5)


# --- the command -------------------------------------------------------------------------------


def run_tune(tmp_path: Path, trace: Path, *extra: str) -> dict[str, Any]:
    out, report = tmp_path / "policy.yaml", tmp_path / "tune.json"
    argv = [
        "tune",
        "--trace",
        str(trace),
        "--workers",
        "3",
        "--capacity-blocks",
        "400",
        "--trials",
        "5",
        "--tune-minutes",
        "0",
        "--warmup-minutes",
        "0.5",
        "--eval-seeds",
        "2",
        "--out",
        str(out),
        "--json",
        str(report),
        "--pool",
        "llama",
        "--quiet",
        *extra,
    ]
    assert main(argv) == 0
    document = yaml.safe_load(out.read_text())
    results: dict[str, Any] = json.loads(report.read_text())
    results["written"] = document
    return results


def test_tune_searches_from_the_current_policy_and_writes_an_appliable_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    results = run_tune(tmp_path, trace)
    output = capsys.readouterr().out
    assert ", seed 0: current" in output and "verdict:" in output
    tuning = results["tuning"]
    trials = tuning["trials"]
    assert len(trials) == 5
    # Trial 0 is the current policy (kvsched's defaults) and sets the figure to beat.
    assert trials[0]["params"] == params_of(SchedulerConfig(), searched(knobs(), slo=False))
    assert tuning["baseline"] == trials[0]["value"]
    assert tuning["best"] == min(t["value"] for t in trials) <= tuning["baseline"]
    holdout = results["holdout"]
    assert [r["seed"] for r in holdout["runs"]] == [0, 1]
    assert holdout["improvement_min"] <= holdout["improvement_mean"] <= holdout["improvement_max"]
    written = results["written"]
    policy_validator().validate(written)
    assert written["spec"]["poolRef"] == {"name": "llama"}
    assert written == results["policy"]


def test_tune_is_reproducible_from_its_seed_and_starts_from_a_given_policy(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    current = tmp_path / "current.yaml"
    current.write_text(
        yaml.safe_dump(
            manifest({"scorerWeights": {"prefixOverlap": 1, "queueDepth": 4}}, name="llama", pool="llama")
        )
    )
    first = run_tune(tmp_path, trace, "--current", str(current), "--seed", "7")
    second = run_tune(tmp_path, trace, "--current", str(current), "--seed", "7")
    assert first["tuning"]["trials"][0]["params"]["weight.queue_depth"] == 4
    assert [t["params"] for t in first["tuning"]["trials"]] == [
        t["params"] for t in second["tuning"]["trials"]
    ]
    assert first["holdout"] == second["holdout"]


def test_trial_seeds_average_jittered_runs(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    one = run_tune(tmp_path, trace, "--trials", "1")
    two = run_tune(tmp_path, trace, "--trials", "1", "--trial-seeds", "2")
    # The first trial is the defaults either way; averaged with a jittered run, its figure moves.
    assert one["tuning"]["trials"][0]["params"] == two["tuning"]["trials"][0]["params"]
    assert one["tuning"]["baseline"] != two["tuning"]["baseline"]


def test_tune_in_parallel_processes_gives_the_same_runs(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    serial = run_tune(tmp_path, trace, "--trials", "2")
    parallel = run_tune(tmp_path, trace, "--trials", "2", "--jobs", "2")
    # Trial 0 (the current policy) is the same simulated run wherever it runs.
    assert serial["tuning"]["trials"][0]["value"] == parallel["tuning"]["trials"][0]["value"]
    assert serial["tuning"]["baseline"] == parallel["tuning"]["baseline"]


def test_tune_refuses_an_slo_objective_without_an_slo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl", requests=20)
    assert main(["tune", "--trace", str(trace), "--objective", "slo_attainment"]) == 2
    assert "needs --slo-ttft-ms" in capsys.readouterr().err
    assert main(["tune", "--trace", str(tmp_path / "missing.jsonl")]) == 2


def test_evaluate_compares_a_given_policy_on_every_held_out_window(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(manifest({}, name="llama", pool="llama")))
    results = run_tune(tmp_path, trace, "--evaluate", str(same), "--eval-splits", "2")
    assert results["tuning"] is None
    holdout = results["holdout"]
    assert [(r["window"], r["seed"]) for r in holdout["runs"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, second = holdout["windows"]
    assert first["end_s"] == second["start_s"] and first["warmup_s"] == second["warmup_s"] == 30.0
    # The defaults against themselves: the simulator is deterministic, so nothing changes ...
    assert all(r["current"] == r["tuned"] and r["improvement"] == 0 for r in holdout["runs"])
    # ... while the arrival jitter of seed 1 does move the measurement: that is the noise.
    assert holdout["current_spread"] > 0


def test_the_verdict_rests_on_a_paired_interval_not_on_one_run() -> None:
    from scheduler.tune.commands import _verdict
    from scheduler.tune.search import Comparison, HoldoutRun

    def comparison(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        runs = [HoldoutRun(0, seed, {}, {}, a, b) for seed, (a, b) in enumerate(pairs)]
        return Comparison(OBJECTIVES["ttft_p99"], [], runs).as_dict()

    # Twelve paired runs, improvements 2.9% ... 16.0% (a real held-out comparison's): better, but the
    # interval of the mean reaches below 10%.
    gains = [2.9, 9.9, -0.6, 2.3, 13.2, 7.2, 16.0, 3.7, 15.1, -3.4, 7.3, 3.5]
    better = comparison([(100.0, 100.0 - g) for g in gains])
    low, high = better["improvement_interval_95"]
    assert low == pytest.approx(0.0251, abs=1e-3) and high == pytest.approx(0.1034, abs=1e-3)
    assert _verdict(better, 0.10).startswith("the tuned policy is better by +6.4%")
    noise = comparison([(100.0, 97.0), (100.0, 104.0), (100.0, 99.0)])
    assert _verdict(noise, 0.10).startswith("within noise")
    win = comparison([(100.0, 80.0), (110.0, 90.0), (90.0, 75.0)])
    assert "on every one of 3 held-out runs" in _verdict(win, 0.10)
