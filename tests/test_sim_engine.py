"""Simulated vLLM engine: prefix-cache semantics, batching, latency model, KV events."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from scheduler.core.events import BlockRemoved, BlockStored, KVEvent
from scheduler.sim.engine import (
    Engine,
    EngineConfig,
    RequestRejected,
    RequestStatus,
    SimRequest,
    StepResult,
)
from scheduler.sim.latency import LatencyModel, StepShape, attention_pairs


def run_until_idle(engine: Engine, now: float = 0.0, limit: int = 100_000) -> tuple[float, list[StepResult]]:
    results: list[StepResult] = []
    for _ in range(limit):
        start = engine.next_step_time()
        if start is None:
            return now, results
        result = engine.step(max(now, start))
        now = result.end
        results.append(result)
    raise AssertionError("engine did not go idle")


def events_of(results: list[StepResult]) -> list[KVEvent]:
    return [event for result in results for event in result.events]


def apply_events(events: list[KVEvent], held: Counter[int] | None = None) -> Counter[int]:
    """What a reference-counting subscriber holds after the events."""
    held = Counter() if held is None else held
    for event in events:
        if isinstance(event, BlockStored):
            held.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                assert held[h] > 0, f"removed hash {h} that was never stored"
                held[h] -= 1
                if held[h] == 0:
                    del held[h]
    return held


def small_engine(**overrides: object) -> Engine:
    fields: dict[str, object] = {"block_size": 4, "capacity_blocks": 8, "max_model_len": 4096}
    fields.update(overrides)
    return Engine(EngineConfig(**fields))  # type: ignore[arg-type]


# -- prefix cache ----------------------------------------------------------------------


def test_shared_prefix_hits_leading_full_blocks() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64))
    prompt = list(range(1000, 1064))  # four full blocks
    engine.add_request("a", prompt, 1, 0.0)
    now, _ = run_until_idle(engine)
    other = engine.add_request("b", prompt[:48] + [7] * 20, 1, now)
    run_until_idle(engine, now)
    assert other.num_cached_tokens == 48
    assert engine.metrics.prefix_cache_queries == 64 + 68
    assert engine.metrics.prefix_cache_hits == 48


def test_last_prompt_token_is_always_recomputed_and_its_block_cached_twice() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64))
    prompt = list(range(64))
    engine.add_request("a", prompt, 1, 0.0)
    now, first = run_until_idle(engine)
    again = engine.add_request("b", prompt, 1, now)
    _, second = run_until_idle(engine, now)
    assert again.num_cached_tokens == 48  # vLLM caps hits at prompt_len - 1
    stored = [e for e in events_of(second) if isinstance(e, BlockStored)]
    assert len(stored) == 1 and len(stored[0].block_hashes) == 1
    duplicate = stored[0].block_hashes[0]
    assert engine.cached_wire_hashes()[duplicate] == 2  # vLLM does not de-duplicate
    first_stored = next(e for e in events_of(first) if isinstance(e, BlockStored))
    assert stored[0].parent_block_hash == first_stored.block_hashes[2]


def test_partial_blocks_are_not_cached() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64))
    engine.add_request("a", list(range(20)), 1, 0.0)
    now, results = run_until_idle(engine)
    stored = [e for e in events_of(results) if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stored] == [1]
    assert stored[0].token_ids == list(range(16))
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    assert stored[0].kv_cache_spec_kind == "full_attention" and stored[0].group_idx == 0
    again = engine.add_request("b", list(range(20)), 1, now)
    run_until_idle(engine, now)
    assert again.num_cached_tokens == 16


def test_block_hashes_match_vllm_vectors(shared_dir: Path) -> None:
    vectors = json.loads((shared_dir / "vectors" / "vllm_kv_events.json").read_text())
    for case in vectors["sha256_cbor"]:
        engine = Engine(EngineConfig(capacity_blocks=16, hash_seed=case["seed"]))
        engine.add_request("r", list(range(1, 33)), 1, 0.0)
        _, results = run_until_idle(engine)
        stored = [e for e in events_of(results) if isinstance(e, BlockStored)]
        assert stored[0].block_hashes == [case["block0_wire_int"], case["block1_wire_int"]]


def test_generated_tokens_fill_and_cache_blocks() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64))
    request = engine.add_request("a", list(range(10)), 30, 0.0)
    _, results = run_until_idle(engine)
    # KV exists for 10 + 30 - 1 = 39 tokens: two full blocks, stored as each filled up.
    stored = [e for e in events_of(results) if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stored] == [1, 1]
    assert stored[1].token_ids == request.token_ids[16:32]
    assert stored[1].parent_block_hash == stored[0].block_hashes[0]


def test_lru_eviction_order_frees_request_tails_first() -> None:
    engine = small_engine()
    engine.add_request("a", [1] * 8, 1, 0.0)  # 2 blocks: a0 a1
    now, res_a = run_until_idle(engine)
    engine.add_request("b", [2] * 8, 1, now)  # 2 blocks: b0 b1
    now, res_b = run_until_idle(engine, now)
    a0, a1 = (e for e in events_of(res_a) if isinstance(e, BlockStored)).__next__().block_hashes
    b0, b1 = (e for e in events_of(res_b) if isinstance(e, BlockStored)).__next__().block_hashes
    # 8 blocks: 4 never used go first, then a's tail, a's head, b's tail, b's head.
    engine.add_request("c", list(range(100, 132)), 1, now)
    now, res_c = run_until_idle(engine, now)
    removed = [e.block_hashes[0] for e in events_of(res_c) if isinstance(e, BlockRemoved)]
    assert removed == [a1, a0, b1, b0]


def test_cache_hit_refreshes_a_block_in_the_lru() -> None:
    engine = small_engine()
    engine.add_request("a", [1] * 8, 1, 0.0)
    now, res_a = run_until_idle(engine)
    a0, a1 = next(e for e in events_of(res_a) if isinstance(e, BlockStored)).block_hashes
    engine.add_request("b", [2] * 8, 1, now)
    now, _ = run_until_idle(engine, now)
    hit = engine.add_request("a2", [1] * 4 + [3], 1, now)  # hits a0 only
    now, _ = run_until_idle(engine, now)
    assert hit.num_cached_tokens == 4
    engine.add_request("c", list(range(100, 132)), 1, now)
    _, res_c = run_until_idle(engine, now)
    removed = [e.block_hashes[0] for e in events_of(res_c) if isinstance(e, BlockRemoved)]
    assert removed[-1] == a0 and removed.index(a1) < removed.index(a0)


def test_running_request_blocks_are_never_evicted() -> None:
    engine = small_engine()
    long = engine.add_request("long", [5] * 12, 10, 0.0)  # holds 12+9 -> 21 tokens -> 6 blocks
    first = engine.step(0.0)
    held = {b.block_id for b in long.blocks}
    waiting = engine.add_request("next", list(range(200, 216)), 1, first.end)  # needs 4 blocks
    now = first.end
    evicted: list[int] = []
    while long.status is RequestStatus.RUNNING:
        result = engine.step(now)
        now = result.end
        evicted += [h for e in result.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
        if long.status is RequestStatus.RUNNING:
            assert waiting.status is RequestStatus.WAITING
            assert held <= {b.block_id for b in long.blocks}
    assert evicted == []
    run_until_idle(engine, now)
    assert waiting.status is RequestStatus.FINISHED


def test_requests_that_can_never_fit_are_rejected() -> None:
    engine = small_engine(max_model_len=64)
    with pytest.raises(RequestRejected, match="KV blocks"):
        engine.add_request("big", [1] * 40, 1, 0.0)  # 10 blocks > 8
    with pytest.raises(RequestRejected, match="maximum context length"):
        engine.add_request("long", [1] * 10, 60, 0.0)
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], 1, 0.0)
    engine.add_request("fits", [1] * 32, 1, 0.0)  # exactly the capacity
    run_until_idle(engine)


def test_abort_frees_blocks() -> None:
    engine = small_engine()
    engine.add_request("a", [1] * 12, 8, 0.0)
    engine.step(0.0)
    assert engine.pool.num_free < 8
    assert engine.abort("a", 1.0)
    assert engine.pool.num_free == 8 and not engine.has_work
    assert not engine.abort("a", 1.0)


def test_random_workload_with_evictions_keeps_invariants_and_event_consistency() -> None:
    rng = random.Random(7)
    engine = Engine(EngineConfig(block_size=4, capacity_blocks=40, max_num_seqs=6, max_num_batched_tokens=24))
    prefixes = [[rng.randrange(1000) for _ in range(12)] for _ in range(5)]
    held: Counter[int] = Counter()
    now = 0.0
    submitted = []
    removed = 0
    for i in range(120):
        prompt = rng.choice(prefixes)[: rng.randrange(1, 13)] + [
            rng.randrange(1000) for _ in range(rng.randrange(0, 20))
        ]
        submitted.append(engine.add_request(f"r{i}", prompt, rng.randrange(1, 12), now))
        for _ in range(rng.randrange(0, 4)):
            start = engine.next_step_time()
            if start is None:
                break
            result = engine.step(max(now, start))
            now = result.end
            apply_events(result.events, held)
            removed += sum(isinstance(e, BlockRemoved) for e in result.events)
            assert engine.pool.num_free - engine._reserved >= 0
    now, results = run_until_idle(engine, now)
    apply_events(events_of(results), held)
    removed += sum(isinstance(e, BlockRemoved) for e in events_of(results))
    assert all(r.status is RequestStatus.FINISHED and r.completion_tokens == r.max_tokens for r in submitted)
    assert held == engine.cached_wire_hashes()
    assert sum(r.num_cached_tokens for r in submitted) > 0
    assert removed > 20  # the workload really evicts


def test_on_demand_blocks_admit_what_reservation_holds_back_and_preempt_the_newest() -> None:
    # 10 blocks of 4: each request needs 2 blocks for its prompt and 5 at its end.
    reserving = small_engine(capacity_blocks=10)
    on_demand = small_engine(capacity_blocks=10, preemption=True)
    requests = []
    for engine in (reserving, on_demand):
        requests = [engine.add_request(f"r{i}", [100 * i + t for t in range(8)], 12, 0.0) for i in range(3)]
    reserving.step(0.0)
    first = on_demand.step(0.0)
    assert reserving.num_running == 2 and on_demand.num_running == 3
    now = first.end
    preempting: list[StepResult] = []
    while (start := on_demand.next_step_time()) is not None:
        before = on_demand.metrics.preemptions
        result = on_demand.step(max(now, start))
        now = result.end
        if on_demand.metrics.preemptions > before:
            preempting.append(result)
            # The newest went back to the front of the queue; nobody was admitted.
            assert on_demand.waiting[0] is requests[2] and not result.admitted
    assert len(preempting) == 1
    assert all(r.status is RequestStatus.FINISHED and r.completion_tokens == 12 for r in requests)
    assert on_demand.pool.num_free == 10


def test_a_resumed_request_recomputes_its_output_and_keeps_its_tokens() -> None:
    engine = small_engine(capacity_blocks=10, preemption=True, max_num_batched_tokens=64)
    requests = [engine.add_request(f"r{i}", [100 * i + t for t in range(8)], 12, 0.0) for i in range(3)]
    _, results = run_until_idle(engine)
    victim = requests[2]
    admissions = [r for r in results if victim in r.admitted]
    assert len(admissions) == 2 and engine.metrics.preemptions == 1
    # Preempted after 5 tokens, its blocks evicted by the others' growth: it recomputes its
    # 8 prompt tokens and 5 output tokens in one chunk, then produces its 6th token.
    resumed = admissions[1]
    assert resumed.shape.prefill_tokens == 13
    assert resumed.shape.prefill_attention_pairs == attention_pairs(13, 0)
    assert [t.index for t in resumed.tokens if t.request is victim] == [5]
    assert victim.completion_tokens == 12 and victim.token_times == sorted(victim.token_times)
    assert victim.first_token_time == victim.token_times[0] < resumed.start


def test_a_request_preempted_mid_prefill_resumes_from_its_own_blocks_without_counting_them_as_hits() -> None:
    engine = small_engine(capacity_blocks=10, preemption=True, max_num_batched_tokens=6)
    decoding = engine.add_request("a", list(range(8)), 16, 0.0)
    first = engine.step(0.0)
    prefilling = engine.add_request("b", list(range(100, 124)), 2, first.end)
    _, results = run_until_idle(engine, first.end)
    assert engine.metrics.preemptions == 1
    admissions = [r for r in results if prefilling in r.admitted]
    assert len(admissions) == 2
    # Resumed: 16 of its 21 computed tokens were still cached (4 full blocks), so it
    # recomputes from token 16 on.
    resumed = admissions[1].shape
    assert resumed.prefill_attention_pairs == attention_pairs(resumed.prefill_tokens, 16)
    # vLLM sets num_cached_tokens at first scheduling only.
    assert prefilling.num_cached_tokens == 0 and decoding.num_cached_tokens == 0
    assert prefilling.completion_tokens == 2 and decoding.completion_tokens == 16


def test_preemption_with_a_random_workload_keeps_the_cache_and_events_consistent() -> None:
    rng = random.Random(11)
    engine = Engine(
        EngineConfig(
            block_size=4, capacity_blocks=30, max_num_seqs=8, max_num_batched_tokens=24, preemption=True
        )
    )
    held: Counter[int] = Counter()
    now = 0.0
    submitted = []
    for i in range(80):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
        submitted.append(engine.add_request(f"r{i}", prompt, rng.randrange(1, 40), now))
        for _ in range(rng.randrange(0, 4)):
            start = engine.next_step_time()
            if start is None:
                break
            result = engine.step(max(now, start))
            now = result.end
            apply_events(result.events, held)
            assert sum(len(r.blocks) for r in engine.running) <= 30
    now, results = run_until_idle(engine, now)
    apply_events(events_of(results), held)
    assert all(r.status is RequestStatus.FINISHED and r.completion_tokens == r.max_tokens for r in submitted)
    assert held == engine.cached_wire_hashes()
    assert engine.metrics.preemptions > 5  # the workload really preempts


def test_preemption_is_refused_with_interleaved_scaled_steps() -> None:
    with pytest.raises(ValueError, match="preemption"):
        EngineConfig(preemption=True, interleave_decode=True, latency=LatencyModel(token_scale=32))


# -- batching --------------------------------------------------------------------------


def test_chunked_prefill_respects_token_budget() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64, max_num_batched_tokens=32))
    request = engine.add_request("a", list(range(100)), 2, 0.0)
    _, results = run_until_idle(engine)
    assert [r.shape.prefill_tokens for r in results] == [32, 32, 32, 4, 0]
    assert [len(r.tokens) for r in results] == [0, 0, 0, 1, 1]
    assert request.first_token_time == results[3].end
    assert results[1].shape.prefill_attention_pairs == attention_pairs(32, 32)


def test_decode_tokens_are_scheduled_before_prefill_chunks() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64, max_num_batched_tokens=32))
    engine.add_request("dec", list(range(8)), 5, 0.0)
    first = engine.step(0.0)
    engine.add_request("pre", list(range(100, 200)), 1, first.end)
    second = engine.step(first.end)
    assert second.shape == StepShape(31, attention_pairs(31, 0), 1, 9)


def test_max_num_seqs_limits_running_requests() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64, max_num_seqs=2))
    requests = [engine.add_request(f"r{i}", [i] * 5, 3, 0.0) for i in range(3)]
    first = engine.step(0.0)
    assert [r.status for r in requests] == [
        RequestStatus.RUNNING,
        RequestStatus.RUNNING,
        RequestStatus.WAITING,
    ]
    assert first.shape.prefill_tokens == 10
    run_until_idle(engine, first.end)
    first_done = requests[0].finish_time
    assert first_done is not None and requests[2].scheduled_time is not None
    assert requests[2].scheduled_time >= first_done


def test_token_times_and_metrics() -> None:
    engine = Engine(EngineConfig(capacity_blocks=64))
    request = engine.add_request("a", list(range(40)), 4, 0.5)
    now, results = run_until_idle(engine, 0.5)
    assert request.token_times == [r.end for r in results]
    assert request.ttft == pytest.approx(results[0].end - 0.5)
    assert request.e2e == pytest.approx(now - 0.5)
    metrics = engine.metrics
    assert (metrics.prompt_tokens, metrics.generation_tokens) == (40, 4)
    assert (metrics.ttft.count, metrics.itl.count, metrics.e2e.count) == (1, 3, 1)
    assert metrics.itl.cumulative()[-1] == (float("inf"), 3)


# -- latency model ---------------------------------------------------------------------


def test_latency_is_monotonic() -> None:
    model = LatencyModel()
    prefill = [model.prefill_time(n) for n in (1, 16, 256, 1024, 4096, 8192)]
    assert prefill == sorted(prefill) and len(set(prefill)) > 3
    assert model.prefill_time(1024, context_before=4096) > model.prefill_time(1024)
    decode = [model.decode_time(b, 1000) for b in (1, 8, 64, 256)]
    assert decode == sorted(decode) and decode[0] < decode[-1]
    assert model.decode_time(8, 4000) > model.decode_time(8, 100)


def test_latency_calibration_anchors() -> None:
    model = LatencyModel()
    # Batch-1 decode on one H100: ~7.6 ms a token (~130 tok/s).
    assert model.decode_time(1, 512) == pytest.approx(7.6e-3, rel=0.03)
    # bf16 prefill ~27.6k tok/s at 2048 tokens, slower at 8k (quadratic attention).
    assert 2048 / model.prefill_time(2048) == pytest.approx(27_600, rel=0.02)
    assert 8192 / model.prefill_time(8192) < 2048 / model.prefill_time(2048)
    # Attention share at 8k tokens is noticeable but not dominant.
    attention = model.attn_per_pair_s * attention_pairs(8192, 0)
    assert 0.05 < attention / model.prefill_time(8192) < 0.25


def test_token_scale_stands_for_real_token_counts() -> None:
    scaled = LatencyModel(token_scale=32)
    plain = LatencyModel()
    # Equal up to the causal diagonal, which does not scale with the square.
    assert scaled.prefill_time(64) == pytest.approx(plain.prefill_time(2048), rel=1e-3)
    assert scaled.prefill_time(64, 64) == pytest.approx(plain.prefill_time(2048, 2048), rel=1e-3)
    # One simulated decode step stands for 32 real ones.
    assert scaled.decode_time(4, 10) == pytest.approx(32 * plain.decode_time(4, 320))
    with pytest.raises(ValueError):
        LatencyModel(token_scale=0)


# -- interleaved decode (scaled traces) ----------------------------------------------------


def scaled_engine(interleave: bool) -> Engine:
    # One simulated token stands for 32 real ones; 256 simulated tokens = vLLM's 8,192 budget.
    return Engine(
        EngineConfig(
            capacity_blocks=4096,
            max_num_batched_tokens=256,
            max_model_len=8192,
            latency=LatencyModel(token_scale=32),
            interleave_decode=interleave,
        )
    )


Arrivals = dict[float, tuple[str, list[int], int]]  # time -> (request id, prompt, max tokens)


def drive(engine: Engine, arrivals: Arrivals) -> None:
    """Step ``engine`` as the virtual-time pool does: arrivals at their times, a pure-decode
    run cut short when an arrival can be admitted, the run's tokens at its end."""
    pending = sorted(arrivals.items())
    now = 0.0
    in_run = False
    while True:
        if in_run:
            if pending and pending[0][0] < engine.busy_until:
                at, (request_id, prompt, max_tokens) = pending.pop(0)
                engine.add_request(request_id, prompt, max_tokens, at)
                if engine.can_admit():
                    engine.interrupt(at)
                continue
            now = engine.finish_decode_run().end
            in_run = False
            continue
        start = engine.next_step_time()
        if pending and (start is None or pending[0][0] <= max(now, start)):
            at, (request_id, prompt, max_tokens) = pending.pop(0)
            engine.add_request(request_id, prompt, max_tokens, at)
            now = max(now, at)
            continue
        if start is None:
            return
        step = engine.step(max(now, start))
        in_run = step.pending
        now = step.end


def _first_token_times(interleave: bool, arrivals: Arrivals) -> dict[str, float]:
    engine = scaled_engine(interleave)
    requests: dict[str, SimRequest] = {}
    add = engine.add_request

    def record(request_id: str, prompt: list[int], max_tokens: int, now: float) -> SimRequest:
        requests[request_id] = add(request_id, prompt, max_tokens, now)
        return requests[request_id]

    engine.add_request = record  # type: ignore[method-assign]
    drive(engine, arrivals)
    assert all(r.status is RequestStatus.FINISHED for r in requests.values())
    return {name: r.ttft or 0.0 for name, r in requests.items()}


MODEL_32 = LatencyModel(token_scale=32)
DECODE_ITERATION = MODEL_32.decode_iteration_time(StepShape(0, 0, 1, 64))  # ~7.7 ms


def test_an_arrival_joins_at_the_next_iteration_instead_of_waiting_out_the_scaled_step() -> None:
    # "long" decodes alone from 0.074 s in scaled steps of 32 real iterations (0.25 s each);
    # "short" arrives at 0.33 s, just after the second such step started.
    arrivals = {0.0: ("long", list(range(1, 65)), 40), 0.33: ("short", list(range(100, 164)), 2)}
    whole = _first_token_times(False, arrivals)["short"]
    interleaved = _first_token_times(True, arrivals)["short"]
    prefill = MODEL_32.prefill_time(64)
    # Whole steps: it waits out most of the step in progress.
    assert whole > prefill + 25 * DECODE_ITERATION
    # Interleaved: at most one decode iteration, then its prefill (which also carries one
    # real decode token of "long").
    assert interleaved < prefill + 2 * DECODE_ITERATION


def test_interleaved_prefill_keeps_a_full_chunk_per_iteration_while_others_decode() -> None:
    arrivals = {0.0: ("decoder", list(range(1, 33)), 64), 0.04: ("long", list(range(1000, 2024)), 1)}
    whole = _first_token_times(False, arrivals)["long"]
    interleaved = _first_token_times(True, arrivals)["long"]
    # Whole steps add 31 decode iterations to each of the long prompt's 5 chunked steps.
    assert whole - interleaved > 4 * 31 * DECODE_ITERATION
    engine = scaled_engine(True)
    engine.add_request("decoder", list(range(1, 33)), 64, 0.0)
    now = engine.step(0.0).end
    engine.add_request("long", list(range(1000, 2024)), 1, now)
    chunks = []
    while not chunks or chunks[-1].tokens == []:
        step = engine.step(now)
        assert not step.pending  # prefill work left: one real iteration at a time
        chunks.append(step)
        now = step.end
    # 256 simulated tokens a step, less one real token (1/32 simulated) for the decoder.
    assert [c.shape.prefill_tokens for c in chunks] == [255, 255, 255, 255, 4]
    assert all(c.shape.decode_seqs == 1 for c in chunks)


def test_interleaved_decoding_produces_every_token_at_token_scale_iterations_each() -> None:
    engine = scaled_engine(True)
    request = engine.add_request("a", list(range(1, 65)), 5, 0.0)
    drive(engine, {})
    assert request.status is RequestStatus.FINISHED and request.completion_tokens == 5
    gaps = [b - a for a, b in zip(request.token_times, request.token_times[1:], strict=False)]
    # 32 real decode iterations between two simulated tokens (context growth aside).
    assert all(gap == pytest.approx(32 * DECODE_ITERATION, rel=0.01) for gap in gaps)


def test_an_interrupted_run_produces_no_token_early_and_keeps_the_iterations_it_ran() -> None:
    engine = scaled_engine(True)
    engine.add_request("a", list(range(1, 65)), 3, 0.0)
    first = engine.step(0.0)
    run = engine.step(first.end)
    assert run.pending and run.end == pytest.approx(first.end + 32 * DECODE_ITERATION, rel=0.01)
    engine.add_request("b", list(range(200, 264)), 1, first.end + 2.5 * DECODE_ITERATION)
    assert engine.can_admit()
    cut = engine.interrupt(first.end + 2.5 * DECODE_ITERATION)
    assert cut == pytest.approx(first.end + 3 * DECODE_ITERATION, rel=1e-6)
    assert engine.interrupt(first.end + 2.6 * DECODE_ITERATION) is None  # already that short
    done = engine.finish_decode_run()
    assert done.tokens == [] and engine.requests["a"].decode_iterations == 3
