"""The registry of routed requests awaiting their observation stream (adapters/extproc/observed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from scheduler.adapters.extproc.observed import ForwardedObservation, Observations
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.extproc.usage import Usage
from scheduler.codec.peersync import (
    BROKEN,
    COMPLETED,
    FIRST_BYTE,
    ObservedResponse,
    PeerSyncDecodeError,
    decode,
    decode_any,
    encode_observed,
)
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
    dotted = Observations(ExtProcStats(), replica=lambda: "kvsched-0.kvsched.default")
    assert dotted.replica_name == "kvsched-0.kvsched.default"


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
    assert observations.claim("1.0badcafe.kvsched-1") is None  # another replica's, no sync channel
    assert stats.outcomes["observation_unknown"] == 1
    assert stats.outcomes["observation_foreign"] == 1


@dataclass
class Routed:
    """A request routed here, as the transports' request states take an observation."""

    events: list[tuple[object, ...]] = field(default_factory=list)

    def first_byte(self, now: float) -> None:
        self.events.append(("first_byte", now))

    def complete_with(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        self.events.append(("complete", now, status, served, usage))

    def observation_ended(self, now: float) -> None:
        self.events.append(("ended", now))

    def expire(self, now: float) -> None:
        self.events.append(("expired", now))


def test_an_observation_of_a_peers_request_goes_to_that_peer_over_the_sync_channel() -> None:
    """Replica A routed it, the observation landed on B: B reads the response and sends what
    it saw (through the sync codec, as on the wire); A applies it as if it had seen it."""
    a, a_stats = registry()
    b = Observations(ExtProcStats(), replica=lambda: "kvsched-1")
    wire: list[bytes] = []
    b.forward = lambda observed: wire.append(encode_observed(observed, 1_000.0))
    routed = Routed()
    routed_id = a.new_id()
    a.routed(routed_id, routed, 10.0, (100.0, 10.0, "model"), 4)
    forwarder = b.claim(routed_id)
    assert isinstance(forwarder, ForwardedObservation)
    forwarder.first_byte(11.0)
    forwarder.first_byte(11.5)  # only the first counts
    forwarder.complete_with(12.0, 200, "10.0.0.7:8000", Usage(None, 4, 32))
    forwarder.observation_ended(12.1)  # the stream's end after a complete response: nothing more
    assert len(wire) == 2
    for at, frame in zip((11.0, 12.0), wire, strict=True):
        observed, _ = decode_any(frame)
        assert isinstance(observed, ObservedResponse) and observed.replica == "kvsched-1"
        a.receive(observed, at)
        b.receive(observed, at)  # every peer gets it; B routed nothing and ignores it
    assert routed.events == [
        ("first_byte", 11.0),
        ("complete", 12.0, 200, "10.0.0.7:8000", Usage(None, 4, 32)),
    ]
    assert a_stats.outcomes["observation_remote"] == 1


def test_a_remote_observation_that_breaks_off_releases_the_request() -> None:
    a, _ = registry()
    routed = Routed()
    routed_id = a.new_id()
    a.routed(routed_id, routed, 0.0, None, None)
    a.receive(ObservedResponse("kvsched-1", routed_id, BROKEN), 3.0)
    assert routed.events == [("ended", 3.0)]


def test_a_remote_first_byte_restarts_the_bound() -> None:
    a, _ = registry()
    routed = Routed()
    routed_id = a.new_id()
    a.routed(routed_id, routed, 0.0, (1000.0, 0.0, "model"), 1)  # 4 s -> at least 5 s
    a.receive(ObservedResponse("kvsched-1", routed_id, FIRST_BYTE, True), 4.0)
    assert a.expire(5.0) == 0  # the first bound passed, the one from the first byte has not
    assert a.expire(9.0) == 1 and routed.events[-1] == ("expired", 9.0)


def test_an_observed_response_frame_round_trips_and_is_not_a_load_message() -> None:
    observed = ObservedResponse("r", "1.abcd0123.r", COMPLETED, True, 503, None, None, 7)
    frame = encode_observed(observed, 5.0)
    assert decode_any(frame) == (observed, 5.0)
    with pytest.raises(PeerSyncDecodeError):
        decode(frame)
