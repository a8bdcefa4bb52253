"""Hot prefixes: counted per checkpoint depth, hot beyond their holders' share, priced as cached."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
from scheduler.adapters.metrics import KvschedCollector, new_registry
from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.hotprefix import HotPrefixConfig, HotPrefixes, checkpoint_depths
from scheduler.core.index import IndexConfig, PrefixMatch
from scheduler.core.peerload import PeerSyncConfig
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
    SpeculativeConfig,
)
from scheduler.core.scoring import EndpointState, PickRequest, ScoringConfig
from scheduler.core.scoring.candidates import build_candidates, metrics_trusted
from scheduler.core.scoring.prefill_wait import PrefillWaitScorer
from scheduler.core.scoring.scorers import PrefixOverlapScorer

BLOCK = 16
SHARED = list(range(1000, 1064))  # block keys of a 64-block shared prefix


def _keys(session: int, extra: int = 4) -> list[int]:
    """The shared prefix's keys, then ``extra`` keys of this session's own."""
    return [*SHARED, *(session * 100_000 + i for i in range(extra))]


def _held(*depths: int) -> dict[str, PrefixMatch]:
    return {f"e{i}": PrefixMatch(depth, depth) for i, depth in enumerate(depths)}


def test_checkpoints_are_at_most_one_and_a_half_apart() -> None:
    assert checkpoint_depths(0) == ()
    assert checkpoint_depths(1) == (1,)
    assert checkpoint_depths(13) == (1, 2, 3, 4, 6, 8, 12)
    depths = checkpoint_depths(5000)
    assert depths[-1] <= 5000 and len(depths) == len(set(depths)) == 24
    assert all(b <= 1.5 * a for a, b in itertools.pairwise(depths[1:]))  # past 1 -> 2


def test_a_prefix_every_request_shares_is_hot_once_counted_enough() -> None:
    hot = HotPrefixes(HotPrefixConfig(min_requests=16))
    # All at one instant, so nothing decays: the 16th request is the 16th count.
    answers = [hot.observe(_keys(i), _held(64), endpoints=8, now=0.0) for i in range(20)]
    # Too little evidence for the first 15; then every request's deepest hot checkpoint is the
    # prefix's own length (64 is a checkpoint), not its session's blocks beyond it.
    assert answers[:15] == [0] * 15
    assert answers[15:] == [64] * 5
    assert hot.hot_requests == 5


def test_enough_holders_for_its_share_leave_a_prefix_cold() -> None:
    # Half the requests share the prefix, four endpoints' share of eight: one or three
    # holders are too few, five are enough (four would be exactly its share, the boundary).
    for holders, expect_hot in ((1, True), (3, True), (5, False), (8, False)):
        hot = HotPrefixes()
        answer = 0
        for i in range(200):
            keys = _keys(i) if i % 2 == 0 else [7_000_000 + i * 10 + j for j in range(68)]
            matches = _held(*([64] * holders)) if i % 2 == 0 else {}
            answer = hot.observe(keys, matches, endpoints=8, now=i * 0.01) or answer
        assert bool(answer) is expect_hot, holders


def test_a_rarely_read_prefix_stays_on_its_holder() -> None:
    hot = HotPrefixes()
    answers = []
    for i in range(400):
        shares = i % 20 == 0  # one request in twenty, one holder of eight
        keys = _keys(i) if shares else [9_000_000 + i * 100 + j for j in range(68)]
        answers.append(hot.observe(keys, _held(64) if shares else {}, endpoints=8, now=i * 0.01))
    assert not any(answers)


def test_a_prefix_cools_down_once_its_traffic_moves_on() -> None:
    config = HotPrefixConfig(half_life_s=1.0, min_requests=16)
    hot = HotPrefixes(config)
    for i in range(40):
        hot.observe(_keys(i), _held(64), endpoints=8, now=i * 0.01)
    assert hot.observe(_keys(40), _held(64), endpoints=8, now=0.4) == 64
    # Ten half-lives of other traffic: what is left of the prefix's count is under the minimum.
    for i in range(200):
        hot.observe([5_000_000 + i * 100 + j for j in range(8)], _held(8), endpoints=8, now=0.5 + i * 0.05)
    assert hot.observe(_keys(41), _held(64), endpoints=8, now=10.5) == 0


def test_the_table_is_bounded_and_keeps_what_is_hot() -> None:
    hot = HotPrefixes(HotPrefixConfig(max_entries=1000))
    for i in range(3000):
        # Every other request shares the prefix; the others bring new prefixes to count.
        keys = _keys(i) if i % 2 == 0 else [3_000_000 + i * 10 + j for j in range(8)]
        hot.observe(keys, _held(64) if i % 2 == 0 else _held(8), endpoints=8, now=i * 0.001)
    assert len(hot) <= 1000 and hot.pruned > 0
    assert hot.observe(_keys(3001), _held(64), endpoints=8, now=3.0) == 64


def _states(*fields: dict[str, float]) -> list[EndpointState]:
    return [
        EndpointState(name=f"e{i}", address=f"e{i}", metrics_age_s=0.1, prefill_tokens_per_s=1e4, **f)  # type: ignore[arg-type]
        for i, f in enumerate(fields)
    ]


def test_the_load_scorers_price_a_hot_prefix_as_cached_everywhere() -> None:
    # A 1,040-token prompt whose first 64 of 65 blocks are held by e0, which has 500 tokens
    # of prefill queued; e1 is idle and holds nothing.
    states = _states({"queued_prefill_tokens": 500.0, "inflight_prefill_tokens": 500}, {})
    matches = {"e0": PrefixMatch(64, 64)}
    config = ScoringConfig()
    for hot_blocks, idle_wins in ((0, False), (64, True)):
        request = PickRequest("r", 65, 1040, hot_prefix_blocks=hot_blocks)
        candidates = build_candidates(states, metrics_trusted(states, 2.0), matches, request, config.tiers)
        wait = PrefillWaitScorer().score(candidates, request, config)
        assert (wait[1] > wait[0]) is idle_wins, hot_blocks
        # What the overlap scorer sees is the real match either way: the holder keeps its
        # edge whenever the loads are even.
        assert PrefixOverlapScorer().score(candidates, request, config) == pytest.approx([64 / 65, 0.0])
    assert candidates.priced_overlap == pytest.approx([64 / 65, 64 / 65])
    assert candidates.prefill_work == pytest.approx([500 + 1040 / 65, 1040 / 65])


def _pool(endpoints: int, *, hot: bool = True, **config: object) -> Scheduler:
    """A Scheduler over ``endpoints`` endpoints with KV events, hot after 16 requests rather
    than the default 48 (so that a few dozen sessions show it)."""
    scoring = ScoringConfig().model_copy(update={"hot_prefix": HotPrefixConfig(enabled=hot, min_requests=16)})
    scheduler = Scheduler(SchedulerConfig(index=IndexConfig(block_size=BLOCK), scoring=scoring, **config))  # type: ignore[arg-type]
    addresses = [f"10.0.{i // 250}.{i % 250}:8000" for i in range(endpoints)]
    scheduler.set_endpoints([Endpoint(a, a, kv_events=f"tcp://{a[:-5]}:5557") for a in addresses], now=0.0)
    for address in addresses:
        scheduler.update_metrics(address, EndpointMetrics(0, 0, 0.1), now=0.0)
    return scheduler


def _scheduler(hot: bool) -> Scheduler:
    # Speculative placement off: an endpoint holds what its KV events say, nothing else.
    return _pool(4, hot=hot, speculative=SpeculativeConfig(enabled=False))


def _store(scheduler: Scheduler, worker: str, tokens: list[int]) -> None:
    # The simulated engine's block hashes: any id unique per block content and position.
    hashes = [hash(tuple(tokens[: (i + 1) * BLOCK])) for i in range(len(tokens) // BLOCK)]
    event = BlockStored(hashes, None, tokens, BLOCK, medium=Tier.GPU)
    scheduler.index.apply_batch(worker, EventBatch(0.0, [event]))


HOLDER = "10.0.0.0:8000"
SYSTEM_PROMPT = list(range(1, 64 * BLOCK + 1))  # 1,024 tokens every session opens with


def _sessions(scheduler: Scheduler, count: int, start: float = 0.0) -> Counter[str]:
    """``count`` new sessions 10 ms apart, each the system prompt and a block of its own. Each
    has its first token 5 ms after it is routed, and its endpoint's KV events report its
    prompt then; none finishes (they go on decoding)."""
    served: Counter[str] = Counter()
    for i in range(count):
        now = start + 0.01 * i
        prompt = [*SYSTEM_PROMPT, *range(100_000 + i * BLOCK, 100_000 + (i + 1) * BLOCK)]
        chosen = scheduler.pick(SchedulingRequest(f"s{start}-{i}", prompt), now=now).endpoints[0]
        scheduler.on_first_token(f"s{start}-{i}", now=now + 0.005)
        _store(scheduler, chosen, prompt)
        served[chosen] += 1
    return served


def test_new_sessions_sharing_a_hot_prefix_spread_over_the_pool() -> None:
    # Every session opens with a 64-block system prompt only one endpoint holds. Priced per
    # request, a hit there beats recomputing the prompt on an idle endpoint until its prefill
    # queue outgrows the recompute or the balance guard fires at 48 requests: it takes all
    # 40 sessions, and so their later steps, while three endpoints idle.
    cold = _scheduler(hot=False)
    _store(cold, HOLDER, SYSTEM_PROMPT)
    assert _sessions(cold, 40) == {HOLDER: 40}
    # Once the prompt is hot (16 requests on one holder of four), new sessions go where the
    # load is least; each endpoint they reach computes the prompt once and holds it.
    hot = _scheduler(hot=True)
    _store(hot, HOLDER, SYSTEM_PROMPT)
    served = _sessions(hot, 40)
    assert len(served) == 4 and served[HOLDER] <= 20, served
    # The picks it priced so are exposed, with the table's size.
    registry = new_registry(process_metrics=False)
    registry.register(KvschedCollector(hot))
    exposed = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert exposed["kvsched_hot_prefix_picks_total"] == hot.hot_prefixes.hot_requests > 0
    assert exposed["kvsched_hot_prefix_counted"] == len(hot.hot_prefixes) > 0
    assert _sessions(cold, 1, start=1.0) and cold.hot_prefixes.hot_requests == 0


def test_a_session_with_history_stays_with_it_when_its_prefix_is_hot() -> None:
    scheduler = _scheduler(hot=True)
    _store(scheduler, HOLDER, SYSTEM_PROMPT)
    _sessions(scheduler, 40)  # the prompt is hot, and on every endpoint
    # The busiest endpoint holds one session's 32 blocks of history past the system prompt;
    # the session's next step goes there: only the hot part is priced as cached elsewhere.
    loads = {e.name: scheduler.inflight(e.name)[0] for e in scheduler.endpoints()}
    busiest = max(loads, key=lambda name: loads[name])
    assert loads[busiest] > min(loads.values())
    history = [*SYSTEM_PROMPT, *range(200_000, 200_000 + 32 * BLOCK)]
    _store(scheduler, busiest, history)
    step = SchedulingRequest("next", [*history, *range(300_000, 300_000 + BLOCK)])
    assert scheduler.pick(step, now=1.0).endpoints[0] == busiest


def test_requests_another_replica_routed_count_on_the_prefixes_already_counted() -> None:
    # Two replicas share the pool's traffic; this one routes every fourth request. Counting
    # the others' requests too (their prompts' keys come with their routing messages), the
    # prefix turns hot after the same 48 requests of the pool as on one replica routing all.
    alone, shared = HotPrefixes(), HotPrefixes()
    first_hot_alone = first_hot_shared = None
    for i in range(120):
        now = i * 0.001
        if alone.observe(_keys(i), _held(64), endpoints=8, now=now) and first_hot_alone is None:
            first_hot_alone = i
        if i % 4 == 0:
            if shared.observe(_keys(i), _held(64), endpoints=8, now=now) and first_hot_shared is None:
                first_hot_shared = i
        else:
            shared.observe_elsewhere(_keys(i), now=now)
    assert first_hot_alone is not None and first_hot_shared is not None
    assert first_hot_shared - first_hot_alone < 4  # its next own request after the pool's 48th
    # Without the others' requests it would take four times as long.
    blind = HotPrefixes()
    hot_at = [i for i in range(0, 400, 4) if blind.observe(_keys(i), _held(64), endpoints=8, now=i * 0.001)]
    assert hot_at and hot_at[0] > 3 * first_hot_alone
    # A prompt this replica never counted adds nothing to the table, only to the total.
    entries = len(shared)
    shared.observe_elsewhere([8_000_000 + j for j in range(64)], now=0.2)
    assert len(shared) == entries


def _sync_replica(name: str) -> Scheduler:
    replica = _pool(4, sync=PeerSyncConfig(enabled=True))
    replica.start_sync(name, 1)
    _store(replica, HOLDER, SYSTEM_PROMPT)
    return replica


def test_a_replica_counts_the_sessions_its_peers_route() -> None:
    # Replica a routes three sessions in four, b the fourth. With a's routings delivered, b
    # finds the system prompt hot on its own 5th session (the pool's 20th request); alone, on
    # its 17th (the pool's 68th).
    first_hot: dict[bool, int] = {}
    for delivered in (True, False):
        a, b = _sync_replica("a"), _sync_replica("b")
        for i in range(80):
            prompt = [*SYSTEM_PROMPT, *range(100_000 + i * BLOCK, 100_000 + (i + 1) * BLOCK)]
            replica = b if i % 4 == 3 else a
            before = replica.hot_prefixes.hot_requests
            replica.pick(SchedulingRequest(f"s{i}", prompt), now=0.01 * i)
            if replica is b and b.hot_prefixes.hot_requests > before and delivered not in first_hot:
                first_hot[delivered] = i
            messages = a.take_sync_messages()
            if delivered:
                for message in messages:
                    b.receive_sync(message, 0.01 * i)
    assert first_hot[True] <= 23 and first_hot[False] >= 63, first_hot


def test_a_large_pools_fair_share_is_the_pools_not_its_shortlists() -> None:
    # 40 endpoints, above candidates.prune_above (32): a pick scores a shortlist, but a prefix
    # every request shares, held by 20 of the 40, is still more than its holders' share.
    scheduler = _pool(40)
    for endpoint in list(scheduler.endpoints())[:20]:
        _store(scheduler, endpoint.name, SYSTEM_PROMPT)
    for i in range(24):
        prompt = [*SYSTEM_PROMPT, *range(100_000 + i * BLOCK, 100_000 + (i + 1) * BLOCK)]
        scheduler.pick(SchedulingRequest(f"s{i}", prompt), now=0.0)
    assert scheduler.hot_prefixes.hot_requests > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"share": 0}, "spec.picker.hotPrefix.share: Input should be greater than 0"),
        ({"minRequests": 0}, "spec.picker.hotPrefix.minRequests: Input should be greater than or equal to 1"),
        ({"halfLife": 3}, "spec.picker.hotPrefix.halfLife: not a setting of this kvsched version"),
    ],
)
def test_a_policy_with_bad_hot_prefix_settings_is_refused_by_name(
    settings: dict[str, object], message: str
) -> None:
    # What the API server's schema would refuse (tests/test_crd_schema.py), kvsched's own
    # conversion refuses too, naming the field: a policy applied past the schema changes nothing.
    spec = {"poolRef": {"name": "pool"}, "picker": {"hotPrefix": settings}}
    with pytest.raises(PolicyError) as refused:
        PolicySettings.from_spec(spec).scheduler_config(SchedulerConfig())
    assert refused.value.reason == "InvalidSpec" and message in str(refused.value)
