"""In-flight load shared between replicas: what a peer routed counts where it went, and no
lost, late or repeated message, restart or partition leaves load that is not there."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.metrics import KvschedCollector
from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig
from scheduler.core.peerload import PeerSyncConfig, Placed, SyncMessage
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
    SpeculativeConfig,
)

BLOCK = 16
E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"


def _replica(name: str, incarnation: int = 1, **sync: object) -> Scheduler:
    config = SchedulerConfig(
        index=IndexConfig(block_size=BLOCK),
        sync=PeerSyncConfig(enabled=True, **sync),  # type: ignore[arg-type]
    )
    replica = Scheduler(config)
    replica.set_endpoints([Endpoint(E1, E1, kv_events="tcp://a"), Endpoint(E2, E2, kv_events="tcp://b")], 0.0)
    for endpoint in (E1, E2):
        replica.update_metrics(endpoint, EndpointMetrics(0, 0, 0.0), 0.0)
    replica.start_sync(name, incarnation)
    return replica


def _deliver(messages: list[SyncMessage], to: Scheduler, now: float) -> None:
    for message in messages:
        to.receive_sync(message, now)


def _route(replica: Scheduler, request_id: str, now: float, tokens: int = 64, first: int = 1) -> str:
    prompt = list(range(first, first + tokens))
    pick = replica.pick(SchedulingRequest(request_id, prompt, max_tokens=8), now)
    assert pick.status == "ok"
    return pick.endpoints[0]


def _load(replica: Scheduler, endpoint: str, now: float) -> int:
    return replica.endpoint_state(endpoint, now).inflight_requests


def test_a_peers_request_counts_on_its_endpoint_and_leaves_with_its_release() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = _route(a, "r1", 1.0, tokens=640)
    _deliver(a.take_sync_messages(), b, 1.001)
    state = b.endpoint_state(chosen, 1.001)
    assert state.inflight_requests == 1 and state.inflight_prefill_tokens == 640
    assert state.queued_prefill_tokens > 0
    # b, seeing a's request there, sends an unrelated one elsewhere (both endpoints idle otherwise).
    assert _route(b, "r2", 1.002, tokens=640, first=10_000) != chosen
    a.on_first_token("r1", 1.2)
    _deliver(a.take_sync_messages(), b, 1.201)
    assert b.endpoint_state(chosen, 1.201).inflight_prefill_tokens == 0
    assert _load(b, chosen, 1.201) == 1  # decoding still
    a.on_completed("r1", 1.5)
    _deliver(a.take_sync_messages(), b, 1.501)
    assert _load(b, chosen, 1.501) == 0


def test_a_peers_speculative_placement_draws_the_same_prefix_until_events_settle_it() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = _route(a, "r1", 1.0, tokens=640)
    assert a.speculative_placements == 1
    _deliver(a.take_sync_messages(), b, 1.001)
    # b assumes what a assumes: the prompt's 40 blocks will be cached where a sent it, so a
    # request sharing that prefix follows it despite a's load there.
    assert b.speculative_placements == 1
    assert _route(b, "r2", 1.002, tokens=800) == chosen
    # a's first token makes the endpoint's events due; a batch that still does not show
    # the blocks contradicts the placement on b as on a.
    a.on_first_token("r1", 1.2)
    _deliver(a.take_sync_messages(), b, 1.201)
    late = 1.201 + b.config.speculative.events_within_s + 0.01
    b.on_kv_batch(chosen, late)
    assert b.speculative_placements == 1  # b's own placement of r2 is not due yet
    assert b.speculative_outcomes["contradicted"] >= 1


def test_a_placement_widened_after_the_pick_reaches_the_peers() -> None:
    """A text prompt picked from its leading ids is placed whole after the answer; a peer
    hears of the wider placement, so its next request sharing the longer prefix follows."""
    a, b = _replica("a"), _replica("b")
    whole = list(range(1, 16 * 40 + 1))
    leading = whole[: 16 * 4]
    pick = a.pick(SchedulingRequest("r1", leading, max_tokens=8, untokenized_tokens=16 * 36), 1.0)
    chosen = pick.endpoints[0]
    _deliver(a.take_sync_messages(), b, 1.001)
    # b knows only the leading blocks' placement: the longer prefix is held nowhere, so b
    # sends a request sharing it to the other, idle endpoint.
    assert not b.prefix_held(whole[: 16 * 20])
    assert a.place_whole_prompt("r1", whole, 1.002)
    (placed,) = a.take_sync_messages()
    assert isinstance(placed.body, Placed) and len(placed.body.placed_keys) == 40
    _deliver([placed], b, 1.003)
    assert b.prefix_held(whole)
    assert _route(b, "r2", 1.004, tokens=16 * 44) == chosen
    # Applied twice, still one placement.
    _deliver([placed], b, 1.005)
    assert b.speculative_placements == 2  # a's r1 and b's own r2


def test_a_placement_widened_after_the_first_token_is_due_when_the_first_was() -> None:
    """Widened after the first token (a long prompt tokenised on a worker thread), the peer's
    placement keeps the time the endpoint's events were due by: a batch after it that does
    not show the blocks contradicts it, as on the replica that routed it."""
    a, b = _replica("a"), _replica("b")
    whole = list(range(1, 16 * 40 + 1))
    chosen = a.pick(
        SchedulingRequest("r1", whole[:64], max_tokens=8, untokenized_tokens=16 * 36), 1.0
    ).endpoints[0]
    a.on_first_token("r1", 1.1)
    assert a.place_whole_prompt("r1", whole, 1.15)
    _deliver(a.take_sync_messages(), b, 1.151)
    late = 1.1 + b.config.speculative.events_within_s + 0.1
    b.on_kv_batch(chosen, late)
    assert b.speculative_outcomes["contradicted"] == 1 and not b.prefix_held(whole)


def test_a_widened_placement_after_the_request_ended_places_nothing() -> None:
    a, b = _replica("a"), _replica("b")
    whole = list(range(1, 16 * 40 + 1))
    a.pick(SchedulingRequest("r1", whole[:64], max_tokens=8, untokenized_tokens=16 * 36), 1.0)
    routed = a.take_sync_messages()
    assert a.place_whole_prompt("r1", whole, 1.002)
    placed = a.take_sync_messages()
    a.on_first_token("r1", 1.1)
    a.on_completed("r1", 1.2)
    released = a.take_sync_messages()
    # Reordered: the release overtakes the placement.
    _deliver(routed + released, b, 1.3)
    _deliver(placed, b, 1.301)
    assert not b.prefix_held(whole)
    assert b.peer_load.stats.received == 4


def test_without_speculative_placement_routings_carry_no_keys() -> None:
    config = SchedulerConfig(
        index=IndexConfig(block_size=BLOCK),
        sync=PeerSyncConfig(enabled=True),
        speculative=SpeculativeConfig(enabled=False),
    )
    a = Scheduler(config)
    a.set_endpoints([Endpoint(E1, E1, kv_events="tcp://a")], 0.0)
    a.update_metrics(E1, EndpointMetrics(0, 0, 0.0), 0.0)
    a.start_sync("a", 1)
    _route(a, "r1", 1.0, tokens=640)
    (routed,) = a.take_sync_messages()
    assert routed.body.placed_keys == ()  # type: ignore[union-attr]


def test_messages_applied_twice_count_once() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = _route(a, "r1", 1.0)
    messages = a.take_sync_messages()
    _deliver(messages, b, 1.001)
    _deliver(messages, b, 1.002)
    assert _load(b, chosen, 1.002) == 1
    assert b.peer_load.stats.duplicates == 1


def test_a_lost_release_is_reclaimed_by_the_next_snapshot() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = _route(a, "r1", 1.0)
    _deliver(a.take_sync_messages(), b, 1.001)
    a.on_completed("r1", 1.2)
    a.take_sync_messages()  # the release is lost
    assert _load(b, chosen, 1.3) == 1
    a.send_snapshot(2.0)
    _deliver(a.take_sync_messages(), b, 2.001)
    assert _load(b, chosen, 2.001) == 0
    assert b.peer_load.stats.reclaimed == {"snapshot": 1}
    assert b.peer_load.stats.lost == 1  # the sequence gap the release left


def test_a_lost_routing_is_added_by_the_next_snapshot_and_a_late_copy_changes_nothing() -> None:
    a, b = _replica("a"), _replica("b")
    chosen = _route(a, "r1", 1.0)
    late = a.take_sync_messages()  # lost on the way (or late: it comes after the snapshot)
    assert _load(b, chosen, 1.1) == 0
    a.send_snapshot(2.0)
    _deliver(a.take_sync_messages(), b, 2.001)
    assert _load(b, chosen, 2.001) == 1
    a.on_completed("r1", 2.1)
    _deliver(a.take_sync_messages(), b, 2.101)
    _deliver(late, b, 2.2)
    assert _load(b, chosen, 2.2) == 0


def test_a_lost_release_expires_after_the_bound_its_predicted_latency_sets() -> None:
    a = _replica("a", min_ttl_s=2.0, ttl_factor=3.0)  # short-lived entries
    b = _replica("b", snapshot_interval_s=1000.0, peer_timeout_s=1000.0)
    chosen = _route(a, "r1", 1.0)
    (routed,) = a.take_sync_messages()
    _deliver([routed], b, 1.001)
    ttl = routed.body.ttl_s  # type: ignore[union-attr]
    assert ttl >= 2.0
    # The release is lost and no snapshot comes: the entry outlives its bound by nothing.
    b.peer_load.expire(1.001 + ttl - 0.01)
    assert _load(b, chosen, 1.001 + ttl - 0.01) == 1
    b.peer_load.expire(1.001 + ttl + 0.01)
    assert _load(b, chosen, 1.001 + ttl + 0.01) == 0
    assert b.peer_load.stats.reclaimed["expired"] == 1


def test_a_restarted_replica_is_not_counted_twice() -> None:
    long_lived = {"min_ttl_s": 600.0, "default_ttl_s": 600.0}
    a, b = _replica("a", incarnation=1, **long_lived), _replica("b")
    _route(a, "r1", 1.0)
    before_crash = a.take_sync_messages()
    _deliver(before_crash, b, 1.001)
    # a is killed: its streams die, the gateway sends the request again (a new stream) and
    # it reaches the restarted a, whose first message b hears at once.
    restarted = _replica("a", incarnation=2, **long_lived)
    second = _route(restarted, "r1-retry", 3.0)
    _deliver(restarted.take_sync_messages(), b, 3.001)
    assert sum(_load(b, e, 3.001) for e in (E1, E2)) == 1
    assert b.peer_load.stats.restarts == 1 and b.peer_load.stats.reclaimed == {"restart": 1}
    # The old incarnation's message arriving late changes nothing.
    _deliver(before_crash, b, 3.1)
    assert sum(_load(b, e, 3.1) for e in (E1, E2)) == 1
    assert _load(b, second, 3.1) == 1 and b.peer_load.stats.stale_incarnation == 1


def test_a_partitioned_replicas_load_is_dropped_after_the_peer_timeout() -> None:
    a, b = _replica("a", peer_timeout_s=5.0, default_ttl_s=600.0, min_ttl_s=600.0), _replica("b")
    chosen = _route(a, "r1", 1.0)
    _deliver(a.take_sync_messages(), b, 1.001)
    # a is cut off: it completes r1 and keeps sending snapshots, none of which reach b.
    a.on_completed("r1", 1.5)
    for t in range(2, 7):
        a.send_snapshot(float(t))
    a.take_sync_messages()
    b.peer_load.expire(5.9)
    assert _load(b, chosen, 5.9) == 1
    b.peer_load.expire(6.1)
    assert _load(b, chosen, 6.1) == 0
    assert b.peer_load.peers() == [] and b.peer_load.stats.reclaimed == {"peer_timeout": 1}


def test_a_scrape_reclaims_overdue_peer_load_the_endpoint_does_not_have() -> None:
    # Entries live 8 s and are due (their predicted completion) 2 s after they arrive.
    a = _replica("a", default_ttl_s=8.0, min_ttl_s=8.0, ttl_factor=4.0)
    b = _replica("b", reconcile_grace_s=0.5, ttl_factor=4.0)
    chosen = _route(a, "r1", 1.0)
    _deliver(a.take_sync_messages(), b, 1.0)
    # A scrape too soon after the routing proves nothing: the request may not be there yet;
    # nor does one before the request is due (the scrape may trail its release by a step).
    for at in (1.2, 2.5):
        b.update_metrics(chosen, EndpointMetrics(0, 0, 0.0), at)
        assert _load(b, chosen, at) == 1
    # Past its predicted completion and the endpoint reports nothing: the release was lost.
    b.update_metrics(chosen, EndpointMetrics(0, 0, 0.0), 3.5)
    assert _load(b, chosen, 3.5) == 0
    assert b.peer_load.stats.reclaimed == {"reconciled": 1}
    # One that the endpoint does report stays.
    second = _route(a, "r2", 4.0)
    _deliver(a.take_sync_messages(), b, 4.0)
    b.update_metrics(second, EndpointMetrics(0, 1, 0.1), 7.0)
    assert _load(b, second, 7.0) == 1


def test_sync_off_sends_and_counts_nothing() -> None:
    a = Scheduler(SchedulerConfig(index=IndexConfig(block_size=BLOCK)))
    a.set_endpoints([Endpoint(E1, E1, kv_events="tcp://a")], 0.0)
    _route(a, "r1", 1.0)
    a.send_snapshot(1.0)
    assert a.take_sync_messages() == []


def test_sampled_routings_measure_agreement_between_replicas() -> None:
    a, b = _replica("a", agreement_sample_every=1), _replica("b", agreement_sample_every=1)
    prompt = list(range(1, 161))
    event = BlockStored(list(range(500, 510)), None, prompt, BLOCK, medium=Tier.GPU)
    for replica in (a, b):  # both hear the same KV event: E2 holds the prompt's prefix
        replica.index.apply_batch(E2, EventBatch(0.0, [event]))
    pick = a.pick(SchedulingRequest("r1", [*prompt, 1, 2, 3], max_tokens=8), 1.0)
    assert pick.endpoints[0] == E2
    (routed,) = a.take_sync_messages()
    assert len(routed.body.sample_keys) == 10  # type: ignore[union-attr]
    _deliver([routed], b, 1.001)
    assert (b.peer_load.stats.agreement_samples, b.peer_load.stats.agreement_same) == (1, 1)
    # b's view differs (E2 lost the prefix there only): it would have picked otherwise.
    b.index.remove_worker(E2)
    a.pick(SchedulingRequest("r2", [*prompt, 4, 5, 6], max_tokens=8), 1.1)
    _deliver(a.take_sync_messages(), b, 1.101)
    assert (b.peer_load.stats.agreement_samples, b.peer_load.stats.agreement_same) == (2, 1)


def test_sync_figures_are_exposed_to_prometheus() -> None:
    a, b = _replica("a"), _replica("b")
    _route(a, "r1", 1.0)
    _deliver(a.take_sync_messages(), b, 1.25)
    a.on_completed("r1", 1.5)
    a.take_sync_messages()  # lost
    a.send_snapshot(2.0)
    _deliver(a.take_sync_messages(), b, 2.0)
    registry = CollectorRegistry()
    registry.register(KvschedCollector(b, clock=lambda: 2.0))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples[("kvsched_sync_peers", ())] == 1
    assert samples[("kvsched_sync_messages_lost_total", ())] == 1
    assert samples[("kvsched_sync_phantom_reclaimed_total", (("how", "snapshot"),))] == 1
    assert samples[("kvsched_sync_lag_seconds_total", ())] == pytest.approx(0.25)
    assert samples[("kvsched_sync_peer_inflight", ())] == 0
