"""``kvsched replay --simulate``: a workload through the virtual-time pool, one report per policy."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal, TypedDict, Unpack

from scheduler.core.scheduler import SchedulerConfig
from scheduler.replay.report import build_report
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig
from scheduler.workloads.model import RequestOutcome, SLOTargets, Workload
from scheduler.workloads.oracle import pooled_lru_hit_ratio, workload_ceilings

# Real tokens of KV cache per worker: 1,024 blocks of 512 tokens, the setting of the
# shared Mooncake reference figures (an H100 with Llama-3-8B holds ~440k tokens).
DEFAULT_CAPACITY_TOKENS = 1024 * 512
ENGINE_BLOCK_SIZE = 16
DEFAULT_WORKERS = 8
log = logging.getLogger(__name__)


def capacity_blocks_for(workload: Workload, capacity_tokens: int) -> int:
    return max(1, math.ceil(capacity_tokens / (ENGINE_BLOCK_SIZE * workload.token_scale)))


class SimulationSettings(TypedDict, total=False):
    """What ``simulate`` and ``simulate_seeds`` take besides the workload, policy and seed."""

    workers: int
    capacity_blocks: int | None
    scheduler_config: SchedulerConfig | None
    slo: SLOTargets | None
    # (least, most) time from an engine's KV event to the index.
    kv_event_delay_s: tuple[float, float] | None
    replicas: int
    replica_spread: Literal["round_robin", "random"]
    sync: bool
    sync_delay_s: float
    sync_loss: float
    scrape_interval_s: float | None


def _run_pool(
    workload: Workload,
    *,
    policy: str,
    seed: int,
    workers: int = DEFAULT_WORKERS,
    capacity_blocks: int | None = None,
    scheduler_config: SchedulerConfig | None = None,
    slo: SLOTargets | None = None,
    kv_event_delay_s: tuple[float, float] | None = None,
    replicas: int = 1,
    replica_spread: Literal["round_robin", "random"] = "round_robin",
    sync: bool = False,
    sync_delay_s: float = 0.002,
    sync_loss: float = 0.0,
    scrape_interval_s: float | None = None,
) -> tuple[list[RequestOutcome], float, dict[str, Any]]:
    """One run: its outcomes, the workload's oracle hit ratio and the report's other keys."""
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
    oracle = ceilings.pop("oracle_hit_ratio")
    extra = {
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
    }
    return outcomes, oracle, extra


def simulate(
    workload: Workload, *, policy: str, seed: int = 0, **settings: Unpack[SimulationSettings]
) -> dict[str, Any]:
    """One run's report."""
    outcomes, oracle, extra = _run_pool(workload, policy=policy, seed=seed, **settings)
    return build_report(
        outcomes,
        policy=policy,
        mode="simulate",
        workers=settings.get("workers", DEFAULT_WORKERS),
        oracle_hit_ratio=oracle,
        token_scale=workload.token_scale,
        extra=extra,
    )


# Report keys that are ratios over each run's prompts: pooled, weighted by the run's prompt tokens.
_WEIGHTED_KEYS = ("oracle_hit_ratio", "capacity_ceiling_hit_ratio", "trace_oracle_hit_ratio")
# Report keys that say how every seed's run was set up: the pooled report carries them once.
# (A run's own counts, such as the sync channel's messages, stay in its per-seed report.)
_SETTING_KEYS = (
    "workload",
    "kv_event_delay_s",
    "speculative_placement",
    "capacity_blocks_per_worker",
    "replicas",
    "replica_spread",
    "sync",
    "sync_delay_s",
    "sync_loss",
)


def simulate_seeds(
    workloads: Sequence[tuple[int, Workload]], *, policy: str, **settings: Unpack[SimulationSettings]
) -> dict[str, Any]:
    """One run per (seed, that seed's workload), reported as one pooled run.

    A p99 of one 2,400-request run is its 24th slowest request, and it moves between seeds
    by more than a 5% comparison allows; the pooled report's percentiles, hit ratio and
    prediction error are over every request of every seed. The runs are laid end to end in
    time (each seed's clock starts where the previous one's last request ended), so rates
    over the pooled run are the mean rates of the runs. ``per_seed`` keeps each run's own
    report, less its samples.
    """
    if not workloads:
        raise ValueError("simulate_seeds needs at least one seed")
    pooled: list[RequestOutcome] = []
    per_seed: list[dict[str, Any]] = []
    weighted: dict[str, float] = {}
    weights = 0.0
    offset = 0.0
    first_extra: dict[str, Any] = {}
    workers = settings.get("workers", DEFAULT_WORKERS)
    for seed, workload in workloads:
        outcomes, oracle, extra = _run_pool(workload, policy=policy, seed=seed, **settings)
        report = build_report(
            outcomes,
            policy=policy,
            mode="simulate",
            workers=workers,
            oracle_hit_ratio=oracle,
            token_scale=workload.token_scale,
            extra=extra,
        )
        report.pop("samples", None)
        per_seed.append(report)
        first_extra = first_extra or extra
        weight = float(sum(len(request.prompt_token_ids) for request in workload.requests))
        weights += weight
        for key in _WEIGHTED_KEYS:
            value = report.get(key)
            if value is not None:
                weighted[key] = weighted.get(key, 0.0) + value * weight
        shifted = [_shifted(outcome, offset, f"{seed}:") for outcome in outcomes]
        pooled.extend(shifted)
        offset = max((_last_time(outcome) for outcome in shifted), default=offset)
    means = {key: total / weights for key, total in weighted.items()} if weights else {}
    last = workloads[-1][1]
    return build_report(
        pooled,
        policy=policy,
        mode="simulate",
        workers=workers,
        oracle_hit_ratio=means.get("oracle_hit_ratio"),
        token_scale=last.token_scale,
        extra={
            **{key: first_extra[key] for key in _SETTING_KEYS if key in first_extra},
            **{key: value for key, value in means.items() if key != "oracle_hit_ratio"},
            "seed": [seed for seed, _ in workloads],
            "per_seed": per_seed,
        },
    )


def _shifted(outcome: RequestOutcome, offset: float, prefix: str) -> RequestOutcome:
    """``outcome`` moved ``offset`` seconds later, its id made unique among the seeds'."""

    def later(value: float | None) -> float | None:
        return None if value is None else value + offset

    return dataclasses.replace(
        outcome,
        request_id=prefix + outcome.request_id,
        start_s=outcome.start_s + offset,
        first_token_s=later(outcome.first_token_s),
        end_s=later(outcome.end_s),
        routed_s=later(outcome.routed_s),
    )


def _last_time(outcome: RequestOutcome) -> float:
    times = (outcome.start_s, outcome.first_token_s, outcome.end_s, outcome.routed_s)
    return max(t for t in times if t is not None)


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
