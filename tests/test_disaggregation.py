"""Prefill/decode disaggregation in the Scheduler: roles, the two picks, the threshold, accounting."""

from __future__ import annotations

import pytest

from scheduler.adapters.discovery import EndpointDefaults
from scheduler.adapters.kubernetes.pools import PoolSpec, pod_endpoints
from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest
from scheduler.core.scoring.disaggregation import (
    ROLE_LABEL,
    DisaggregationConfig,
    serves_decode,
    serves_prefill,
)

BLOCK = 16
PROMPT = list(range(1, 8 * BLOCK + 1))


def _scheduler(roles: dict[str, str | None], **disaggregation: object) -> Scheduler:
    config = SchedulerConfig(
        index=IndexConfig(block_size=BLOCK),
        disaggregation=DisaggregationConfig(enabled=True, **disaggregation),  # type: ignore[arg-type]
    )
    scheduler = Scheduler(config)
    endpoints = [
        Endpoint(
            name=name,
            address=name,
            kv_events=f"tcp://{name}",
            labels={} if role is None else {ROLE_LABEL: role},
        )
        for name, role in roles.items()
    ]
    scheduler.set_endpoints(endpoints, now=0.0)
    for endpoint in endpoints:
        scheduler.update_metrics(endpoint.name, EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=0.0)
    return scheduler


def _store(scheduler: Scheduler, worker: str, blocks: int) -> None:
    event = BlockStored(
        list(range(100, 100 + blocks)), None, PROMPT[: blocks * BLOCK], BLOCK, medium=Tier.GPU
    )
    scheduler.index.apply_batch(worker, EventBatch(0.0, [event]))


POOL = {"p1": "prefill", "p2": "prefill", "d1": "decode", "d2": "decode"}


def test_roles_follow_llm_d_label_rules() -> None:
    assert serves_prefill({ROLE_LABEL: "prefill"}) and not serves_decode({ROLE_LABEL: "prefill"})
    assert serves_decode({ROLE_LABEL: "decode"}) and not serves_prefill({ROLE_LABEL: "decode"})
    for both in ("both", "prefill-decode"):
        assert serves_prefill({ROLE_LABEL: both}) and serves_decode({ROLE_LABEL: both})
    # An unlabelled pod decodes but is never a prefill pod (llm-d's pd_role.go).
    assert serves_decode({}) and not serves_prefill({})


def test_the_pod_label_travels_with_the_endpoint() -> None:
    pod = {
        "metadata": {"name": "vllm-0", "namespace": "ns", "labels": {"app": "vllm", ROLE_LABEL: "prefill"}},
        "status": {"podIP": "10.1.0.5"},
    }
    pool = PoolSpec("ns", "pool", {"app": "vllm"}, (8000,))
    (endpoint,) = pod_endpoints(pool, pod, EndpointDefaults(kv_events=False))
    assert endpoint.labels[ROLE_LABEL] == "prefill"


def test_decode_pod_is_the_destination_and_prefill_goes_to_the_cache_holder() -> None:
    scheduler = _scheduler(POOL)
    _store(scheduler, "p2", 8)
    result = scheduler.pick(SchedulingRequest("r1", [*PROMPT, 5, 5]), now=1.0)
    assert result.status == "ok"
    assert result.endpoints[0] in ("d1", "d2")
    assert set(result.endpoints) <= {"d1", "d2"}  # fallbacks decode too
    assert result.prefill_endpoint == "p2"
    assert result.explanation["prefill"]["endpoint"] == "p2"


def test_decode_pod_is_picked_by_decode_load_and_free_kv() -> None:
    scheduler = _scheduler(POOL)
    # d1 holds the prompt's prefix but is busy and full; the KV arrives from the prefill pod,
    # so the decode pick goes to the idle d2.
    _store(scheduler, "d1", 8)
    scheduler.update_metrics("d1", EndpointMetrics(waiting=6, running=30, kv_usage=0.9), now=0.0)
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.endpoints[0] == "d2"
    assert result.prefill_endpoint in ("p1", "p2")


def test_prefill_pick_weighs_the_prefill_queue() -> None:
    scheduler = _scheduler(POOL)
    for i in range(4):
        scheduler.pick(SchedulingRequest(f"busy{i}", [9000 + i] * 400), now=0.5)
    loads = {name: scheduler.inflight(name)[1] for name in ("p1", "p2")}
    # Four long prefills spread over both prefill pods rather than piling on one.
    assert min(loads.values()) > 0
    assert scheduler.inflight("d1")[1] == scheduler.inflight("d2")[1] == 0


def test_accounting_charges_prefill_to_the_prefill_pod_and_decode_to_the_decode_pod() -> None:
    scheduler = _scheduler(POOL)
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    decode, prefill = result.endpoints[0], result.prefill_endpoint
    assert prefill is not None
    assert scheduler.inflight(prefill) == (1, len(PROMPT))
    assert scheduler.inflight(decode) == (1, 0)
    assert scheduler.endpoint_state(decode, 1.0).inflight_decode_requests == 1
    scheduler.on_first_token("r1", now=1.4)
    assert scheduler.inflight(prefill) == (0, 0)
    assert scheduler.inflight(decode) == (1, 0)
    done = scheduler.on_completed("r1", now=3.0, completion_tokens=10)
    assert done is not None and done.endpoint == decode and done.ttft_s == pytest.approx(0.4)
    assert scheduler.inflight(decode) == (0, 0)


def test_a_failed_request_releases_both_pods() -> None:
    scheduler = _scheduler(POOL)
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.prefill_endpoint is not None
    scheduler.on_failed("r1", now=1.1)
    for name in POOL:
        assert scheduler.inflight(name) == (0, 0)


def test_a_short_uncached_part_skips_the_prefill_pod() -> None:
    scheduler = _scheduler({"p1": "prefill", "d1": "decode"}, non_cached_tokens_threshold=64)
    _store(scheduler, "d1", 6)  # 96 of 128 tokens cached on the decode pod: 32 uncached
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.endpoints[0] == "d1"
    assert result.prefill_endpoint is None
    assert scheduler.inflight("d1") == (1, 32)
    assert scheduler.inflight("p1") == (0, 0)
    # The same prompt with nothing cached is over the threshold: prefill pod.
    long = scheduler.pick(SchedulingRequest("r2", [7, *PROMPT]), now=1.0)
    assert long.prefill_endpoint == "p1"


def test_the_default_threshold_always_uses_a_prefill_pod() -> None:
    assert DisaggregationConfig().non_cached_tokens_threshold == 0
    scheduler = _scheduler({"p1": "prefill", "d1": "decode"})
    _store(scheduler, "d1", 8)
    result = scheduler.pick(SchedulingRequest("r1", [*PROMPT, 1]), now=1.0)
    assert result.prefill_endpoint == "p1"


def test_off_or_without_prefill_pods_every_pod_serves_whole() -> None:
    scheduler = _scheduler({"d1": "decode", "b1": "both", "n1": None})
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.prefill_endpoint is None
    assert scheduler.inflight(result.endpoints[0]) == (1, len(PROMPT))
    off = Scheduler(SchedulerConfig(index=IndexConfig(block_size=BLOCK)))
    off.set_endpoints([Endpoint("p1", "p1", labels={ROLE_LABEL: "prefill"}), Endpoint("d1", "d1")], now=0.0)
    picked = off.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert picked.prefill_endpoint is None and len(picked.endpoints) == 2


def test_an_unhealthy_prefill_pool_leaves_the_decode_pod_to_prefill() -> None:
    scheduler = _scheduler({"p1": "prefill", "d1": "decode"})
    for _ in range(scheduler.config.health.unhealthy_after_failures):
        scheduler.record_scrape_failure("p1", "refused", now=0.5)
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.endpoints[0] == "d1" and result.prefill_endpoint is None
    assert scheduler.inflight("d1") == (1, len(PROMPT))


def test_a_both_pod_picked_for_prefill_and_decode_serves_whole() -> None:
    scheduler = _scheduler({"p1": "prefill", "b1": "both"})
    scheduler.update_metrics("p1", EndpointMetrics(waiting=100, running=40, kv_usage=0.5), now=0.0)
    _store(scheduler, "b1", 8)
    result = scheduler.pick(SchedulingRequest("r1", PROMPT), now=1.0)
    assert result.endpoints[0] == "b1"
    assert result.prefill_endpoint is None
    assert scheduler.inflight("p1") == (0, 0)


def test_a_scheduling_policy_sets_disaggregation() -> None:
    from scheduler.adapters.kubernetes.policy import PolicySettings

    spec = {
        "disaggregation": {
            "enabled": True,
            "nonCachedTokensThreshold": 32,
            "decodeWeights": {"queueDepth": 2, "kvUtilization": 0},
        }
    }
    config = PolicySettings.from_spec(spec).scheduler_config(SchedulerConfig())
    assert config.disaggregation.enabled
    assert config.disaggregation.non_cached_tokens_threshold == 32
    weights = config.disaggregation.decode_weights
    assert (weights["queue_depth"], weights["kv_utilization"], weights["prefix_overlap"]) == (2.0, 0.0, 0.0)
    # In a configuration file too, scorers a decode weight map leaves out weigh 0.
    alone = DisaggregationConfig.model_validate({"decode_weights": {"inflight_load": 1}}).decode_weights
    assert dict(alone) == {**dict.fromkeys(alone, 0.0), "inflight_load": 1.0}
    scheduler = _scheduler(POOL)
    scheduler.reload(config)
    assert scheduler.config.disaggregation.non_cached_tokens_threshold == 32
