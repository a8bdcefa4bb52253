"""When a starting replica's view is warm enough to route: the readiness gate of ``kvsched serve``.

A replica that starts (a restart after a crash, a rollout, a scale-up) has an empty prefix
index and knows nothing of what its peers have in flight. Reporting ready at once sends
requests its way that it routes as if every cache were cold, and in a pool of replicas the
gateway would rather keep them on a warm one. So readiness waits until:

* **KV events**: every publisher's history is settled: it sent a batch and no replay is in
  flight (the replay that a late join, a gap or a reconnect asks for has completed, or
  failed or fallen short, which ingest declares by marking the view incomplete: waiting
  longer would not bring it back), or it publishes no events at all. A publisher that has
  sent nothing yet holds readiness for at most ``kv_first_batch_wait_s``: vLLM publishes
  only when its cache changes, so an idle engine's history cannot be learned by waiting.
* **Peers' in-flight load** (sync on): a snapshot from every peer the transport knows, and
  from at least one, for at most ``peer_snapshot_wait_s``: a live peer sends one every
  ``scheduler.sync.snapshot_interval_s``, so none after a few intervals means none is there.
* Whatever still waits after ``max_wait_s`` is given up on (logged, reported): a publisher
  replaying without end must not keep a replica out of service for good.

Warm is a latch. Once reached it stays: a later gap and its replay affect one publisher's
view for a moment, and flipping readiness with it could take every replica out of the
gateway at once when all of them see the same publisher's gap (FailClose then fails every
request).

Core, like the rest of ``scheduler/core``: the views and ``now`` are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core.kvingest import PublisherView


class WarmupConfig(BaseModel):
    """How long a starting replica may wait for its view to warm before it reports ready."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Report ready only once the KV-event replays and the peers' snapshots are in."
    )
    # Under load an engine publishes every step (tens of ms) and a subscription connects in
    # ZMQ's reconnect interval (100 ms): 5 s is ample, and an idle pool delays a replica's
    # readiness by only that much (the chart's startupProbe allows 120 s).
    kv_first_batch_wait_s: float = Field(
        5.0, ge=0, description="How long a publisher that has sent no batch yet holds readiness."
    )
    # Three snapshot intervals at the default 1 s: a live peer's first snapshot goes out when
    # it starts and then every interval, and ZMQ's connection takes a fraction of one.
    peer_snapshot_wait_s: float = Field(
        3.0, ge=0, description="How long the peers' first snapshots hold readiness (sync on)."
    )
    max_wait_s: float = Field(
        30.0, ge=0, description="Ready after this long whatever still waits (logged and reported)."
    )


@dataclass(frozen=True, slots=True)
class WarmupState:
    """Where the warm-up stands: ``warm``, since when, and what it waits (or gave up) on."""

    warm: bool
    waiting: tuple[str, ...]
    warm_at: float | None = None
    # What was still cold when a bound ran out (empty when everything settled).
    given_up: tuple[str, ...] = ()

    def as_dict(self, started_at: float) -> dict[str, object]:
        return {
            "warm": self.warm,
            "warm_after_s": None if self.warm_at is None else self.warm_at - started_at,
            "waiting": list(self.waiting),
            "given_up": list(self.given_up),
        }


def publisher_waits(view: PublisherView) -> str | None:
    """Why one publisher's view is not settled yet, or None when it is."""
    name = f"{view.endpoint}#{view.rank}" if view.rank else view.endpoint
    if view.state == "fallback":
        return None
    if view.replay_in_flight:
        return f"{name}: replay in flight"
    if view.next_seq is None:
        return f"{name}: no KV-event batch yet"
    return None


class Warmup:
    """The readiness gate: feed it the views at each readiness check, it says whether warm."""

    def __init__(self, config: WarmupConfig, started_at: float) -> None:
        self.config = config
        self.started_at = started_at
        # Off: warm from the start, as before readiness waited for anything.
        self.state = WarmupState(True, (), started_at) if not config.enabled else WarmupState(False, ())

    @property
    def warm(self) -> bool:
        return self.state.warm

    def update(
        self,
        now: float,
        publishers: Sequence[PublisherView],
        *,
        sync: bool = False,
        peers_known: int = 0,
        peers_with_snapshot: int = 0,
    ) -> WarmupState:
        """The state as of ``now``; once warm, the inputs are not read again (a latch)."""
        if self.state.warm:
            return self.state
        config = self.config
        elapsed = now - self.started_at
        waiting: list[str] = []
        bounded: list[str] = []
        for view in publishers:
            why = publisher_waits(view)
            if why is None:
                continue
            # Only silence is bounded here: a replay in flight ends by itself (it completes,
            # or ingest's replay timeout fails it), or max_wait_s ends the wait.
            if (
                view.next_seq is None
                and not view.replay_in_flight
                and elapsed >= config.kv_first_batch_wait_s
            ):
                bounded.append(why)
            else:
                waiting.append(why)
        if sync and peers_with_snapshot < max(1, peers_known):
            why = f"peers' snapshots: {peers_with_snapshot} of {max(1, peers_known)}"
            (bounded if elapsed >= config.peer_snapshot_wait_s else waiting).append(why)
        if waiting and elapsed >= config.max_wait_s:
            bounded.extend(waiting)
            waiting = []
        if waiting:
            self.state = WarmupState(False, tuple(waiting))
        else:
            self.state = WarmupState(True, (), now, tuple(bounded))
        return self.state
