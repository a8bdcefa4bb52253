"""The predictor's feature columns and the batched builder that fills them at pick time.

One row per candidate endpoint, float32 (what the tree kernel and xgboost both read), in a
fixed column order that saved models depend on: a model file records FEATURE_NAMES and is
refused when they differ.

Columns:

0. ``prompt_tokens``: the request's prompt length, the same on every row of a pick.
1. ``cached_tokens``: prompt tokens the endpoint already holds (tier-weighted, so it can
   be fractional: a block reloaded from CPU is cheaper than recomputed, not free).
2. ``uncached_tokens``: ``max(prompt_tokens - cached_tokens, 0)``, the prefill this
   request itself costs there. Derived, because a tree would need many splits to learn a
   difference of two columns.
3. ``waiting``: scraped ``vllm:num_requests_waiting``.
4. ``running``: scraped ``vllm:num_requests_running``.
5. ``kv_usage``: scraped ``vllm:kv_cache_usage_perc`` (0..1); near 1 the engine preempts.
6. ``inflight_prefill_tokens``: prompt tokens kvsched routed there that have not reached
   their first token yet: prefill queued ahead of this request.
7. ``inflight_decode_requests``: requests kvsched routed there that are past their first
   token: its own, unlagged view of the decode batch.
8. ``endpoint_class_id``: the endpoint's hardware/model class as a small integer, so one
   model can learn classes that differ in speed.
9. ``prefill_tokens_ahead``: ``inflight_prefill_tokens + uncached_tokens``, all prefill
   that must finish before this request's first token (derived, as column 2).
10. ``decode_batch``: ``max(running, inflight_decode_requests)``. Scraped counts lag by a
    scrape interval and kvsched's own miss other routers' traffic; the larger of the two
    is the better guess of the batch a new token waits on (derived).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "prompt_tokens",
    "cached_tokens",
    "uncached_tokens",
    "waiting",
    "running",
    "kv_usage",
    "inflight_prefill_tokens",
    "inflight_decode_requests",
    "endpoint_class_id",
    "prefill_tokens_ahead",
    "decode_batch",
)
NUM_FEATURES: Final = len(FEATURE_NAMES)

PROMPT_TOKENS: Final = 0
CACHED_TOKENS: Final = 1
UNCACHED_TOKENS: Final = 2
WAITING: Final = 3
RUNNING: Final = 4
KV_USAGE: Final = 5
INFLIGHT_PREFILL_TOKENS: Final = 6
INFLIGHT_DECODE_REQUESTS: Final = 7
ENDPOINT_CLASS_ID: Final = 8
PREFILL_TOKENS_AHEAD: Final = 9
DECODE_BATCH: Final = 10

FeatureMatrix = npt.NDArray[np.float32]


def candidate_features(
    prompt_tokens: int,
    cached_tokens: Sequence[float],
    waiting: Sequence[int],
    running: Sequence[int],
    kv_usage: Sequence[float],
    inflight_prefill_tokens: Sequence[int],
    inflight_decode_requests: Sequence[int],
    endpoint_class_ids: Sequence[int],
) -> FeatureMatrix:
    """Feature rows (N, NUM_FEATURES) for N candidates of one request; sequences align by index."""
    n = len(cached_tokens)
    columns = (
        cached_tokens,
        waiting,
        running,
        kv_usage,
        inflight_prefill_tokens,
        inflight_decode_requests,
        endpoint_class_ids,
    )
    if any(len(column) != n for column in columns):
        raise ValueError("every per-candidate sequence must have one entry per candidate")
    # One conversion of all the lists at once costs less than one per column.
    stacked = np.array(columns, dtype=np.float32)
    out = np.empty((n, NUM_FEATURES), dtype=np.float32)
    out[:, PROMPT_TOKENS] = prompt_tokens
    out[:, CACHED_TOKENS] = stacked[0]
    # Columns 3..8 are the remaining inputs in the order they were stacked.
    out[:, WAITING : ENDPOINT_CLASS_ID + 1] = stacked[1:].T
    uncached = out[:, UNCACHED_TOKENS]
    np.subtract(out[:, PROMPT_TOKENS], out[:, CACHED_TOKENS], out=uncached)
    np.maximum(uncached, 0.0, out=uncached)
    np.add(out[:, INFLIGHT_PREFILL_TOKENS], uncached, out=out[:, PREFILL_TOKENS_AHEAD])
    np.maximum(out[:, RUNNING], out[:, INFLIGHT_DECODE_REQUESTS], out=out[:, DECODE_BATCH])
    return out
