"""The registry of routed requests awaiting their observation stream (adapters/extproc/observed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.adapters.extproc.observed import Observations
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.core.peerload import PeerSyncConfig


@dataclass
class Request:
    released: list[tuple[str, float]] = field(default_factory=list)

    def observation_ended(self, now: float) -> None:
        self.released.append(("observation_ended", now))

    def expire(self, now: float) -> None:
        self.released.append(("expired", now))


def registry() -> tuple[Observations, ExtProcStats]:
    stats = ExtProcStats()
    return Observations(stats, replica=lambda: "kvsched-0", bounds=PeerSyncConfig()), stats


def test_ids_are_unique_and_name_the_replica() -> None:
    observations, _ = registry()
    other, _ = registry()
    ids = [observations.new_id() for _ in range(3)]
    assert len(set(ids)) == 3 and all(i.endswith(".kvsched-0") for i in ids)
    # Same replica name, another start: a different nonce, so no id repeats across restarts.
    assert not set(ids) & {other.new_id() for _ in range(3)}


def test_an_unobserved_request_is_released_at_its_bound() -> None:
    observations, _ = registry()
    quick, slow, unpredicted = Request(), Request(), Request()
    # 4x the predicted end-to-end latency, at least 5 s; 60 s without a prediction.
    observations.routed("a", quick, 100.0, (200.0, 10.0, "model"), 10)  # 0.3 s predicted -> 5 s
    observations.routed("b", slow, 100.0, (1000.0, 50.0, "model"), 100)  # 6 s -> 24 s
    observations.routed("c", unpredicted, 100.0, None, None)
    assert observations.expire(104.9) == 0
    assert observations.expire(105.0) == 1 and quick.released == [("expired", 105.0)]
    assert observations.expire(123.9) == 0
    assert observations.expire(124.0) == 1 and slow.released == [("expired", 124.0)]
    assert observations.expire(160.0) == 1 and unpredicted.released
    assert len(observations) == 0


def test_an_observed_request_waits_for_its_observation_stream() -> None:
    observations, stats = registry()
    request = Request()
    routed_id = observations.new_id()
    observations.routed(routed_id, request, 0.0, None, None)
    assert observations.claim(routed_id) is request
    # A second observation of the same request is not attached to it.
    assert observations.claim(routed_id) is None
    assert observations.expire(1_000.0) == 0 and not request.released
    observations.done(routed_id)
    assert len(observations) == 0 and stats.outcomes["observation"] == 1


def test_an_observation_nobody_here_routed_is_counted_and_dropped() -> None:
    observations, stats = registry()
    mine = observations.new_id()
    assert observations.claim(mine) is None  # routed here before a restart, or already released
    assert observations.claim("1.0badcafe.kvsched-1") is None  # routed by another replica
    assert stats.outcomes["observation_unknown"] == 1
    assert stats.outcomes["observation_foreign"] == 1
