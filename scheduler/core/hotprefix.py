"""Hot prefixes: a shared prefix whose requests outgrow the endpoints that hold it.

Many requests open with the same blocks: an agent framework's tool prompt, a tenant's system
prompt, a RAG corpus's popular document. Whoever computed such a prefix first holds it, and
a scorer that counts a cache hit as prefill saved keeps sending the requests that share it
there: for each request alone, a hit on a busy holder beats recomputing 2k tokens on an idle
endpoint. But an agent loop or a chat stays where it started, so every new session that
follows the prefix to its holder also brings its later steps, and the holders end up with
the sessions while the other endpoints idle. Measured with ``kvsched bench policies`` on the
agentic workload near saturation (8 workers, seeds 0-5, with and without speculative
placement): 3 of the 12 runs left two or three endpoints idle for the first ~300 requests,
and the holders' backlog then tipped the pool into a state it never left: continuations
moved off their holders to shorter queues (1,100 of 2,100 moved against 291), recomputing
their histories, which lengthened the queues further; TTFT p50 1.3-2.1 s against 85-135 ms
in the other runs.

So a prefix counts as hot once the requests that share it, per endpoint holding it, exceed
the pool's fair share: ``requests(prefix) / holders(prefix) > share x requests / endpoints``.
For a hot prefix the load scorers price the request as if every endpoint held it (the
request's ``hot_prefix_blocks``; the prefix-overlap scorer still sees the real match, so the
holders win whenever loads are even). A new session then goes where the load is least; the
first one there computes the prefix once, which makes that endpoint a holder, and the test
above stops crediting it as soon as the holders are enough for the prefix's share of the
traffic: a document one request in twenty reads stays on one endpoint of eight, one that
half the requests read spreads to four. Unit-free (requests against requests), so it holds
for any pool size, token scale and request rate, and each replica decides alike from its
own share of the traffic.

Counting every prefix of every request would cost a dict update per block; instead each
request counts at checkpoint depths (1, 2, 3, 4, 6, 8, 12, 16, ... blocks: at most 1.5x
apart) up to its deepest match, so a hot prefix is found to within a third of its length,
for about 2 log2(blocks) updates a request. Counts decay with a half-life, so a prefix stops
being hot once its traffic moves on; stale entries are pruned as the table grows.

Plain code over in-memory state, time passed in.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from functools import lru_cache
from operator import itemgetter

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core.index import PrefixMatch


class HotPrefixConfig(BaseModel):
    """When a shared prefix counts as hot, so that new requests sharing it may go elsewhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Price the hot prefix of a request as cached on every endpoint in the load "
        "scorers (prefill_wait, inflight_load), so that sessions sharing it spread by load.",
    )
    share: float = Field(
        1.0,
        gt=0,
        description="A prefix is hot when its requests per endpoint holding it exceed this many "
        "times the pool's requests per endpoint.",
    )
    # A share estimated from n requests is off by about 1/sqrt(n): 14% at 48. At 16 (25%)
    # chat's system prompts flickered in and out of hot and its moderate-load p99 rose 1.4%
    # (kvsched bench policies --size short, seed 0: 50.6 -> 51.3 ms); at 48, 50.2 ms, with
    # agentic's gain kept (moderate 37 / 124 -> 33 / 84 ms).
    min_requests: float = Field(
        48.0,
        ge=1,
        description="Decayed requests a prefix needs before it can be hot: a few requests are no "
        "evidence of a share.",
    )
    half_life_s: float = Field(
        10.0,
        gt=0,
        description="How fast request counts decay: a request counts half after this long.",
    )
    # Pruning is a pass over the table on the pick path: 3 ms at 50,000 entries (sorting
    # 200,000 to keep the top half took 149 ms, a stall every time the table filled).
    max_entries: int = Field(
        50_000,
        ge=1000,
        description="Counted prefixes kept at most; those counted about once go first (~100 bytes each).",
    )


# PrefixMatch.total_blocks by position: sorting 1,000 holders' depths takes 65 us so, 89 us
# through the attribute.
_TOTAL_BLOCKS = itemgetter(0)

# A counted prefix worth less than this many requests (its decayed count) is dropped when the
# table is pruned.
PRUNE_BELOW = 2.0


@lru_cache(maxsize=1024)
def checkpoint_depths(blocks: int) -> tuple[int, ...]:
    """Depths (in blocks) at which a prompt of ``blocks`` is counted: 1, 2, 3, 4, 6, 8, 12, ...
    up to ``blocks``."""
    depths: list[int] = []
    depth = 1
    while depth <= blocks:
        depths.append(depth)
        half_step = depth + depth // 2
        if depth >= 2 and half_step <= blocks:
            depths.append(half_step)
        depth *= 2
    return tuple(depths)


class HotPrefixes:
    """Decayed request counts per prefix (by its block key at checkpoint depths), and in all.

    Counts are kept inflated rather than decayed entry by entry: a request at time ``t`` adds
    ``2 ** ((t - epoch) / half_life)``, and a count is read by deflating it to ``now``. One
    power per request instead of one per counted prefix; the epoch moves forward (every
    entry scaled down once) before the inflation could lose precision.
    """

    # Move the epoch once a request's weight reaches 2**40: far from float overflow, and the
    # rescale it costs (one pass over the table) comes once in 40 half-lives.
    _REBASE_AT = 2.0**40

    def __init__(self, config: HotPrefixConfig | None = None) -> None:
        self.config = config or HotPrefixConfig()
        self._counts: dict[int, float] = {}  # block key -> inflated count
        self._total = 0.0  # inflated count of every request
        self._epoch: float | None = None
        self.hot_requests = 0  # requests that had a hot prefix
        self.pruned = 0

    def __len__(self) -> int:
        return len(self._counts)

    def _weight(self, now: float) -> float:
        """What a request at ``now`` adds, moving the epoch first where it has grown too large."""
        if self._epoch is None:
            self._epoch = now
        weight = math.exp2((now - self._epoch) / self.config.half_life_s)
        if weight >= self._REBASE_AT:
            self._counts = {key: count / weight for key, count in self._counts.items()}
            self._total /= weight
            self._epoch, weight = now, 1.0
        return weight

    def observe(
        self, keys: Sequence[int], matches: Mapping[str, PrefixMatch], endpoints: int, now: float
    ) -> int:
        """Count a request with block ``keys`` whose prefix ``matches`` are these, in a pool of
        ``endpoints``; returns the depth in blocks of its deepest hot prefix (0: none)."""
        config = self.config
        weight = self._weight(now)
        self._total += weight
        if not matches or endpoints < 2:
            return 0
        held = sorted(map(_TOTAL_BLOCKS, matches.values()))
        deepest = min(held[-1], len(keys))
        if deepest <= 0:
            return 0
        counts = self._counts
        # In inflated units: hot when count > share x total / endpoints x holders, and counted
        # enough when count >= min_requests (both sides scaled by the same weight).
        per_holder = config.share * self._total / endpoints
        least = config.min_requests * weight
        hot = 0
        for depth in checkpoint_depths(deepest):
            key = int(keys[depth - 1])
            count = counts.get(key, 0.0) + weight
            counts[key] = count
            # Endpoints holding at least ``depth`` blocks of the prompt.
            if count >= least and count > per_holder * (len(held) - bisect_left(held, depth)):
                hot = depth
        if hot:
            self.hot_requests += 1
        if len(counts) > config.max_entries:
            self._prune(weight)
        return hot

    def observe_elsewhere(self, keys: Sequence[int], now: float) -> None:
        """Count a request another replica routed (its prompt's block keys, as far as it sent
        them): in the pool's total, and in the prefixes this table already counts. It adds
        none: how deep to count a prompt takes the matches, which only its own pick knew.
        With it every replica sees the whole pool's traffic on the prefixes it counts, so
        a prefix turns hot on each about as soon as on one replica routing everything."""
        weight = self._weight(now)
        self._total += weight
        counts = self._counts
        for depth in checkpoint_depths(len(keys)):
            key = int(keys[depth - 1])
            count = counts.get(key)
            if count is not None:
                counts[key] = count + weight

    def _prune(self, weight: float) -> None:
        """Drop the prefixes worth less than ``PRUNE_BELOW`` requests now (one request, or two
        decayed: nowhere near ``min_requests``), and if that leaves more than half the bound,
        keep the most counted half."""
        floor = PRUNE_BELOW * weight
        kept = {key: count for key, count in self._counts.items() if count >= floor}
        half = self.config.max_entries // 2
        if len(kept) > half:
            kept = dict(sorted(kept.items(), key=itemgetter(1), reverse=True)[:half])
        self.pruned += len(self._counts) - len(kept)
        self._counts = kept
