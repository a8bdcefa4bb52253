"""Workloads: Mooncake loading, the seeded generators and their sharing, the oracle ceilings."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest

from scheduler.workloads.generators import GENERATORS, agentic, chat, default, generate, rag
from scheduler.workloads.model import Workload, WorkloadRequest
from scheduler.workloads.mooncake import VOCAB, block_tokens_for, load_mooncake
from scheduler.workloads.oracle import (
    oracle_hit_ratio,
    pooled_lru_hit_ratio,
    prefix_block_keys,
    trace_oracle_hit_ratio,
)


def _trace(tmp_path: Path, rows: list[dict[str, object]], *extra_lines: str) -> Path:
    path = tmp_path / "trace.jsonl"
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


ROWS: list[dict[str, object]] = [
    {"timestamp": 0, "input_length": 1024, "output_length": 64, "hash_ids": [0, 1]},
    {"timestamp": 1500, "input_length": 1000, "output_length": 32, "hash_ids": [0, 2]},
    {"timestamp": 2500, "input_length": 1300, "output_length": 1, "hash_ids": [0, 1, 3]},
]


def test_mooncake_equal_hash_ids_give_equal_blocks(tmp_path: Path) -> None:
    workload = load_mooncake(_trace(tmp_path, ROWS), block_tokens=16)
    first, second, third = (r.prompt_token_ids for r in workload.requests)
    assert first[:16] == second[:16] == third[:16]  # hash id 0 everywhere
    assert first[16:32] != second[16:32]  # ids 1 and 2
    assert first == third[:32]  # [0, 1] is a prefix of [0, 1, 3]
    assert [r.block_ids for r in workload.requests] == [(0, 1), (0, 2), (0, 1, 3)]
    assert all(0 < t < VOCAB for r in workload.requests for t in r.prompt_token_ids)
    assert load_mooncake(_trace(tmp_path, ROWS), block_tokens=16).requests == workload.requests


def test_mooncake_block_scaling_keeps_the_structure(tmp_path: Path) -> None:
    full = load_mooncake(_trace(tmp_path, ROWS))
    small = load_mooncake(_trace(tmp_path, ROWS), block_tokens=16)
    assert (full.token_scale, full.block_tokens, small.token_scale, small.block_tokens) == (1, 512, 32, 16)
    # Full-size prompts are exactly input_length long; scaled ones keep each block's share.
    assert [len(r.prompt_token_ids) for r in full.requests] == [1024, 1000, 1300]
    assert [len(r.prompt_token_ids) for r in small.requests] == [32, 32, 16 + 16 + 9]  # 276/512*16 -> 9
    # A scaled block is the start of the full block for the same id.
    assert small.requests[0].prompt_token_ids[:16] == full.requests[0].prompt_token_ids[:16]
    assert small.requests[0].prompt_token_ids[16:32] == full.requests[0].prompt_token_ids[512:528]
    assert block_tokens_for(3, 16) == full.requests[2].prompt_token_ids[1024:1040]
    assert [r.max_tokens for r in small.requests] == [2, 1, 1]
    assert [r.max_tokens for r in full.requests] == [64, 32, 1]


def test_mooncake_limit_and_time_scale(tmp_path: Path) -> None:
    workload = load_mooncake(_trace(tmp_path, ROWS), block_tokens=16, limit=2, time_scale=0.5)
    assert [r.request_id for r in workload.requests] == ["mooncake-0", "mooncake-1"]
    assert [r.arrival_s for r in workload.requests] == [0.0, 0.75]


def test_mooncake_skips_and_counts_malformed_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _trace(
        tmp_path,
        ROWS[:1],
        '{"timestamp": 0, "input_length": 10}',
        "not json",
        '{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": []}',
        json.dumps(ROWS[1]),
    )
    with caplog.at_level(logging.WARNING, logger="scheduler.workloads.mooncake"):
        workload = load_mooncake(path, block_tokens=16)
    assert len(workload.requests) == 2
    assert workload.meta["skipped_lines"] == 3
    assert workload.requests[1].request_id == "mooncake-4"  # ids follow trace lines
    first_warning = caplog.records[0].getMessage()
    assert "trace.jsonl:2" in first_warning  # the first bad line, with its location
    assert sum("trace.jsonl:" in r.getMessage() for r in caplog.records) == 2  # once, then a total


@pytest.mark.parametrize(("name", "reference"), [("conversation_trace", 0.366), ("synthetic_trace", 0.640)])
def test_oracle_reproduces_the_published_mooncake_figures(
    shared_dir: Path, name: str, reference: float
) -> None:
    workload = load_mooncake(shared_dir / "data" / "mooncake" / f"{name}.jsonl", block_tokens=16)
    assert workload.meta["skipped_lines"] == 0
    assert trace_oracle_hit_ratio(workload.requests) == pytest.approx(reference, abs=0.0005)
    # Token granularity sees only full blocks: a different, still substantial ceiling.
    assert 0.3 < oracle_hit_ratio(workload.requests, 16) < 0.75


def test_token_oracle_equals_the_trace_oracle_on_whole_blocks(tmp_path: Path) -> None:
    rows = [
        {"timestamp": i, "input_length": 512 * len(ids), "output_length": 8, "hash_ids": ids}
        for i, ids in enumerate([[0, 1, 2], [0, 1, 5], [0, 7], [0, 1, 2, 9], [4]])
    ]
    workload = load_mooncake(_trace(tmp_path, rows), block_tokens=4)
    assert trace_oracle_hit_ratio(workload.requests) == pytest.approx(6 / 13)
    assert oracle_hit_ratio(workload.requests, 4) == pytest.approx(6 / 13)


def test_oracle_counts_full_blocks_with_chained_identity() -> None:
    a = WorkloadRequest("a", 0.0, [1, 2, 3, 4, 7], 1)  # the trailing 7 is no block
    b = WorkloadRequest("b", 1.0, [1, 2, 3, 5], 1)  # shares the first 2-token block
    c = WorkloadRequest("c", 2.0, [9, 9, 3, 4], 1)  # same second block, other prefix: a miss
    d = WorkloadRequest("d", 3.0, [1, 2, 3, 4], 1)  # all seen
    assert len(prefix_block_keys(a.prompt_token_ids, 2)) == 2
    assert oracle_hit_ratio([a, b, c], 2) == pytest.approx(1 / 6)
    assert oracle_hit_ratio([d, c, b, a], 2) == pytest.approx(3 / 8)  # arrival order, not list order
    assert oracle_hit_ratio([], 2) == 0.0
    assert pooled_lru_hit_ratio([a, b, c, d], 2, capacity_blocks=100) == pytest.approx(3 / 8)
    assert pooled_lru_hit_ratio([a, b, c, d], 2, capacity_blocks=1) == 0.0
    with pytest.raises(ValueError, match="block ids"):
        trace_oracle_hit_ratio([a])


def test_workload_limit_and_time_scale() -> None:
    workload = Workload("w", [WorkloadRequest(f"r{i}", float(i), [1], 1) for i in range(4)])
    assert [r.request_id for r in workload.limited(2).requests] == ["r0", "r1"]
    assert workload.limited(None) is workload
    assert [r.arrival_s for r in workload.time_scaled(0.25).requests] == [0.0, 0.25, 0.5, 0.75]
    assert workload.duration_s == 3.0
    with pytest.raises(ValueError):
        workload.time_scaled(0)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_seeded_ordered_and_share_prefixes(name: str) -> None:
    first = generate(name, seed=3)
    assert first.requests == generate(name, seed=3).requests
    assert first.requests != generate(name, seed=4).requests
    arrivals = [r.arrival_s for r in first.requests]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in first.requests}) == len(first.requests)
    assert all(r.max_tokens >= 1 and 0 not in r.prompt_token_ids for r in first.requests)
    assert oracle_hit_ratio(first.requests, first.block_tokens) > 0.5  # each is built around reuse


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_honour_requests_and_rate(name: str) -> None:
    assert len(generate(name, seed=1, requests=37).requests) == 37
    slow, fast = generate(name, seed=1, rate=1.0), generate(name, seed=1, rate=4.0)
    assert len(slow.requests) == len(fast.requests)
    assert fast.duration_s < slow.duration_s


def test_chat_turns_extend_the_conversation_over_shared_system_prompts() -> None:
    workload = chat(seed=5, sessions=12, turns=4, system_prompts=3, system_tokens=64)
    sessions: dict[str, list[WorkloadRequest]] = {}
    for request in workload.requests:
        assert request.session_id is not None
        sessions.setdefault(request.session_id, []).append(request)
    assert len(sessions) == 12
    for turns in sessions.values():
        assert len(turns) == 4
        for earlier, later in itertools.pairwise(turns):
            assert later.arrival_s > earlier.arrival_s
            # The next turn resends this one's prompt, its answer and a new message.
            n = len(earlier.prompt_token_ids)
            assert later.prompt_token_ids[:n] == earlier.prompt_token_ids
            assert len(later.prompt_token_ids) > n + earlier.max_tokens
    systems = {tuple(r.prompt_token_ids[:64]) for r in workload.requests}
    assert len(systems) <= 3


def test_rag_queries_share_preamble_and_document_but_not_the_question() -> None:
    workload = rag(seed=2, requests=120, documents=5, document_tokens=64, preambles=2, preamble_tokens=32)
    heads = [tuple(r.prompt_token_ids[:96]) for r in workload.requests]
    assert len(set(heads)) <= 2 * 5
    assert max(heads.count(h) for h in set(heads)) > 120 / 10  # Zipf: a popular document
    tails = {tuple(r.prompt_token_ids[96:]) for r in workload.requests}
    assert len(tails) == 120  # every question is its own


def test_agentic_contexts_grow_over_one_tool_prompt() -> None:
    workload = agentic(seed=4, agents=5, steps=6, tools_tokens=128)
    tools = workload.requests[0].prompt_token_ids[:128]
    assert all(r.prompt_token_ids[:128] == tools for r in workload.requests)
    by_agent: dict[str | None, list[WorkloadRequest]] = {}
    for request in workload.requests:
        by_agent.setdefault(request.session_id, []).append(request)
    for steps in by_agent.values():
        lengths = [len(r.prompt_token_ids) for r in steps]
        assert lengths == sorted(lengths) and lengths[-1] > lengths[0] + 5 * 150
        assert all(
            b.prompt_token_ids[: len(a.prompt_token_ids)] == a.prompt_token_ids
            for a, b in itertools.pairwise(steps)
        )


def test_default_is_a_demo_sized_shared_mix() -> None:
    workload = default(seed=0)
    assert 300 <= len(workload.requests) <= 600
    assert 30.0 <= workload.duration_s <= 90.0
    kinds = {r.request_id.split("-")[0] for r in workload.requests}
    assert kinds == {"chat", "rag"}
    assert oracle_hit_ratio(workload.requests, 16) > 0.7


def test_unknown_workload_names_the_choices() -> None:
    with pytest.raises(ValueError, match="agentic"):
        generate("nope")


def test_a_trace_recorded_in_steps_is_spread_over_each_step(tmp_path: Path) -> None:
    """The conversation trace records arrivals in 3 s steps, up to 28 requests on one
    timestamp: with ``arrival_step_ms`` each step's requests arrive within the step after it,
    in recorded order, seeded; without it, as recorded."""
    lines = [
        {"timestamp": t, "input_length": 600, "output_length": 10, "hash_ids": [i, 100 + i]}
        for i, t in enumerate([0, 0, 0, 0, 3000, 3000, 6000])
    ]
    path = tmp_path / "stepped.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    recorded = load_mooncake(path, block_tokens=16)
    assert [r.arrival_s for r in recorded.requests] == [0, 0, 0, 0, 3, 3, 6]
    spread = load_mooncake(path, block_tokens=16, arrival_step_ms=3000, seed=1)
    arrivals = [r.arrival_s for r in spread.requests]
    assert [r.request_id for r in spread.requests] == [r.request_id for r in recorded.requests]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == len(arrivals)
    for request, at in zip(recorded.requests, arrivals, strict=True):
        assert request.arrival_s <= at < request.arrival_s + 3.0
    assert [
        r.arrival_s for r in load_mooncake(path, block_tokens=16, arrival_step_ms=3000, seed=1).requests
    ] == arrivals
    assert [
        r.arrival_s for r in load_mooncake(path, block_tokens=16, arrival_step_ms=3000, seed=2).requests
    ] != arrivals
    with pytest.raises(ValueError, match="arrival_step_ms"):
        load_mooncake(path, arrival_step_ms=0)
