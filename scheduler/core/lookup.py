"""What kvsched believes each endpoint holds of one prompt: the answer of a read-only lookup.

``Scheduler.lookup`` fills these records; the HTTP (``POST /debug/lookup``) and gRPC
(``kvsched.v1.EndpointPicker/Lookup``) answers are their plain-data form. Unlike a pick's
prefix figure (one tier-weighted number per endpoint, best of its data-parallel ranks, for
the endpoints that pass the filters), a lookup reports every endpoint, every rank and every
tier, and the keys the walk compared, so that a diagnosis can tell "kvsched hashed the prompt
differently" (nothing matched anywhere past the first key) from "the pod evicted it" (other
pods match deeper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from scheduler.core.index import PrefixMatch

# Where an endpoint's blocks come from: its KV events, or (approximate mode, for pools that
# publish none) the prompts kvsched routed there itself within the approximate TTL.
PrefixSource = Literal["kv_events", "routing_history"]


@dataclass(frozen=True, slots=True)
class RankPrefix:
    """One data-parallel rank (one KV cache) of an endpoint."""

    rank: int
    worker: str  # the rank's name in the index: the endpoint's name, or "<name>#dp<rank>"
    matched_blocks: int  # leading blocks of the prompt this rank holds, in any tier
    gpu_blocks: int  # of those, held in GPU memory at best
    cpu_blocks: int  # ... in CPU memory at best
    storage_blocks: int  # ... on storage only
    # The prompt's keys compared for this rank: its matched blocks and the first one it does
    # not hold (none when it holds the whole prompt).
    keys_compared: int

    @classmethod
    def of(cls, rank: int, worker: str, match: PrefixMatch | None, prompt_blocks: int) -> RankPrefix:
        total, gpu, cpu, storage = match if match is not None else (0, 0, 0, 0)
        return cls(rank, worker, total, gpu, cpu, storage, min(total + 1, prompt_blocks))


@dataclass(frozen=True, slots=True)
class EndpointPrefix:
    name: str
    address: str
    healthy: bool  # passes the health filter now (a lookup reports unhealthy endpoints too)
    source: PrefixSource
    # The best rank's matched blocks: the figure a pick's prefix scorer starts from.
    matched_blocks: int
    ranks: tuple[RankPrefix, ...]


@dataclass(frozen=True, slots=True)
class PrefixLookup:
    model: str | None  # as asked; the keys do not depend on it (one tokenizer and hash seed)
    prompt_tokens: int
    prompt_blocks: int  # full blocks of the prompt: the keys a lookup can compare
    # Keys the index walk looked up: the longest match over all ranks plus the first key
    # nobody holds (at most prompt_blocks). 1 with blocks in the prompt means no rank
    # anywhere holds even the first block.
    keys_compared: int
    block_size: int
    hash_mode: str
    endpoints: tuple[EndpointPrefix, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
