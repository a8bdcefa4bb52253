"""Predicted against served prefix hits, and the evidence that the two can never agree.

Every decision predicts a hit: the leading blocks the index says the chosen endpoint holds.
Workers that report ``usage.prompt_tokens_details.cached_tokens`` say what was served. Both
go to Prometheus, so an operator can compare them. One pattern means precise routing has
silently stopped working: workers keep reporting cached prompt tokens on endpoints whose KV
events kvsched follows, while kvsched's lookups match nothing there. Then the token ids
kvsched computes are not the ids the workers cache (another tokenizer or chat template for
text prompts, or another block hash in ``hash_mode: vllm``), and ``verdict`` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# Matched blocks on the chosen endpoint per decision (histogram upper bounds, "le").
MATCHED_BLOCK_BUCKETS: tuple[float, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, math.inf)
# Served hits kvsched did not predict before the verdict is "mismatch", and the share of
# predicted ones below which they count as never matching. A correct tokenizer still misses
# a few (a request routed before its prefix's KV events arrived), far fewer than 1 in 20.
MISMATCH_MIN_EVIDENCE = 20
MISMATCH_MAX_PREDICTED_SHARE = 0.05

MISMATCH_CAUSE = (
    "kvsched's token ids for these prompts are not the ids the workers cache: for text and chat "
    "prompts load the pool's own tokenizer (tokenizer_dir, or tokenizer_mode: worker_render); in "
    "hash_mode vllm check the block size and hash seed"
)

PrefixMatchStatus = Literal["ok", "mismatch", "unknown"]


@dataclass(frozen=True, slots=True)
class PrefixVerdict:
    status: PrefixMatchStatus
    reason: str


@dataclass(slots=True)
class PrefixStats:
    """Counters over decisions and over completions whose usage carried ``cached_tokens``."""

    decisions: int = 0
    decisions_matched: int = 0
    matched_blocks: int = 0
    matched_buckets: list[int] = field(default_factory=lambda: [0] * len(MATCHED_BLOCK_BUCKETS))
    completions_reported: int = 0
    prompt_tokens: int = 0
    predicted_cached_tokens: int = 0
    served_cached_tokens: int = 0
    # Endpoints with KV events only: served hits of at least one block, kvsched having
    # predicted none there / some there.
    served_unpredicted: int = 0
    served_predicted: int = 0

    def record_decision(self, matched_blocks: int) -> None:
        self.decisions += 1
        self.matched_blocks += matched_blocks
        if matched_blocks > 0:
            self.decisions_matched += 1
        for position, bound in enumerate(MATCHED_BLOCK_BUCKETS):
            if matched_blocks <= bound:
                self.matched_buckets[position] += 1
                break

    def record_completion(
        self, prompt_tokens: int, predicted_cached: int, served_cached: int, block_size: int, comparable: bool
    ) -> None:
        """``comparable``: the prediction came from the endpoint's own KV events (not from
        kvsched's routing history in approximate mode) for the endpoint that served."""
        self.completions_reported += 1
        self.prompt_tokens += prompt_tokens
        self.served_cached_tokens += served_cached
        self.predicted_cached_tokens += predicted_cached
        if not comparable:
            return
        if served_cached >= block_size:
            if predicted_cached > 0:
                self.served_predicted += 1
            else:
                self.served_unpredicted += 1

    @property
    def served_hit_ratio(self) -> float | None:
        return self.served_cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def predicted_hit_ratio(self) -> float | None:
        return self.predicted_cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def verdict(self) -> PrefixVerdict:
        unpredicted, predicted = self.served_unpredicted, self.served_predicted
        evidence = unpredicted + predicted
        if unpredicted >= MISMATCH_MIN_EVIDENCE and predicted < MISMATCH_MAX_PREDICTED_SHARE * evidence:
            return PrefixVerdict(
                "mismatch",
                f"workers reported cached prompt tokens on {unpredicted} requests where kvsched's prefix "
                f"lookup matched nothing on that worker (and on {predicted} where it matched): "
                + MISMATCH_CAUSE,
            )
        if evidence == 0:
            return PrefixVerdict(
                "unknown", "no worker has reported a cached prefix on an endpoint with KV events"
            )
        return PrefixVerdict(
            "ok",
            f"kvsched predicted a hit for {predicted} of {evidence} requests that workers served from cache",
        )
