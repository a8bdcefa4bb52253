"""``kvsched replay --simulate``: a workload through the virtual-time pool, one report per policy."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from scheduler.core.scheduler import SchedulerConfig
from scheduler.replay.report import build_report
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig
from scheduler.workloads.model import SLOTargets, Workload
from scheduler.workloads.oracle import pooled_lru_hit_ratio, workload_ceilings

# Real tokens of KV cache per worker: 1,024 blocks of 512 tokens, the setting of the
# shared Mooncake reference figures (an H100 with Llama-3-8B holds ~440k tokens).
DEFAULT_CAPACITY_TOKENS = 1024 * 512
ENGINE_BLOCK_SIZE = 16
log = logging.getLogger(__name__)


def capacity_blocks_for(workload: Workload, capacity_tokens: int) -> int:
    return max(1, math.ceil(capacity_tokens / (ENGINE_BLOCK_SIZE * workload.token_scale)))


def simulate(
    workload: Workload,
    *,
    policy: str,
    workers: int = 8,
    capacity_blocks: int | None = None,
    seed: int = 0,
    scheduler_config: SchedulerConfig | None = None,
    slo: SLOTargets | None = None,
    scrape_interval_s: float | None = None,
) -> dict[str, Any]:
    blocks = capacity_blocks or capacity_blocks_for(workload, DEFAULT_CAPACITY_TOKENS)
    pool_config = VirtualPoolConfig(
        workers=workers,
        block_size=ENGINE_BLOCK_SIZE,
        capacity_blocks=blocks,
        token_scale=workload.token_scale,
        slo=slo or SLOTargets(),
    )
    if scrape_interval_s is not None:  # None: the virtual pool's own default
        pool_config = dataclasses.replace(pool_config, scrape_interval_s=scrape_interval_s)
    base = scheduler_config or SchedulerConfig()
    config = base.model_copy(update={"policy": policy, "seed": seed})
    started = time.perf_counter()
    outcomes = VirtualPool(pool_config, config).run(workload.requests)
    # Wall time stays out of the report: same seed, same JSON.
    log.info("simulated %d requests with %s in %.1fs", len(outcomes), policy, time.perf_counter() - started)
    ceilings = workload_ceilings(workload.requests, workload.block_tokens)
    return build_report(
        outcomes,
        policy=policy,
        mode="simulate",
        workers=workers,
        oracle_hit_ratio=ceilings.pop("oracle_hit_ratio"),
        token_scale=workload.token_scale,
        extra={
            **ceilings,
            "workload": workload.name,
            "seed": seed,
            "capacity_blocks_per_worker": blocks,
            "capacity_ceiling_hit_ratio": pooled_lru_hit_ratio(
                workload.requests,
                workload.block_tokens,
                blocks * workers * ENGINE_BLOCK_SIZE // workload.block_tokens,
            ),
        },
    )
