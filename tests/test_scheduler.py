"""The Scheduler facade: endpoints, health, in-flight accounting, prefix-aware picks."""

from __future__ import annotations

from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import (
    ApproximateConfig,
    Endpoint,
    EndpointMetrics,
    HealthConfig,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)

BLOCK = 16


def _endpoints(n: int, *, kv_events: bool = True) -> list[Endpoint]:
    return [
        Endpoint(
            name=f"10.0.0.{i}:8000",
            address=f"10.0.0.{i}:8000",
            kv_events=f"tcp://10.0.0.{i}:5557" if kv_events else None,
        )
        for i in range(1, n + 1)
    ]


def _scheduler(n: int = 4, *, kv_events: bool = True, **config: object) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(index=IndexConfig(block_size=BLOCK), **config))  # type: ignore[arg-type]
    scheduler.set_endpoints(_endpoints(n, kv_events=kv_events), now=0.0)
    for endpoint in scheduler.endpoints():
        scheduler.update_metrics(endpoint.name, EndpointMetrics(waiting=0, running=0, kv_usage=0.1), now=0.0)
    return scheduler


def _store(scheduler: Scheduler, worker: str, tokens: list[int], hashes: list[int]) -> None:
    event = BlockStored(hashes, None, tokens, BLOCK, medium=Tier.GPU)
    result = scheduler.index.apply_batch(worker, EventBatch(0.0, [event]))
    assert result.stored == len(hashes)


def test_pick_prefers_the_endpoint_holding_the_prefix() -> None:
    scheduler = _scheduler()
    prompt = list(range(1, 8 * BLOCK + 1))
    _store(scheduler, "10.0.0.3:8000", prompt, list(range(100, 108)))
    result = scheduler.pick(SchedulingRequest("r1", [*prompt, 7, 7, 7]), now=1.0)
    assert result.status == "ok"
    assert result.endpoints[0] == "10.0.0.3:8000"
    assert len(result.endpoints) == 1 + scheduler.config.scoring.num_fallbacks
    assert len(set(result.endpoints)) == len(result.endpoints)


def test_inflight_accounting_follows_the_request_lifecycle() -> None:
    scheduler = _scheduler(2)
    prompt = list(range(1, 4 * BLOCK + 1))
    result = scheduler.pick(SchedulingRequest("r1", prompt), now=1.0)
    primary = result.endpoints[0]
    assert scheduler.inflight(primary) == (1, len(prompt))
    scheduler.on_first_token("r1", now=1.5)
    assert scheduler.inflight(primary) == (1, 0)
    done = scheduler.on_completed("r1", now=3.0, cached_tokens=16, completion_tokens=5)
    assert done is not None
    assert done.ttft_s == 0.5 and done.e2e_s == 2.0 and done.cached_tokens == 16
    assert scheduler.inflight(primary) == (0, 0)
    # Completing twice, or an unknown request, changes nothing.
    assert scheduler.on_completed("r1", now=4.0) is None
    assert scheduler.inflight(primary) == (0, 0)


def test_served_endpoint_moves_the_accounting() -> None:
    scheduler = _scheduler(2)
    result = scheduler.pick(SchedulingRequest("r1", list(range(1, 33))), now=0.0)
    primary, fallback = result.endpoints[0], result.endpoints[1]
    scheduler.on_served_by("r1", fallback, now=0.1)
    assert scheduler.inflight(primary) == (0, 0)
    assert scheduler.inflight(fallback) == (1, 32)
    scheduler.on_failed("r1", now=1.0)
    assert scheduler.inflight(fallback) == (0, 0)


def test_load_spreads_requests_that_share_only_a_common_first_block() -> None:
    # Every request shares block 0 (as in the Mooncake trace): ties must not pile onto one endpoint.
    scheduler = _scheduler(4)
    shared = list(range(1, BLOCK + 1))
    for worker in ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"):
        _store(scheduler, worker, shared, [1])
    chosen = [
        scheduler.pick(SchedulingRequest(f"r{i}", shared + [1000 + i] * BLOCK), now=float(i)).endpoints[0]
        for i in range(8)
    ]
    assert len(set(chosen)) == 4


def test_unhealthy_endpoint_is_not_picked_and_recovers() -> None:
    scheduler = _scheduler(2, health=HealthConfig(unhealthy_after_failures=2))
    bad = "10.0.0.1:8000"
    scheduler.record_scrape_failure(bad, "connection refused", now=1.0)
    assert scheduler.is_healthy(bad)
    scheduler.record_scrape_failure(bad, "connection refused", now=2.0)
    assert not scheduler.is_healthy(bad)
    for i in range(5):
        result = scheduler.pick(SchedulingRequest(f"r{i}", list(range(1, 33))), now=3.0)
        assert bad not in result.endpoints
    scheduler.update_metrics(bad, EndpointMetrics(0, 0, 0.0), now=4.0)
    assert scheduler.is_healthy(bad)


def test_no_endpoints_and_removed_endpoints() -> None:
    scheduler = _scheduler(2)
    _store(scheduler, "10.0.0.1:8000", list(range(1, 17)), [5])
    diff = scheduler.set_endpoints([*_endpoints(1)[1:], _endpoints(2)[1]], now=1.0)
    assert [e.name for e in diff.removed] == ["10.0.0.1:8000"]
    assert scheduler.index.worker_blocks("10.0.0.1:8000") == 0
    scheduler.set_endpoints([], now=2.0)
    result = scheduler.pick(SchedulingRequest("r", [1, 2, 3]), now=3.0)
    assert result.status == "no_endpoints" and result.endpoints == []
    assert result.reason


def test_fallback_pick_is_least_loaded_healthy() -> None:
    scheduler = _scheduler(3)
    scheduler.update_metrics("10.0.0.1:8000", EndpointMetrics(waiting=9, running=3, kv_usage=0.5), now=0.0)
    scheduler.update_metrics("10.0.0.2:8000", EndpointMetrics(waiting=1, running=3, kv_usage=0.5), now=0.0)
    scheduler.update_metrics("10.0.0.3:8000", EndpointMetrics(waiting=4, running=3, kv_usage=0.5), now=0.0)
    order = scheduler.fallback_pick(SchedulingRequest("r", [1, 2, 3]))
    assert order == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.1:8000"]
    subset = scheduler.fallback_pick(SchedulingRequest("r", [1], subset=frozenset({"10.0.0.1:8000"})))
    assert subset == ["10.0.0.1:8000"]


def test_approximate_mode_learns_from_routing_and_expires() -> None:
    scheduler = _scheduler(4, kv_events=False, approximate=ApproximateConfig(ttl_s=10.0))
    prompt = list(range(1, 6 * BLOCK + 1))
    first = scheduler.pick(SchedulingRequest("a", prompt), now=0.0).endpoints[0]
    scheduler.on_completed("a", now=0.5)
    # The same prefix follows the first request while the assumed cache entry lives...
    again = scheduler.pick(SchedulingRequest("b", prompt + [9] * BLOCK), now=5.0).endpoints[0]
    assert again == first
    scheduler.on_completed("b", now=5.5)
    assert scheduler.index.worker_blocks(first) >= 6
    # ...and is forgotten after the TTL.
    scheduler.pick(SchedulingRequest("c", [4242] * BLOCK), now=100.0)
    assert first not in scheduler.index.match_tokens(prompt)


def test_reload_swaps_scoring_atomically() -> None:
    scheduler = _scheduler(2)
    new_scoring = scheduler.config.scoring.model_copy(update={"num_fallbacks": 0})
    scheduler.reload(scheduler.config.model_copy(update={"scoring": new_scoring}))
    result = scheduler.pick(SchedulingRequest("r", list(range(1, 33))), now=1.0)
    assert len(result.endpoints) == 1
