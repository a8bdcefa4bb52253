"""LoRA adapters in the simulated engines and the virtual-time pool: slots, load cost, per-adapter blocks."""

from __future__ import annotations

import pytest

from scheduler.core.events import BlockStored
from scheduler.sim.engine import Engine, EngineConfig, RequestRejected, StepResult

BLOCK = 16
TOKENS = list(range(64))


# --- the simulated engine ------------------------------------------------------------------


def _engine(max_loras: int = 1, load_s: float = 0.25) -> Engine:
    return Engine(
        EngineConfig(block_size=BLOCK, capacity_blocks=256, max_loras=max_loras, lora_load_s=load_s)
    )


def _run_until_idle(engine: Engine, now: float = 0.0) -> list[StepResult]:
    steps = []
    while engine.has_work:
        step = engine.step(max(now, engine.busy_until))
        now = step.end
        steps.append(step)
    return steps


def test_an_adapter_without_a_free_slot_waits_while_others_are_admitted() -> None:
    engine = _engine(max_loras=1)
    engine.add_request("a1", TOKENS, 4, 0.0, lora="a")
    engine.add_request("b1", TOKENS, 4, 0.0, lora="b")
    engine.add_request("base", TOKENS, 4, 0.0)
    first = engine.step(0.0)
    # One slot, taken by a: b waits; the base model's request needs no slot and goes ahead.
    assert [r.request_id for r in first.admitted] == ["a1", "base"]
    assert engine.waiting_loras == frozenset({"b"}) and engine.running_loras == frozenset({"a"})
    # Loading a cost the step its load time.
    assert first.end - first.start >= 0.25
    steps = _run_until_idle(engine, first.end)
    admitted_b = next(s for s in steps if any(r.request_id == "b1" for r in s.admitted))
    assert admitted_b.start >= next(s.end for s in steps if any(r.request_id == "a1" for r in s.finished))
    assert engine.lora_loads == 2 and list(engine.loaded_loras) == ["b"]


def test_the_engine_caches_an_adapters_blocks_apart_and_says_so_in_its_events() -> None:
    engine = _engine(max_loras=2, load_s=0.0)
    engine.add_request("a1", TOKENS, 1, 0.0, lora="a")
    events = [e for s in _run_until_idle(engine) for e in s.events if isinstance(e, BlockStored)]
    assert events and all(e.lora_name == "a" and e.lora_id == 1 for e in events)
    assert all(e.extra_keys == [("a",)] * len(e.block_hashes) for e in events)
    # The same tokens for another adapter or the base model hit nothing; for a, all but the last block.
    for name, lora, cached in (("b1", "b", 0), ("base", None, 0), ("a2", "a", 48)):
        request = engine.add_request(name, TOKENS, 1, 1.0, lora=lora)
        _run_until_idle(engine, 1.0)
        assert request.num_cached_tokens == cached, name
    with pytest.raises(RequestRejected, match="LoRA is not enabled"):
        Engine(EngineConfig(block_size=BLOCK)).add_request("x", TOKENS, 1, 0.0, lora="a")


def test_affinity_keeps_adapters_where_they_are_loaded_in_the_simulated_pool() -> None:
    from scheduler.bench.lora_bench import run, table

    # 300 requests over 30 adapters at 48/s on 8 pods of 4 slots: virtual time, deterministic.
    report = run(requests=300)
    rows = {row["label"]: row for row in report["rows"]}
    on, off, rr = rows["kvsched"], rows["kvsched, affinity off"], rows["round-robin"]
    assert all(row["failed"] == 0 for row in rows.values())
    # Without the slot filter, some requests land where every slot is busy and wait there.
    assert on["ttft_ms"]["p99"] < 0.5 * off["ttft_ms"]["p99"]
    assert on["ttft_ms"]["p99"] < 0.2 * rr["ttft_ms"]["p99"]
    # The median request finds its adapter resident either way (its prefix is keyed per
    # adapter, so prefix overlap alone already follows the adapter): a tie, within 5%.
    assert on["ttft_ms"]["p50"] <= 1.05 * off["ttft_ms"]["p50"]
    assert on["ttft_ms"]["p50"] < 0.2 * rr["ttft_ms"]["p50"]
    # Round-robin reloads adapters all the time; affinity loads few.
    assert on["adapter_loads"] < 0.5 * rr["adapter_loads"]
    assert "kvsched, affinity off" in table(report)
