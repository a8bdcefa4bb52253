"""Picker: turns totals into an ordered list of endpoints (primary, then fallbacks).

Each slot goes to the least-loaded candidate among those within ``tie_epsilon`` of the
best remaining total (load = requests ahead, then kvsched's in-flight prefill tokens),
and an exact load tie goes to a per-request hash of the endpoint's name. Never to list
order: in the Mooncake trace every request shares its first block, so an order tie-break
would send every request to the same worker.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b

from scheduler.core.scoring.candidates import Candidates

_MASK64 = (1 << 64) - 1
_NAME_CACHE_LIMIT = 1 << 16


def stable_hash64(text: str) -> int:
    """Same value in every process (unlike ``hash``), so simulations replay identically."""
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


# Fibonacci hashing (Knuth, TAOCP vol. 3, 6.4): multiplying by 2^64 / golden ratio carries
# every bit of (name key XOR request key) into the high bits, which decide comparisons, so
# the order of endpoints under one request says nothing about their order under another.
_GOLDEN64 = 0x9E3779B97F4A7C15


class TieBreak:
    """Deterministic, order-independent ranks of endpoints, reshuffled by every request id."""

    __slots__ = ("_last_request", "_names")

    def __init__(self) -> None:
        self._names: dict[str, int] = {}
        self._last_request: tuple[str, int] = ("", stable_hash64(""))

    def request_key(self, request_id: str) -> int:
        last = self._last_request  # one read: another thread may replace it meanwhile
        if last[0] == request_id:
            return last[1]
        key = stable_hash64(request_id)
        self._last_request = (request_id, key)
        return key

    def name_key(self, name: str) -> int:
        key = self._names.get(name)
        if key is None:
            if len(self._names) >= _NAME_CACHE_LIMIT:
                self._names.clear()
            key = self._names[name] = stable_hash64(name)
        return key

    def ranks(self, names: Sequence[str], request_id: str) -> list[int]:
        """Lower rank wins a tie."""
        request_key = self.request_key(request_id)
        known = self._names
        return [
            (((known[name] if name in known else self.name_key(name)) ^ request_key) * _GOLDEN64) & _MASK64
            for name in names
        ]


def order_by_score(
    totals: Sequence[float],
    candidates: Candidates,
    count: int,
    tie_epsilon: float,
    tiebreak: TieBreak,
    request_id: str,
    exclude: int = -1,
) -> list[int]:
    """Positions of the ``count`` best candidates (``exclude`` left out), best first."""
    order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)
    if exclude >= 0:
        order.remove(exclude)
    chosen: list[int] = []
    while order and len(chosen) < count:
        floor = totals[order[0]] - tie_epsilon
        if totals[order[-1]] >= floor:
            # Everything left is a near-tie, and stays one as the best is taken away.
            chosen += order_by_load(order, candidates, count - len(chosen), tiebreak, request_id)
            break
        band = 1
        while totals[order[band]] >= floor:
            band += 1
        if band > 1:
            chosen.append(order.pop(_least_loaded(order, band, candidates, tiebreak, request_id)))
        else:
            chosen.append(order.pop(0))
    return chosen


def _load_keys(positions: Sequence[int], candidates: Candidates) -> list[int]:
    # (requests ahead, in-flight prefill tokens) folded into one int, which compares much
    # faster than a tuple; prefill tokens stay far below 2^40.
    queue, states = candidates.queue, candidates.states
    return [(queue[i] << 40) + states[i].inflight_prefill_tokens for i in positions]


def order_by_load(
    positions: Sequence[int], candidates: Candidates, count: int, tiebreak: TieBreak, request_id: str
) -> list[int]:
    """The ``count`` least loaded of ``positions``, least first; equal loads go by rank."""
    keys = _load_keys(positions, candidates)
    by_load = sorted(range(len(keys)), key=keys.__getitem__)
    sorted_keys = [keys[k] for k in by_load]
    states = candidates.states
    chosen: list[int] = []
    start, end = 0, len(by_load)
    while start < end and len(chosen) < count:
        stop = bisect_right(sorted_keys, sorted_keys[start], start)
        if stop - start == 1:
            chosen.append(positions[by_load[start]])
        else:
            group = [positions[k] for k in by_load[start:stop]]
            ranks = tiebreak.ranks([states[i].name for i in group], request_id)
            by_rank = sorted(range(len(group)), key=ranks.__getitem__)
            chosen += [group[g] for g in by_rank[: count - len(chosen)]]
        start = stop
    return chosen


def _least_loaded(
    order: list[int], band: int, candidates: Candidates, tiebreak: TieBreak, request_id: str
) -> int:
    """Position, within the first ``band`` of ``order``, of the least loaded candidate."""
    keys = _load_keys(order[:band], candidates)
    lightest = min(keys)
    ties = [p for p, key in enumerate(keys) if key == lightest]
    if len(ties) == 1:
        return ties[0]
    states = candidates.states
    ranks = tiebreak.ranks([states[order[p]].name for p in ties], request_id)
    return min(zip(ranks, ties, strict=True))[1]


def sample_softmax(totals: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Position drawn with probability proportional to exp(total / temperature)."""
    best = max(totals)
    weights = [math.exp((t - best) / temperature) for t in totals]
    threshold = rng.random() * sum(weights)
    cumulative = 0.0
    for position, weight in enumerate(weights):
        cumulative += weight
        if threshold < cumulative:
            return position
    # Rounding can leave the threshold a hair above the running sum: the last one with weight.
    return max(p for p, w in enumerate(weights) if w > 0.0)
