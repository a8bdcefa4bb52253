"""``llmd``: llm-d's inference scheduler in its shipped precise-prefix-cache profile.

The profile, as llm-d ships it (llm-d/llm-d ``guides/precise-prefix-cache-aware/scheduler/
precise-prefix-cache-aware.values.yaml`` at 019a3f3f, image llm-d-inference-scheduler
v0.8.0-rc.1; the same weights in llm-d/llm-d-inference-scheduler
``deploy/config/epp-precise-prefix-cache-config.yaml`` at 17d999e0): decode-filter (a no-op
without prefill/decode disaggregation), then the weighted sum of

* ``precise-prefix-cache-scorer``, weight 2.0 (llm-d-inference-scheduler
  ``pkg/plugins/scorer/precise_prefix_cache.go`` and ``utils.go``,
  ``indexedScoresToNormalizedScoredPods``): each pod's longest prefix of the prompt's blocks
  held in its KV cache (llm-d-kv-cache ``pkg/kvcache/kvblock_scorer.go``,
  ``LongestPrefixScorer``), each block worth its tier's weight (``backend.go``
  ``DefaultKVCacheBackendConfig``: gpu 1.0, cpu 0.8, any other tier the scorer's default
  1.0), then min-max normalised over the pods that hold the first block, taken across the
  whole index and not only the candidates (``GetPodScores`` is asked for every pod):
  ``(score - min) / (max - min)``, 1.0 for each when they are all equal, and 0 for pods
  holding nothing. So with hits on two pods the shorter hit scores 0, like no hit;
* ``kv-cache-utilization-scorer``, weight 1.0 (kubernetes-sigs/gateway-api-inference-extension
  ``pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go``):
  ``1 - KVCacheUsagePercent``, the scraped ``vllm:kv_cache_usage_perc``;
* ``queue-scorer``, weight 1.0 (GIE ``.../plugins/scorer/queue.go``): the scraped
  ``vllm:num_requests_waiting``, min-max normalised over the candidates,
  ``(max - q) / (max - min)``, 1.0 for each when all are equal;

and ``max-score-picker`` (GIE ``.../plugins/picker/max_score_picker.go``): shuffle the
candidates, stable-sort by total score, highest first, so equal totals are broken at random;
it returns one endpoint by default (``DefaultMaxNumOfEndpoints``), the fallbacks listed after
it here are the rest of that order. Scraped figures are used as last scraped, stale or not,
as the GIE scorers read them.
"""

from __future__ import annotations

from scheduler.core.policies.base import (
    NO_HEALTHY_ENDPOINT,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
    eligible,
)
from scheduler.core.policies.registry import register_policy
from scheduler.core.scoring import NO_ELIGIBLE_IN_SUBSET, PrefixMatch

LLMD_PREFIX_WEIGHT = 2.0
LLMD_KV_UTILIZATION_WEIGHT = 1.0
LLMD_QUEUE_WEIGHT = 1.0
# llm-d-kv-cache DefaultKVCacheBackendConfig; a tier it does not list weighs 1.0.
LLMD_GPU_BLOCK_WEIGHT = 1.0
LLMD_CPU_BLOCK_WEIGHT = 0.8
LLMD_OTHER_BLOCK_WEIGHT = 1.0


def prefix_raw_score(match: PrefixMatch) -> float:
    """The tier-weighted longest prefix (kvsched's index gives each block's fastest tier)."""
    return (
        match.gpu_blocks * LLMD_GPU_BLOCK_WEIGHT
        + match.cpu_blocks * LLMD_CPU_BLOCK_WEIGHT
        + match.storage_blocks * LLMD_OTHER_BLOCK_WEIGHT
    )


def normalized_prefix_scores(raw: dict[str, float], names: list[str]) -> list[float]:
    """``indexedScoresToNormalizedScoredPods``: min-max over the pods that have a score."""
    if not raw:
        return [0.0] * len(names)
    low, high = min(raw.values()), max(raw.values())
    out = []
    for name in names:
        score = raw.get(name)
        if score is None:
            out.append(0.0)
        elif low == high:
            out.append(1.0)
        else:
            out.append((score - low) / (high - low))
    return out


def queue_scores(waiting: list[int]) -> list[float]:
    """GIE ``QueueScorer``: shortest queue 1, longest 0, all equal 1."""
    low, high = min(waiting), max(waiting)
    if low == high:
        return [1.0] * len(waiting)
    return [(high - q) / (high - low) for q in waiting]


class LlmdScheduler(RoutingPolicy):
    def __init__(self, setup: PolicySetup) -> None:
        self.weights = (LLMD_PREFIX_WEIGHT, LLMD_KV_UTILIZATION_WEIGHT, LLMD_QUEUE_WEIGHT)

    def route(self, data: PolicyInput) -> Routing:
        candidates = eligible(data.endpoints, data.request.subset)
        if not candidates:
            reason = NO_ELIGIBLE_IN_SUBSET if data.request.subset is not None else NO_HEALTHY_ENDPOINT
            return Routing([], reason, {"policy": "llmd"})
        names = [s.name for s in candidates]
        pool = {s.name for s in data.endpoints}
        raw = {name: prefix_raw_score(match) for name, match in data.matches.items() if name in pool}
        prefix = normalized_prefix_scores({name: score for name, score in raw.items() if score > 0}, names)
        kv = [1.0 - s.kv_usage for s in candidates]
        queue = queue_scores([s.waiting for s in candidates])
        w_prefix, w_kv, w_queue = self.weights
        totals = [w_prefix * p + w_kv * k + w_queue * q for p, k, q in zip(prefix, kv, queue, strict=True)]
        # max-score-picker: a shuffle, then a stable sort on the total, highest first.
        positions = list(range(len(names)))
        data.rng.shuffle(positions)
        positions.sort(key=lambda i: -totals[i])
        order = [names[i] for i in positions][: data.wanted]
        explanation = {"policy": "llmd", "totals": dict(zip(names, totals, strict=True)), "order": order}
        return Routing(order, "", explanation)


register_policy(
    "llmd",
    LlmdScheduler,
    description="llm-d's precise-prefix-cache profile: prefix 2, KV utilisation 1, queue 1, max score.",
)
