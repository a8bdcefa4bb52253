"""LoRA adapters: what pods report, the affinity scorer and filter, and KV blocks keyed per adapter."""

from __future__ import annotations

import pytest

from scheduler.codec.kvevents import decode_batch, encode_batch
from scheduler.codec.prom import parse_endpoint_metrics, parse_endpoint_metrics_reference
from scheduler.core.events import BlockStored, EventBatch
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulingRequest
from scheduler.core.scoring import (
    EndpointState,
    LoraSlots,
    PickRequest,
    SchedulingPipeline,
    ScorerWeights,
    ScoringConfig,
)

BLOCK = 16


def _ep(i: int, lora: LoraSlots | None, **fields: object) -> EndpointState:
    values: dict[str, object] = {"name": f"p{i}", "address": f"10.0.0.{i}:8000", "metrics_age_s": 0.1}
    values.update(fields)
    return EndpointState(lora=lora, **values)  # type: ignore[arg-type]


def _slots(running: str = "", waiting: str = "", max_lora: int = 2) -> LoraSlots:
    return LoraSlots(
        frozenset(filter(None, running.split(","))), frozenset(filter(None, waiting.split(","))), max_lora
    )


def _req(adapter: str | None, request_id: str = "r1") -> PickRequest:
    return PickRequest(request_id, 4, 64, adapter=adapter)


# --- scorer and filter ---------------------------------------------------------------------


def test_the_adapter_goes_where_it_is_resident_then_to_a_free_slot() -> None:
    endpoints = [
        _ep(1, _slots("x,y")),  # both slots busy with other adapters
        _ep(2, _slots("x")),  # a slot free
        _ep(3, _slots("a", max_lora=2)),  # adapter a running there
        _ep(4, _slots("", "a")),  # a request for a waits there: a is loading or loaded
    ]
    pipeline = SchedulingPipeline()
    decision = pipeline.pick(_req("a"), endpoints, {})
    assert decision.scores["lora_affinity"] == [0.5, 1.0, 1.0]  # p2, p3, p4
    assert decision.primary in ("p3", "p4")
    # Busy with others while other pods can take it: left out, not merely scored low.
    assert decision.filtered == {"p1": "every LoRA slot busy with other adapters"}
    fresh = pipeline.pick(_req("b"), endpoints[:2], {})
    assert fresh.endpoints == ["p2"]


def test_an_adapter_kvsched_routed_lately_beats_a_cold_free_slot() -> None:
    warm = LoraSlots(frozenset(), frozenset(), 2, recent=frozenset({"a"}))
    decision = SchedulingPipeline().pick(_req("a"), [_ep(1, _slots()), _ep(2, warm)], {})
    assert decision.scores["lora_affinity"] == [0.5, 0.8]
    assert decision.primary == "p2"


def test_when_every_pod_is_busy_with_other_adapters_all_stay_candidates() -> None:
    endpoints = [_ep(1, _slots("x,y")), _ep(2, _slots("z,w"))]
    decision = SchedulingPipeline().pick(_req("a"), endpoints, {})
    assert sorted(decision.endpoints) == ["p1", "p2"] and decision.filtered == {}


def test_affinity_sits_out_requests_for_the_base_model() -> None:
    endpoints = [_ep(1, _slots("x,y"), inflight_requests=1), _ep(2, _slots(), inflight_requests=3)]
    with_affinity = SchedulingPipeline().pick(_req(None), endpoints, {})
    without = SchedulingPipeline(ScoringConfig(weights=ScorerWeights(lora_affinity=0))).pick(
        _req(None), endpoints, {}
    )
    assert "lora_affinity" not in with_affinity.weights and with_affinity.filtered == {}
    assert with_affinity.totals == without.totals
    assert with_affinity.endpoints == without.endpoints


def test_weight_zero_turns_affinity_and_its_filter_off() -> None:
    endpoints = [_ep(1, _slots("x,y")), _ep(2, _slots("a"))]
    off = SchedulingPipeline(ScoringConfig(weights=ScorerWeights(lora_affinity=0)))
    decision = off.pick(_req("a"), endpoints, {})
    assert decision.filtered == {} and "lora_affinity" not in decision.weights


# --- what pods report ------------------------------------------------------------------------

# vLLM's page (vllm/v1/metrics/loggers.py): one series per label set it has been in, each
# holding the time it was last current; the adapters are comma-separated names.
_LORA = 'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{}",waiting_lora_adapters="{}"}} {}'
PAGE = "\n".join(
    [
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0',
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25',
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        _LORA.format("sql-lora,chat-lora", "", "1.7650000e+09"),
        _LORA.format("sql-lora", "tool-lora", "1.7650001e+09"),
        _LORA.format("", "", "1.7640000e+09"),
        "",
    ]
)


@pytest.mark.parametrize("parse", [parse_endpoint_metrics, parse_endpoint_metrics_reference])
def test_the_newest_lora_series_is_what_a_pod_holds(parse: object) -> None:
    metrics = parse(PAGE)  # type: ignore[operator]
    assert metrics.lora == LoraSlots(frozenset({"sql-lora"}), frozenset({"tool-lora"}), 4)
    assert metrics.served_models == frozenset({"meta-llama/Llama-3.1-8B-Instruct"})
    assert (metrics.waiting, metrics.running) == (1, 3)


def test_a_pod_without_lora_reports_none_and_a_bad_max_lora_loses_only_the_adapters() -> None:
    plain = PAGE.split("# HELP vllm:lora_requests_info")[0]
    assert parse_endpoint_metrics(plain).lora is None
    bad = (
        plain
        + 'vllm:lora_requests_info{max_lora="four",running_lora_adapters="a",waiting_lora_adapters=""} 1.0\n'
    )
    metrics = parse_endpoint_metrics(bad)
    assert metrics.lora is None and metrics.running == 3


# --- KV blocks keyed per adapter -----------------------------------------------------------


def _stored(tokens: list[int], lora: str | None) -> EventBatch:
    blocks = len(tokens) // BLOCK
    hashes = [1000 + i + (0 if lora is None else 100 * len(lora)) for i in range(blocks)]
    event = BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=tokens,
        block_size=BLOCK,
        # vLLM sets both for a LoRA request's blocks, and puts the adapter's name first in
        # each block's extra keys (vllm/v1/core/kv_cache_utils.py, _gen_lora_extra_hash_keys).
        lora_id=None if lora is None else 7,
        lora_name=lora,
        extra_keys=None if lora is None else [(lora,)] * blocks,
    )
    return EventBatch(1.0, [event])


TOKENS = list(range(64))


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("through_payload", [False, True])
def test_a_prefix_cached_for_one_adapter_never_counts_for_another(
    backend: str, through_payload: bool
) -> None:
    index = PrefixIndex(IndexConfig(block_size=BLOCK, backend=backend))  # type: ignore[arg-type]
    for worker, lora in (("sql-pod", "sql-lora"), ("base-pod", None)):
        batch = _stored(TOKENS, lora)
        if through_payload:
            payload = encode_batch(batch)
            applied = index.apply_payload(worker, payload)
            if applied is None:  # the kernel leaves it to the codec, as ingest does then
                index.apply_batch(worker, decode_batch(payload).batch)
        else:
            index.apply_batch(worker, batch)
    assert set(index.match(index.request_keys(TOKENS, adapter="sql-lora"))) == {"sql-pod"}
    assert set(index.match(index.request_keys(TOKENS))) == {"base-pod"}
    assert index.match(index.request_keys(TOKENS, adapter="chat-lora")) == {}
    assert index.match(index.request_keys(TOKENS, adapter="sql-lora"))["sql-pod"].total_blocks == 4


def test_in_vllm_hash_mode_a_request_hashes_with_its_adapter_as_vllm_does() -> None:
    index = PrefixIndex(IndexConfig(block_size=BLOCK, hash_mode="vllm"))
    # vLLM's wire hashes of an adapter's blocks: its name as every block's extra key.
    hashes = index.request_keys(TOKENS, extra_keys=[("sql-lora",)] * 4)
    index.apply_batch(
        "sql-pod",
        EventBatch(1.0, [BlockStored(list(hashes), None, TOKENS, BLOCK, 7, lora_name="sql-lora")]),
    )
    assert set(index.match(index.request_keys(TOKENS, adapter="sql-lora"))) == {"sql-pod"}
    assert index.match(index.request_keys(TOKENS)) == {}


# --- the scheduler ------------------------------------------------------------------------


def _scheduler(lora: bool = True) -> Scheduler:
    scheduler = Scheduler()
    scheduler.set_endpoints([Endpoint(f"p{i}", f"10.0.0.{i}:8000", kv_events="tcp://x") for i in (1, 2)], 0.0)
    for i in (1, 2):
        slots = LoraSlots(max_lora=1) if lora else None
        scheduler.update_metrics(
            f"p{i}", EndpointMetrics(0, 0, 0.1, lora=slots, served_models=frozenset({"base"})), 0.0
        )
    return scheduler


def test_a_model_is_an_adapter_when_the_pool_serves_lora_and_it_is_no_pods_base_model() -> None:
    scheduler = _scheduler()
    assert scheduler.adapter_of("sql-lora") == "sql-lora"
    assert scheduler.adapter_of("base") is None and scheduler.adapter_of(None) is None
    assert _scheduler(lora=False).adapter_of("sql-lora") is None


def test_kvsched_counts_its_own_in_flight_adapters_before_the_next_scrape() -> None:
    scheduler = _scheduler()
    first = scheduler.pick(SchedulingRequest("r1", TOKENS, model="sql-lora"), 0.1)
    chosen = first.endpoints[0]
    name = "p1" if chosen.endswith(".1:8000") else "p2"
    state = scheduler.endpoint_state(name, 0.1)
    assert state.lora is not None and state.lora.running == frozenset({"sql-lora"})
    # That pod's one slot is now busy with sql-lora: another adapter goes to the other pod.
    other = scheduler.pick(SchedulingRequest("r2", TOKENS, model="chat-lora"), 0.1)
    assert other.endpoints[0] != chosen
    # And the same adapter follows the first.
    again = scheduler.pick(SchedulingRequest("r3", TOKENS, model="sql-lora"), 0.1)
    assert again.endpoints[0] == chosen
    scheduler.on_completed("r1", 0.2)
    scheduler.on_completed("r3", 0.2)
    after = scheduler.endpoint_state(name, 0.2).lora
    assert after is not None and after.running == frozenset() and after.recent == frozenset({"sql-lora"})
