"""Session affinity through the scoring pipeline: the soft scorer, the hard filter, and the
rendezvous hashing that lets replicas agree without talking."""

from __future__ import annotations

import random

from scheduler.core.scoring import EndpointState, PickRequest, PrefixMatch, SchedulingPipeline, ScoringConfig
from scheduler.core.scoring.config import ScorerWeights, SessionAffinityConfig
from scheduler.core.scoring.filters import NOT_SESSION_ENDPOINT
from scheduler.core.scoring.rendezvous import session_endpoint

NAMES = [f"10.0.0.{i}:8000" for i in range(1, 9)]
SESSIONS = [f"user-{i}" for i in range(400)]


def _states(names: list[str], **fields: object) -> list[EndpointState]:
    return [EndpointState(name=n, address=n, metrics_age_s=0.1, **fields) for n in names]  # type: ignore[arg-type]


def _pick(
    pipeline: SchedulingPipeline, states: list[EndpointState], session: str | None, **matches: int
) -> str:
    request = PickRequest("r", 10, 160, session_id=session)
    found = {name: PrefixMatch(blocks, blocks, 0, 0) for name, blocks in matches.items()}
    decision = pipeline.pick(request, states, found, random.Random(0))
    return decision.endpoints[0]


def test_sessions_spread_evenly_and_an_endpoint_leaving_moves_only_its_own() -> None:
    homes = {s: NAMES[session_endpoint(s, NAMES)] for s in SESSIONS}
    per_endpoint = [list(homes.values()).count(name) for name in NAMES]
    assert min(per_endpoint) >= 30 and max(per_endpoint) <= 70  # 50 each on average
    # The order endpoints are listed in (discovery order, differing by replica) changes nothing.
    shuffled = random.Random(1).sample(NAMES, len(NAMES))
    assert all(shuffled[session_endpoint(s, shuffled)] == home for s, home in homes.items())
    gone = NAMES[3]
    left = [name for name in NAMES if name != gone]
    moved = {s for s in SESSIONS if left[session_endpoint(s, left)] != homes[s]}
    assert moved == {s for s, home in homes.items() if home == gone}


def test_the_hard_filter_sends_a_session_only_to_its_endpoint_whatever_the_cache_says() -> None:
    pipeline = SchedulingPipeline(ScoringConfig(session_affinity=SessionAffinityConfig(hard=True)))
    states = _states(NAMES)
    home = NAMES[session_endpoint("user-7", NAMES)]
    elsewhere = next(name for name in NAMES if name != home)
    assert _pick(pipeline, states, "user-7", **{elsewhere: 10}) == home
    decision = pipeline.pick(PickRequest("r", 10, 160, session_id="user-7"), states, {}, random.Random(0))
    assert decision.endpoints == [home]  # no fallback outside the session's endpoint
    assert decision.filtered[elsewhere] == NOT_SESSION_ENDPOINT
    # Its endpoint unhealthy: the session goes to its next endpoint, still the same on every replica.
    sick = _states(NAMES)
    sick[NAMES.index(home)].healthy = False
    healthy = [name for name in NAMES if name != home]
    assert _pick(pipeline, sick, "user-7") == healthy[session_endpoint("user-7", healthy)]
    # A request without a session is not filtered.
    assert _pick(pipeline, states, None, **{elsewhere: 10}) == elsewhere


def test_the_soft_score_prefers_the_sessions_endpoint_until_load_outweighs_it() -> None:
    weighted = ScoringConfig(weights=ScorerWeights(session_affinity=2.0))
    pipeline = SchedulingPipeline(weighted)
    home = NAMES[session_endpoint("user-3", NAMES)]
    assert _pick(pipeline, _states(NAMES), "user-3") == home
    # Off by default: the default weights leave the pick to load (all idle: any endpoint).
    assert SchedulingPipeline(ScoringConfig()).config.weights["session_affinity"] == 0.0
    # Its endpoint far busier than the rest: the soft score gives way.
    busy = _states(NAMES)
    busy[NAMES.index(home)].inflight_requests = 40
    busy[NAMES.index(home)].inflight_prefill_tokens = 40_000
    assert _pick(pipeline, busy, "user-3") != home
