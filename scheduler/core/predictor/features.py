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
11. ``queued_prefill_tokens``: prefill tokens estimated to still be queued there ahead of
    this request: what kvsched routed, drained at the endpoint's measured prefill rate
    (``core/prefillqueue.py``). Column 6 counts a long prompt as all still to do until its
    first token, though its chunks have been running for seconds.
12. ``prefill_ahead_ms``: column 11 at the endpoint's measured rate, in milliseconds: the
    wait for the queue ahead (0 while no rate is measured).
13. ``own_prefill_ms``: column 2 at the same rate: this request's own prefill time there.
14. ``estimated_prefill_ms``: columns 12 + 13, the prefill a first token waits for. What a
    TTFT is mostly made of, in time, whatever the endpoint's speed and the tokens' scale:
    the prior's main term (its coefficient is learned from how prompt sizes vary even while
    nothing queues, and carries over to queues never seen), and a split trees use where raw
    token counts would need one per speed.
15. ``ms_since_endpoint_event``: milliseconds since the endpoint was last seen ending an
    engine iteration, capped at 10 s (also when it never was): a first token, a finished
    request, or a KV-event batch (vLLM publishes one after each step that stored or removed
    blocks, and decoding requests fill a block every few steps). A new request waits for the
    iteration in progress (up to ~0.3 s while an 8,192-token prefill chunk runs): the one
    part of the wait no count of queued work tells, and the largest error left on short
    requests to busy endpoints. With first tokens and completions alone most picks on the
    rag workload were 20-100 ms past the last one, several iterations, which says little of
    the one in progress; with the batches most are within one.
16. ``own_attention_pairs``: the causal (query, key) pairs of this request's own prefill,
    ``uncached * cached + uncached * (uncached + 1) / 2``. Prefill attention is quadratic in
    the context, so a prefill rate per token cannot price both short and long prompts: on
    the Mooncake conversation trace (prompts up to ~100k tokens, Llama-3-8B's costs in
    sim/latency.py) a prior linear in tokens alone fitted idle-engine TTFTs with a MAPE of
    25%, one with this column too 18%.
17. ``decode_context_tokens``: prompt tokens of kvsched's own requests decoding there
    (routed there and past their first token). Every engine iteration reads each decoding
    request's whole KV cache, a prefix shared by many of them once per request, so this is
    the read the iterations a first token waits for carry; scraped KV usage counts a shared
    prefix's blocks once. On the agentic workload (every agent's context starts with the
    same 2k-token tool prompt) TTFT MAPE near saturation was 15.2% without it, 14.7% with
    it (``kvsched bench policies --size short``).
"""

from __future__ import annotations

import math
import struct
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
    "queued_prefill_tokens",
    "prefill_ahead_ms",
    "own_prefill_ms",
    "estimated_prefill_ms",
    "ms_since_endpoint_event",
    "own_attention_pairs",
    "decode_context_tokens",
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
QUEUED_PREFILL_TOKENS: Final = 11
PREFILL_AHEAD_MS: Final = 12
OWN_PREFILL_MS: Final = 13
ESTIMATED_PREFILL_MS: Final = 14
MS_SINCE_ENDPOINT_EVENT: Final = 15
OWN_ATTENTION_PAIRS: Final = 16
DECODE_CONTEXT_TOKENS: Final = 17
# Ages beyond this say only "a long time": the cap keeps the column's range bounded.
EVENT_AGE_CAP_MS: Final = 10_000.0

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
    queued_prefill_tokens: Sequence[float] | None = None,
    prefill_tokens_per_s: Sequence[float] | None = None,
    last_event_age_s: Sequence[float | None] | None = None,
    decode_context_tokens: Sequence[int] | None = None,
) -> FeatureMatrix:
    """Feature rows (N, NUM_FEATURES) for N candidates of one request; sequences align by
    index. Without ``queued_prefill_tokens`` (or rates) those columns are 0; without event
    ages, the cap."""
    n = len(cached_tokens)
    zeros = [0.0] * n
    ages = (
        [EVENT_AGE_CAP_MS] * n
        if last_event_age_s is None
        else [EVENT_AGE_CAP_MS if a is None else min(a * 1000.0, EVENT_AGE_CAP_MS) for a in last_event_age_s]
    )
    columns = (
        cached_tokens,
        waiting,
        running,
        kv_usage,
        inflight_prefill_tokens,
        inflight_decode_requests,
        endpoint_class_ids,
        zeros if queued_prefill_tokens is None else queued_prefill_tokens,
        zeros if prefill_tokens_per_s is None else prefill_tokens_per_s,
        ages,
        zeros if decode_context_tokens is None else decode_context_tokens,
    )
    if any(len(column) != n for column in columns):
        raise ValueError("every per-candidate sequence must have one entry per candidate")
    # One conversion of all the lists at once costs less than one per column.
    stacked = np.array(columns, dtype=np.float32)
    out = np.empty((n, NUM_FEATURES), dtype=np.float32)
    out[:, PROMPT_TOKENS] = prompt_tokens
    out[:, CACHED_TOKENS] = stacked[0]
    # Columns 3..8 are the next inputs in the order they were stacked.
    out[:, WAITING : ENDPOINT_CLASS_ID + 1] = stacked[1:7].T
    uncached = out[:, UNCACHED_TOKENS]
    np.subtract(out[:, PROMPT_TOKENS], out[:, CACHED_TOKENS], out=uncached)
    np.maximum(uncached, 0.0, out=uncached)
    np.add(out[:, INFLIGHT_PREFILL_TOKENS], uncached, out=out[:, PREFILL_TOKENS_AHEAD])
    np.maximum(out[:, RUNNING], out[:, INFLIGHT_DECODE_REQUESTS], out=out[:, DECODE_BATCH])
    out[:, QUEUED_PREFILL_TOKENS] = stacked[7]
    # Milliseconds per token at each endpoint's rate; 0 where no rate is measured yet.
    rate = stacked[8]
    ms_per_token = np.divide(1000.0, rate, out=np.zeros(n, dtype=np.float32), where=rate > 0.0)
    np.multiply(stacked[7], ms_per_token, out=out[:, PREFILL_AHEAD_MS])
    np.multiply(uncached, ms_per_token, out=out[:, OWN_PREFILL_MS])
    np.add(out[:, PREFILL_AHEAD_MS], out[:, OWN_PREFILL_MS], out=out[:, ESTIMATED_PREFILL_MS])
    out[:, MS_SINCE_ENDPOINT_EVENT] = stacked[9]
    # uncached * (cached + (uncached + 1) / 2), one float32 step at a time (candidate_row
    # repeats the steps).
    pairs = out[:, OWN_ATTENTION_PAIRS]
    np.add(uncached, 1.0, out=pairs)
    np.multiply(pairs, 0.5, out=pairs)
    np.add(pairs, out[:, CACHED_TOKENS], out=pairs)
    np.multiply(pairs, uncached, out=pairs)
    out[:, DECODE_CONTEXT_TOKENS] = stacked[10]
    return out


_FLOAT32 = struct.Struct("f")


def _f32(value: float) -> float:
    """``value`` rounded to float32, as numpy rounds it (overflow to infinity included)."""
    try:
        rounded: float = _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return rounded


def candidate_row(
    prompt_tokens: int,
    cached_tokens: float,
    waiting: int,
    running: int,
    kv_usage: float,
    inflight_prefill_tokens: int,
    inflight_decode_requests: int,
    endpoint_class_id: int,
    queued_prefill_tokens: float,
    prefill_tokens_per_s: float,
    last_event_age_s: float | None,
    decode_context_tokens: int = 0,
) -> FeatureMatrix:
    """One candidate's row (shape (NUM_FEATURES,)), bit for bit ``candidate_features``' row.

    A pick computes the chosen endpoint's row alone (to train on once its latencies are
    known): numpy's per-call cost over one row was 13.6% of a pick at 8 endpoints (py-spy,
    ``kvsched bench epp --scaling``'s pick). Each step is done in float64 and rounded to
    float32: for one +, -, * or / of float32 operands that is the float32 result exactly
    (float64 carries more than 2 x 24 + 2 bits), so the row is the same to the bit.
    """
    f32 = _f32
    prompt = f32(prompt_tokens)
    cached = f32(cached_tokens)
    uncached = f32(prompt - cached)
    if uncached < 0.0:
        uncached = 0.0
    inflight_prefill = f32(inflight_prefill_tokens)
    queued = f32(queued_prefill_tokens)
    rate = f32(prefill_tokens_per_s)
    ms_per_token = f32(1000.0 / rate) if rate > 0.0 else 0.0
    ahead_ms = f32(queued * ms_per_token)
    own_ms = f32(uncached * ms_per_token)
    age_ms = (
        EVENT_AGE_CAP_MS if last_event_age_s is None else min(last_event_age_s * 1000.0, EVENT_AGE_CAP_MS)
    )
    row: FeatureMatrix = np.array(
        (
            prompt,
            cached,
            uncached,
            waiting,
            running,
            kv_usage,
            inflight_prefill,
            inflight_decode_requests,
            endpoint_class_id,
            f32(inflight_prefill + uncached),
            max(running, inflight_decode_requests),
            queued,
            ahead_ms,
            own_ms,
            f32(ahead_ms + own_ms),
            age_ms,
            f32(f32(f32(f32(uncached + 1.0) * 0.5) + cached) * uncached),
            decode_context_tokens,
        ),
        dtype=np.float32,
    )
    return row
