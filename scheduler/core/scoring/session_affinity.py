"""Session affinity as a soft score: requests naming the same session lean to one endpoint.

The session's endpoint is its rendezvous-hash winner among the candidates
(``scoring/rendezvous.py``), so every replica that sees the same endpoints agrees with no
state to share. The scorer gives it 1 and the others 0 (``session_affinity`` weight; cache,
load and latency can still outvote it); ``session_affinity.hard``, a filter
(``filters.SessionAffinityFilter``), leaves only that endpoint instead. Requests without a
session are untouched by both.
"""

from __future__ import annotations

from scheduler.core.scoring.candidates import Candidates
from scheduler.core.scoring.config import ScoringConfig
from scheduler.core.scoring.registry import register_scorer
from scheduler.core.scoring.rendezvous import session_endpoint
from scheduler.core.scoring.types import PickRequest


class SessionAffinityScorer:
    """1 for the session's endpoint among the candidates, 0 elsewhere; all 1 without a session."""

    name = "session_affinity"

    def score(self, candidates: Candidates, request: PickRequest, config: ScoringConfig) -> list[float]:
        session = request.session_id
        states = candidates.states
        if not session or not states:
            return [1.0] * len(states)
        home = session_endpoint(session, [s.name for s in states])
        return [1.0 if i == home else 0.0 for i in range(len(states))]


register_scorer(
    "session_affinity",
    SessionAffinityScorer,
    weight=0.0,
    description="Requests of one session (its header) on one endpoint, the same on every replica "
    "(rendezvous hashing over the candidates); off unless weighted.",
)
