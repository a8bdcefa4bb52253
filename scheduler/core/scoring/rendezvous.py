"""Rendezvous (highest-random-weight) hashing of sessions onto endpoints.

Thaler and Ravishankar, "Using name-based mappings to increase hit rates" (IEEE/ACM ToN,
1998): a session's endpoint is the one with the highest ``weight(session, endpoint)``. No
state, no synchronisation: every kvsched replica that sees the same endpoints picks the same
one, and when an endpoint leaves only its own sessions move, each to its next-highest.
blake2b rather than Python's ``hash``, which is salted per process and would make two
replicas disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b


def rendezvous_weight(session: str, endpoint: str) -> int:
    # The NUL keeps ("ab", "c") and ("a", "bc") apart.
    digest = blake2b(f"{session}\0{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def session_endpoint(session: str, names: Sequence[str]) -> int:
    """Position in ``names`` of the session's endpoint (ties, at 2^-64, go to the lower name)."""
    return max(range(len(names)), key=lambda i: (rendezvous_weight(session, names[i]), names[i]))
