"""Several kvsched replicas in the virtual-time pool: arrivals spread over them, every KV
event and scrape reaching each, and their in-flight sharing over a lossy, delayed channel."""

from __future__ import annotations

import pytest

from scheduler.core.peerload import PeerSyncConfig
from scheduler.core.scheduler import SchedulerConfig
from scheduler.replay.simulate import simulate, simulate_seeds
from scheduler.sim.virtual import VirtualPool, VirtualPoolConfig
from scheduler.workloads.generators import generate


def _pool(replicas: int, *, sync: bool, spread: str = "round_robin", loss: float = 0.0) -> VirtualPool:
    config = SchedulerConfig(sync=PeerSyncConfig(enabled=sync))
    pool_config = VirtualPoolConfig(
        workers=4,
        capacity_blocks=4096,
        replicas=replicas,
        replica_spread=spread,  # type: ignore[arg-type]
        sync_delay_s=0.005,
        sync_loss=loss,
    )
    return VirtualPool(pool_config, config)


@pytest.mark.parametrize("spread", ["round_robin", "random"])
def test_arrivals_spread_over_the_replicas_and_every_request_is_served(spread: str) -> None:
    workload = generate("rag", requests=120, rate=20.0)
    pool = _pool(3, sync=False, spread=spread)
    outcomes = pool.run(workload.requests)
    assert all(outcome.ok for outcome in outcomes)
    per_replica = [replica.completions for replica in pool.replicas]
    assert sum(per_replica) == 120
    if spread == "round_robin":
        assert per_replica == [40, 40, 40]
    else:
        assert min(per_replica) > 20 and per_replica != [40, 40, 40]
    # Every replica saw the same KV events: one index, and each replica's scrape of it.
    assert all(replica.index is pool.scheduler.index for replica in pool.replicas)
    assert pool.sync_sent == 0


def test_a_lossy_channel_leaves_no_phantom_load() -> None:
    workload = generate("chat", requests=120, rate=8.0)
    pool = _pool(3, sync=True, loss=0.3)
    outcomes = pool.run(workload.requests)
    assert all(outcome.ok for outcome in outcomes)
    assert pool.sync_dropped > 0
    stats = [replica.peer_load.stats for replica in pool.replicas]
    assert sum(s.lost for s in stats) > 0
    assert sum(sum(s.reclaimed.values()) for s in stats) > 0
    # Once every request is done, one more snapshot from each replica and no peer load is left.
    end = max(outcome.end_s or 0.0 for outcome in outcomes) + 0.1
    for sender in pool.replicas:
        sender.take_sync_messages()
        sender.send_snapshot(end)
    for sender in pool.replicas:
        for message in sender.take_sync_messages():
            for target in pool.replicas:
                target.receive_sync(message, end + 0.01)
    assert [replica.peer_load.entries() for replica in pool.replicas] == [0, 0, 0]


def test_the_report_carries_the_replicas_and_their_channel() -> None:
    workload = generate("chat", requests=60, rate=8.0)
    report = simulate(workload, policy="kvsched", workers=4, replicas=2, sync=True, sync_loss=0.1)
    assert report["replicas"] == 2 and report["sync"] is True
    assert sum(report["requests_per_replica"]) == 60
    assert report["sync_messages_sent"] >= report["sync_messages_dropped"] > 0
    assert report["sync_lag_mean_s"] == pytest.approx(0.002, abs=1e-3)


def test_pooled_seeds_keep_each_runs_channel_counts_apart() -> None:
    workloads = [(seed, generate("chat", seed=seed, requests=40, rate=8.0)) for seed in (0, 1)]
    report = simulate_seeds(workloads, policy="kvsched", workers=4, replicas=2, sync=True, sync_loss=0.1)
    # The set-up once; the counts of each run's channel only in that run's report.
    assert report["replicas"] == 2 and report["sync"] is True and report["sync_loss"] == 0.1
    assert "sync_messages_sent" not in report and "requests_per_replica" not in report
    assert [sum(run["requests_per_replica"]) for run in report["per_seed"]] == [40, 40]
    assert all(run["sync_messages_sent"] > 0 for run in report["per_seed"])
    assert report["requests"] == 80
