"""Replicas picking at the same time: each counts the picks its peers are making meanwhile
and cannot have told it of yet, and takes its own slot of what one replica would do with
all of them; one replica decides exactly as before."""

from __future__ import annotations

from collections import Counter

from scheduler.core.index import IndexConfig
from scheduler.core.peerload import PeerLoad, PeerSyncConfig, Routed, Snapshot, SyncMessage
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulerConfig, SchedulingRequest
from scheduler.core.scoring import EndpointState, PickRequest, PrefixMatch, SchedulingPipeline

BLOCK = 16
LAG = 0.002  # the peers' messages arrive this long after they were sent


def _pods(count: int) -> list[str]:
    return [f"10.0.0.{i}:8000" for i in range(1, count + 1)]


def _replica(name: str, pods: list[str], **sync: object) -> Scheduler:
    config = SchedulerConfig(
        index=IndexConfig(block_size=BLOCK),
        sync=PeerSyncConfig(enabled=True, **sync),  # type: ignore[arg-type]
    )
    replica = Scheduler(config)
    replica.set_endpoints([Endpoint(pod, pod, kv_events=f"tcp://{pod}") for pod in pods], 0.0)
    for pod in pods:
        replica.update_metrics(pod, EndpointMetrics(0, 0, 0.0), 0.0)
    replica.start_sync(name, 1)
    return replica


def _introduce(replicas: list[Scheduler], now: float) -> None:
    """Every replica's snapshot reaches every other one LAG later: they know each other and
    the channel's lag."""
    for sender in replicas:
        sender.take_sync_messages()
        sender.send_snapshot(now)
        for message in sender.take_sync_messages():
            for target in replicas:
                if target is not sender:
                    target.receive_sync(message, now + LAG)


def _burst(replicas: list[Scheduler], per_replica: int, now: float) -> list[str]:
    """Each replica routes ``per_replica`` requests at ``now``, in turn (a gateway's
    round-robin), none of them hearing of the others' picks: the pods, in order."""
    picked = []
    for round_ in range(per_replica):
        for r, replica in enumerate(replicas):
            first = 1 + 10_000 * (round_ * len(replicas) + r)  # no prefix shared
            prompt = list(range(first, first + 640))
            pick = replica.pick(SchedulingRequest(f"{replica.peer_load.replica}-{round_}", prompt), now)
            assert pick.status == "ok"
            picked.append(pick.endpoints[0])
    return picked


def test_concurrent_picks_on_four_replicas_spread_as_one_replicas_would() -> None:
    pods = _pods(8)
    replicas = [_replica(f"replica-{i}", pods, spread_concurrent="always") for i in range(4)]
    _introduce(replicas, 1.0)
    picked = _burst(replicas, 2, 2.0)
    # One replica routing these 8 requests one after another puts one on each idle pod.
    assert len(set(picked)) == 8, Counter(picked)


def test_without_decorrelation_concurrent_picks_pile_up() -> None:
    pods = _pods(8)
    replicas = [
        _replica(f"replica-{i}", pods, spread_concurrent="off", expect_concurrent=False) for i in range(4)
    ]
    _introduce(replicas, 1.0)
    # The same view on every replica, so the least loaded pod draws more than one of the
    # picks made before any replica hears of the others'.
    picked = _burst(replicas, 2, 2.0)
    assert max(Counter(picked).values()) > 1, Counter(picked)


def test_a_pod_ahead_of_the_rest_takes_one_concurrent_pick_not_all() -> None:
    pods = _pods(4)
    replicas = [_replica(f"replica-{i}", pods, spread_concurrent="always") for i in range(4)]
    for replica in replicas:
        for pod in pods[1:]:
            replica.update_metrics(pod, EndpointMetrics(1, 0, 0.0), 0.5)  # one waiting: all but the first
    _introduce(replicas, 1.0)
    picked = _burst(replicas, 1, 2.0)
    # One replica would send the first request to the idle pod and the next ones, which see
    # it there, to the others.
    assert Counter(picked)[pods[0]] == 1, Counter(picked)


def test_a_lone_replica_decides_as_without_decorrelation() -> None:
    pods = _pods(4)
    spreading = _replica("only", pods, spread_concurrent="always")
    plain = _replica("only", pods, spread_concurrent="off", expect_concurrent=False)
    for replica in (spreading, plain):
        for i in range(12):
            replica.pick(SchedulingRequest(f"r{i}", list(range(i * 1000, i * 1000 + 320))), 1.0 + i * 1e-4)
    assert [flight.endpoint for flight in spreading._inflight.values()] == [
        flight.endpoint for flight in plain._inflight.values()
    ]
    assert spreading.peer_load.stats.expected == 0


def _routed(replica: str, seq: int, request_id: str, endpoint: str, sent_at: float) -> SyncMessage:
    return SyncMessage(replica, 1, seq, sent_at, Routed(request_id, endpoint, 100, 10.0, 10.0))


def test_an_expected_peer_pick_lasts_until_its_routing_arrives_or_the_lag_passes() -> None:
    load = PeerLoad(PeerSyncConfig(enabled=True), replica="b")
    for peer in ("a", "c"):
        load.receive(SyncMessage(peer, 1, 1, 0.0, Snapshot(())), LAG)  # known, lag measured
    assert load.slot() == (1, 3)
    # b routed 100 prefill tokens at 1.0 and took its slot of [x, y, z]: a (slot 0) is
    # assumed to take x and c (slot 2) z.
    load.expect(["x", "y", "z"], 100, 1.0)
    x, z = load.load("x"), load.load("z")
    assert x is not None and x.requests == 1 and x.expected_prefill_tokens == 100
    assert z is not None and z.requests == 1 and load.load("y") is None
    # A routing a made before the window arrives late: not the pick assumed of it.
    load.receive(_routed("a", 2, "early", "y", 1.0 - 2 * LAG), 1.0 + LAG / 2)
    assert load.load("x") is not None and load.stats.expected_replaced == 0
    # a's concurrent routing arrives: it replaces what was assumed of a, wherever a sent it.
    load.receive(_routed("a", 3, "ra", "y", 1.0), 1.0 + LAG)
    y = load.load("y")
    assert load.load("x") is None and y is not None and y.requests == 2 and y.expected_prefill_tokens == 0
    assert load.stats.expected == 2 and load.stats.expected_replaced == 1
    # c's never does (it had nothing to route): gone once the lag has passed.
    load.expire(1.0 + LAG / 2)
    assert load.load("z") is not None
    load.expire(1.0 + LAG)
    assert load.load("z") is None


def test_nothing_is_expected_before_any_lag_is_measured() -> None:
    load = PeerLoad(PeerSyncConfig(enabled=True), replica="b")
    load.receive(SyncMessage("a", 1, 1, 1.0, Snapshot(())), 1.0)  # no lag: seen at once
    load.expect(["x"], 100, 2.0)
    assert load.load("x") is None


def test_expected_prefill_counts_as_queued_where_it_was_assumed() -> None:
    pods = _pods(2)
    a, b = _replica("a", pods, spread_concurrent="always"), _replica("b", pods, spread_concurrent="always")
    _introduce([a, b], 1.0)
    chosen = a.pick(SchedulingRequest("r1", list(range(1, 641))), 2.0).endpoints[0]
    assert a.peer_load.load(chosen) is None  # b's slot of the two is the other pod
    other = next(pod for pod in pods if pod != chosen)
    state = a.endpoint_state(other, 2.0)
    assert state.inflight_requests == 1 and state.queued_prefill_tokens >= 640


def test_concurrent_picks_keep_a_prompt_cached_on_one_pod_there() -> None:
    pods = [
        EndpointState(name=f"pod-{i}", address=f"10.0.0.{i}:8000", metrics_age_s=0.1, kv_usage=0.2)
        for i in range(4)
    ]
    request = PickRequest("r1", 40, 640, spread_slot=2, spread_of=4, spread_key="7")
    pipeline = SchedulingPipeline()
    cached = pipeline.pick(request, pods, {"pod-3": PrefixMatch(40, 40)})
    assert cached.endpoints[0] == "pod-3" and cached.slot_picks == ["pod-3"] * 4
    # With nothing cached the four slots are four pods, the same list on every replica.
    spread = pipeline.pick(request, pods, {})
    assert len(set(spread.slot_picks)) == 4
    other = pipeline.pick(
        PickRequest("another", 40, 640, spread_slot=0, spread_of=4, spread_key="7"), pods, {}
    )
    assert other.slot_picks == spread.slot_picks and spread.endpoints[0] == spread.slot_picks[2]
    # The audit line says which slots were computed; a lone pick's says nothing of them.
    assert spread.explain()["slot_picks"] == spread.slot_picks
    assert "slot_picks" not in pipeline.pick(PickRequest("lone", 40, 640), pods, {}).explain()


def test_auto_spreads_a_pick_close_behind_the_replicas_previous_one() -> None:
    pods = _pods(4)
    a, b = _replica("a", pods), _replica("b", pods)
    _introduce([a, b], 1.0)

    def spread(request_id: str, now: float) -> list[str]:
        decision = a.pick(SchedulingRequest(request_id, list(range(1, 321))), now).decision
        assert decision is not None
        return decision.slot_picks

    # Lone picks, this replica's arrivals not bursty so far: decided as one replica decides.
    for i in range(8):
        assert spread(f"lone{i}", 2.0 + i * 0.25) == []
    # One within the sync delay of the previous: b is likely picking too.
    assert len(spread("close", 3.75 + LAG / 2)) == 2
    assert spread("lone", 4.0) == []
    # Arrivals that mostly come in bursts: every pick is spread, a burst's first included.
    _introduce([a, b], 4.0)  # b keeps in touch (a peer silent for 5 s is dropped)
    for i in range(16):
        spread(f"burst{i}", 5.0 + (i // 2) * 0.25)
    assert len(spread("first", 8.0)) == 2
