"""``kvsched replay --simulate``: a workload through the virtual-time pool, one report per policy."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Literal

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
    kv_event_delay_s: tuple[float, float] | None = None,
    replicas: int = 1,
    replica_spread: Literal["round_robin", "random"] = "round_robin",
    sync: bool = False,
    sync_delay_s: float = 0.002,
    sync_loss: float = 0.0,
    scrape_interval_s: float | None = None,
) -> dict[str, Any]:
    """``kv_event_delay_s``: (least, most) time from an engine's KV event to the index."""
    blocks = capacity_blocks or capacity_blocks_for(workload, DEFAULT_CAPACITY_TOKENS)
    delay: dict[str, Any] = {}
    if kv_event_delay_s is not None:
        delay = {"kv_event_delay_s": kv_event_delay_s[0], "kv_event_delay_max_s": kv_event_delay_s[1]}
    pool_config = VirtualPoolConfig(
        workers=workers,
        block_size=ENGINE_BLOCK_SIZE,
        capacity_blocks=blocks,
        token_scale=workload.token_scale,
        slo=slo or SLOTargets(),
        **delay,
        replicas=replicas,
        replica_spread=replica_spread,
        sync_delay_s=sync_delay_s,
        sync_loss=sync_loss,
    )
    if scrape_interval_s is not None:  # None: the virtual pool's own default
        pool_config = dataclasses.replace(pool_config, scrape_interval_s=scrape_interval_s)
    base = scheduler_config or SchedulerConfig()
    sync_config = base.sync.model_copy(update={"enabled": sync})
    config = base.model_copy(update={"policy": policy, "seed": seed, "sync": sync_config})
    started = time.perf_counter()
    pool = VirtualPool(pool_config, config)
    outcomes = pool.run(workload.requests)
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
            "kv_event_delay_s": [pool_config.kv_event_delay_s, pool_config.kv_event_delay_max_s],
            "speculative_placement": config.speculative.enabled,
            "capacity_blocks_per_worker": blocks,
            "replicas": replicas,
            **(replica_figures(pool) if replicas > 1 else {}),
            "capacity_ceiling_hit_ratio": pooled_lru_hit_ratio(
                workload.requests,
                workload.block_tokens,
                blocks * workers * ENGINE_BLOCK_SIZE // workload.block_tokens,
            ),
        },
    )


def replica_figures(pool: VirtualPool) -> dict[str, Any]:
    """The replicas and their sync channel, for the report."""
    sync = pool.syncing
    figures: dict[str, Any] = {
        "replica_spread": pool.config.replica_spread,
        "sync": sync,
        "requests_per_replica": [replica.completions for replica in pool.replicas],
    }
    if sync:
        stats = [replica.peer_load.stats for replica in pool.replicas]
        received = sum(s.received for s in stats)
        reclaimed: dict[str, int] = {}
        for s in stats:
            for how, count in s.reclaimed.items():
                reclaimed[how] = reclaimed.get(how, 0) + count
        figures.update(
            sync_delay_s=pool.config.sync_delay_s,
            sync_loss=pool.config.sync_loss,
            sync_messages_sent=pool.sync_sent,
            sync_messages_dropped=pool.sync_dropped,
            sync_messages_received=received,
            sync_messages_lost_seen=sum(s.lost for s in stats),
            sync_lag_mean_s=sum(s.lag_sum_s for s in stats) / received if received else 0.0,
            sync_phantom_reclaimed=reclaimed,
            # Peer picks assumed concurrent with a replica's own, and those a routing from that
            # peer replaced before the lag had passed.
            sync_expected=sum(s.expected for s in stats),
            sync_expected_replaced=sum(s.expected_replaced for s in stats),
            sync_agreement_samples=sum(s.agreement_samples for s in stats),
            sync_agreement_ratio=(
                sum(s.agreement_same for s in stats) / max(sum(s.agreement_samples for s in stats), 1)
            ),
        )
    return figures
