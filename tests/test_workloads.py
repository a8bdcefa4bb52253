"""Workloads: Mooncake loading, generators, and the oracle ceiling."""

from __future__ import annotations

import pytest

from scheduler.workloads.generators import GENERATORS, generate
from scheduler.workloads.model import WorkloadRequest
from scheduler.workloads.mooncake import load_mooncake
from scheduler.workloads.oracle import oracle_hit_ratio, pooled_lru_hit_ratio


def test_mooncake_prefix_structure_and_scaling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 1024, "output_length": 64, "hash_ids": [0, 1]}\n'
        '{"timestamp": 1500, "input_length": 1000, "output_length": 32, "hash_ids": [0, 2]}\n'
    )
    workload = load_mooncake(trace, block_tokens=16)
    first, second = workload.requests
    assert workload.token_scale == 32
    assert len(first.prompt_token_ids) == 32 and first.max_tokens == 2
    assert len(second.prompt_token_ids) == 32  # ceil(1000 / 32)
    assert first.prompt_token_ids[:16] == second.prompt_token_ids[:16]  # equal ids, equal blocks
    assert first.prompt_token_ids[16:] != second.prompt_token_ids[16:]
    assert second.arrival_s == 1.5
    assert load_mooncake(trace, block_tokens=16).requests == workload.requests  # deterministic


def test_bad_trace_line_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_mooncake(trace)


@pytest.mark.parametrize(("name", "reference"), [("conversation_trace", 0.366), ("synthetic_trace", 0.640)])
def test_oracle_reproduces_the_published_reference(shared_dir, name: str, reference: float) -> None:  # type: ignore[no-untyped-def]
    workload = load_mooncake(shared_dir / "data" / "mooncake" / f"{name}.jsonl", block_tokens=16)
    assert oracle_hit_ratio(workload.requests, 16) == pytest.approx(reference, abs=0.0006)


def test_oracle_and_capacity_ceiling_arithmetic() -> None:
    a = WorkloadRequest("a", 0.0, [1, 2, 3, 4], 1)
    b = WorkloadRequest("b", 1.0, [1, 2, 3, 5], 1)  # shares the first 2-token block
    c = WorkloadRequest("c", 2.0, [9, 9, 3, 4], 1)  # same second block, different prefix
    assert oracle_hit_ratio([a, b, c], 2) == pytest.approx(1 / 6)
    assert pooled_lru_hit_ratio([a, b, c], 2, capacity_blocks=100) == pytest.approx(1 / 6)
    assert pooled_lru_hit_ratio([a, b, c], 2, capacity_blocks=1) == 0.0


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_seeded_and_share_prefixes(name: str) -> None:
    first = generate(name, seed=3)
    assert first.requests == generate(name, seed=3).requests
    assert first.requests != generate(name, seed=4).requests
    arrivals = [r.arrival_s for r in first.requests]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in first.requests}) == len(first.requests)
    assert oracle_hit_ratio(first.requests, 16) > 0.5  # each is built around reuse


def test_unknown_workload_names_the_choices() -> None:
    with pytest.raises(ValueError, match="agentic"):
        generate("nope")
