"""In-flight load shared between kvsched replicas.

Every replica sees every KV event and every scrape, so the prefix index and the scraped
figures agree across replicas; the requests each one routed do not. Between two scrapes a
replica that counts only its own requests sees 1/N of what is queued and N replicas pile onto
the same best-cached, apparently idle endpoint. Each replica therefore tells its peers what
it routed (request, endpoint, prefill tokens) and when it released it (first token,
completion, failure), and counts their requests with its own.

The channel may lose, delay or cut messages off, and replicas restart, so nothing here trusts
a message to arrive:

* **Expiry**: a peer's entry lasts ``ttl_factor`` times the latency the routing replica
  predicted for it (its prefill part that many times the predicted TTFT), at least
  ``min_ttl_s``; a lost release costs at most that long of phantom load.
* **Snapshots**: every ``snapshot_interval_s`` a replica sends the whole list of what it has
  in flight; a peer replaces that replica's entries with it, so a lost ``Routed`` is added
  and a lost release is reclaimed one interval later. A snapshot is also the heartbeat.
* **Sequence numbers** count what was lost (a gap), and make applying a message twice a
  no-op; a message older than the last snapshot applied is ignored (the snapshot covers it).
* **Incarnations**: a replica numbers each start (its start time); a peer seeing a newer
  incarnation drops everything the old one sent, and ignores the old one's late messages,
  so a restarted replica is never counted twice.
* **Partitions**: a peer silent for ``peer_timeout_s`` (several snapshot intervals) is
  dropped with its entries.
* **Reconciliation against scrapes**: for a peer whose snapshots stopped arriving, when an
  endpoint's scrape shows fewer requests (waiting + running) than the replica counts there
  among requests routed long enough ago for the engine to know them, the peer entries
  beyond that count that are past their predicted completion are reclaimed, oldest first.
  Only silent peers and overdue entries: a scrape can trail the releases by up to an engine
  step (an engine stops counting a request when the step that finishes it starts, its
  release comes when the step ends), and in the simulator trimming every entry the scrape
  did not show reclaimed thousands of live requests on the conversation trace with no
  message lost.

What the peers routed within the last sync delay cannot have arrived yet, and since the
replicas' views agree, concurrent picks agree too: they pile onto the same pod. Two things
decorrelate them (``slot`` and ``expect``): a pick made in a burst takes its replica's slot
of what one replica would pick for one request per replica arriving together, and counts
one request like it for every peer, on that peer's slot, until the peer's next routing
arrives or the delay (the measured lag) has passed. A replica without peers never does
either, so one replica decides exactly as without them.

Core, like the rest of ``scheduler/core``: time is passed in, nothing is read from a clock,
no I/O; the transport is ``scheduler/adapters/peersync.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FIRST_TOKEN: Literal["first_token"] = "first_token"
# Block keys a sampled routing carries: 1,024 keys are 8 KB on the wire and cover prompts of
# 16k tokens at 16-token blocks; a longer prompt is judged on its first 1,024 blocks.
AGREEMENT_MAX_KEYS = 1024
# A speculative placement's keys in a routing message: 16k tokens of prefix at 16-token
# blocks, 9 bytes a key in msgpack (~9 KB); a longer prompt's placement is shared that far.
PLACED_MAX_KEYS = 1024
DONE: Literal["done"] = "done"


class PeerSyncConfig(BaseModel):
    """Sharing in-flight load with the other kvsched replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Tell peers what this replica routed and count theirs.")
    snapshot_interval_s: float = Field(
        1.0, gt=0, description="How often the whole in-flight list goes out (repairs lost messages)."
    )
    peer_timeout_s: float = Field(
        5.0, gt=0, description="A peer silent this long is dropped with everything it routed."
    )
    # The predictor's error is large on short requests (TTFT MAPE 37-45% on the conversation
    # trace, often 2x on a busy engine): at 3x and a 2 s floor, 5,500 of 36,000 peer entries
    # expired before their release on that trace with nothing lost. Expiry only covers a
    # release and every later snapshot lost together, so a generous bound costs little.
    ttl_factor: float = Field(
        4.0, gt=0, description="A peer's entry expires after this many times its predicted latency."
    )
    min_ttl_s: float = Field(5.0, gt=0, description="Least lifetime of a peer's entry.")
    default_ttl_s: float = Field(
        60.0, gt=0, description="Lifetime of an entry routed without a latency prediction."
    )
    agreement_sample_every: int = Field(
        32,
        ge=0,
        description="One routing in this many carries its prompt's block keys, so peers can say "
        "whether they would have picked the same endpoint (0 = never).",
    )
    reconcile_grace_s: float = Field(
        0.5,
        ge=0,
        description="Entries younger than this are left out of reconciliation against a scrape "
        "(the scrape may predate the request reaching the engine).",
    )
    expect_concurrent: bool = Field(
        True,
        description="With each spread pick, count one request like it per peer, on that peer's "
        "slot, until the sync delay has passed or the peer's next routing arrives: the peers' "
        "picks made meanwhile cannot have been seen yet, and in a burst each makes one.",
    )
    spread_concurrent: Literal["off", "auto", "always"] = Field(
        "auto",
        description="Replica r of N picks what one replica would pick for the r-th of N "
        "requests like this one arriving together ('always'); 'auto': only for a pick within "
        "the sync delay of this replica's previous one, or every pick while "
        "spread_burst_share of its recent picks were.",
    )
    spread_burst_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="'auto': spread every pick while at least this share of this replica's "
        "recent picks came within the sync delay of its previous one; otherwise only those.",
    )
    spread_epoch_s: float = Field(
        1.0,
        gt=0,
        description="Spread picks break load ties the same way within each such period, so "
        "that concurrent picks on different replicas agree on the picks they take their "
        "slots of.",
    )
    concurrent_window_max_s: float = Field(
        0.05,
        ge=0,
        description="Most time a pick is assumed unseen by the peers (the window is the "
        "measured mean lag of their messages, which a clock skew between hosts inflates).",
    )


@dataclass(frozen=True, slots=True)
class Routed:
    """A request routed to ``endpoint``; ``prefilling`` until its first token."""

    request_id: str
    endpoint: str
    prefill_tokens: int
    ttl_s: float
    prefill_ttl_s: float
    prefilling: bool = True
    # A sampled routing: the prompt's block keys (at most AGREEMENT_MAX_KEYS) and size.
    sample_keys: tuple[int, ...] = ()
    sample_prompt_tokens: int = 0
    # Speculative placement: the prompt's block keys (at most PLACED_MAX_KEYS) that
    # ``placed_on`` (the endpoint, or a disaggregated pick's prefill pod) is assumed to
    # cache before its KV events say so. Peers assume it too, or they send the next request
    # for the same prefix elsewhere (RAG at 4 replicas: hit ratio 0.952 -> 0.913 without).
    placed_keys: tuple[int, ...] = ()
    placed_on: str = ""


@dataclass(frozen=True, slots=True)
class Placed:
    """A routed request's speculative placement, widened after its pick: ``placed_on`` is now
    assumed to cache these block keys (at most PLACED_MAX_KEYS), not only those its Routed
    message carried. A text prompt is picked from its leading ids alone when the rest is
    held nowhere, and tokenised whole once the answer is out (``Scheduler.place_whole_prompt``);
    without this, peers would route the next request sharing the longer prefix blind to it
    until the endpoint's KV events arrive."""

    request_id: str
    placed_on: str
    placed_keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Released:
    """A request's first token or its end. A first token carries the prefill drain it
    measured (tokens queued ahead plus its own, and the seconds they took), so every replica
    measures the endpoint's rate from all requests, not its share."""

    request_id: str
    phase: Literal["first_token", "done"]
    drained_tokens: float = 0.0
    waited_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the sender has in flight (ttls are what is left of them)."""

    entries: tuple[Routed, ...]


@dataclass(frozen=True, slots=True)
class SyncMessage:
    replica: str
    incarnation: int
    seq: int
    sent_at: float
    body: Routed | Released | Snapshot | Placed


@dataclass(slots=True)
class EndpointPeerLoad:
    """What the peers have in flight on one endpoint."""

    requests: int = 0
    prefilling: int = 0
    prefill_tokens: int = 0
    # Of prefill_tokens, those of the peers' picks assumed and not heard of yet (``expect``):
    # queued there, not drained yet.
    expected_prefill_tokens: int = 0


@dataclass(slots=True)
class _Entry:
    endpoint: str
    prefill_tokens: int
    prefilling: bool
    received_at: float
    prefill_expires_at: float
    expires_at: float
    due_at: float  # its predicted completion


@dataclass(slots=True)
class _Expected:
    """A request a peer is assumed to have routed at about the time of one of ours."""

    endpoint: str
    prefill_tokens: int
    assumed_at: float  # when this replica made the pick it stands beside
    expires_at: float


@dataclass(slots=True)
class _Peer:
    incarnation: int
    last_seq: int = 0
    snapshot_seq: int = 0
    last_heard: float = 0.0
    last_snapshot_at: float | None = None
    entries: dict[str, _Entry] = field(default_factory=dict)
    # Entries reclaimed without their release (expired, reconciled), until they would have
    # expired: if a snapshot lists one again it was live after all, and its prefill is
    # already in the endpoint's queue estimate, so it is not queued a second time.
    reclaimed: dict[str, float] = field(default_factory=dict)
    # Requests released, kept until their entry would have expired: a Routed that arrives
    # late (reordered) must not bring them back.
    released: dict[str, float] = field(default_factory=dict)
    # Its picks assumed concurrent with ours and not heard of yet, oldest first.
    expected: deque[_Expected] = field(default_factory=deque)


@dataclass(slots=True)
class PeerSyncStats:
    received: int = 0
    lost: int = 0  # sequence numbers never seen
    duplicates: int = 0  # applied already, or older than the snapshot that covers them
    stale_incarnation: int = 0
    restarts: int = 0  # peers seen with a newer incarnation
    # Phantom load reclaimed, by how: "expired", "snapshot", "reconciled", "peer_timeout",
    # "restart".
    reclaimed: dict[str, int] = field(default_factory=dict)
    # Sampled routings a peer decided, and how many of them this replica would have sent to
    # the same endpoint (judged on arrival, before the routing itself is counted).
    agreement_samples: int = 0
    agreement_same: int = 0
    lag_sum_s: float = 0.0
    lag_max_s: float = 0.0
    last_lag_s: float = 0.0
    # Peer picks assumed concurrent with this replica's, and how many of them a routing
    # from that peer replaced before they expired.
    expected: int = 0
    expected_replaced: int = 0

    def mean_lag_s(self) -> float:
        return self.lag_sum_s / self.received if self.received else 0.0

    def reclaim(self, how: str, count: int = 1) -> None:
        if count:
            self.reclaimed[how] = self.reclaimed.get(how, 0) + count


class PeerLoad:
    """The peers' in-flight entries, per endpoint; see the module docstring."""

    def __init__(self, config: PeerSyncConfig, replica: str = "") -> None:
        self.config = config
        self.replica = replica
        self._peers: dict[str, _Peer] = {}
        self._load: dict[str, EndpointPeerLoad] = {}
        self._next_expiry = float("inf")
        self.stats = PeerSyncStats()
        # Called with an endpoint's name whenever the peers' load there changes.
        self.on_change: Callable[[str], None] | None = None

    def load(self, endpoint: str) -> EndpointPeerLoad | None:
        return self._load.get(endpoint)

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def peers_with_snapshot(self) -> int:
        """Peers whose current incarnation has sent a snapshot (a starting replica's warm-up)."""
        return sum(1 for peer in self._peers.values() if peer.last_snapshot_at is not None)

    def entries(self) -> int:
        return sum(len(peer.entries) for peer in self._peers.values())

    # --- receiving -----------------------------------------------------------------------

    def receive(self, message: SyncMessage, now: float) -> list[tuple[str, int]]:
        """Apply a peer's message; returns the (endpoint, prefill tokens) it newly queued
        there, and for a release or a widened placement of a request in flight the endpoint
        with 0 tokens."""
        if message.replica == self.replica:
            return []
        peer = self._peers.get(message.replica)
        if peer is None:
            peer = self._peers[message.replica] = _Peer(message.incarnation)
        elif message.incarnation < peer.incarnation:
            self.stats.stale_incarnation += 1
            return []
        elif message.incarnation > peer.incarnation:
            # A restart: what the old incarnation routed is not in flight any more (its
            # ext_proc streams died with it, and the gateway retried them elsewhere).
            self.stats.restarts += 1
            self.stats.reclaim("restart", self._drop_peer_entries(peer))
            self._peers[message.replica] = peer = _Peer(message.incarnation)
        stats = self.stats
        stats.received += 1
        lag = now - message.sent_at if now > message.sent_at else 0.0
        stats.last_lag_s = lag
        stats.lag_sum_s += lag
        stats.lag_max_s = max(stats.lag_max_s, lag)
        peer.last_heard = now
        if message.seq <= peer.snapshot_seq:
            stats.duplicates += 1
            return []
        if message.seq > peer.last_seq:
            stats.lost += message.seq - peer.last_seq - 1 if peer.last_seq else 0
            peer.last_seq = message.seq
        body = message.body
        added: list[tuple[str, int]] = []
        if isinstance(body, Routed):
            expected = peer.expected
            if expected and message.sent_at >= 2 * expected[0].assumed_at - expected[0].expires_at:
                # A pick it made within the window of ours is known now: what was assumed of
                # it goes, so nothing counts twice. (An older routing, delayed, is not it.)
                self._unexpect(expected.popleft())
                stats.expected_replaced += 1
            if body.request_id in peer.released:
                stats.duplicates += 1
            elif self._add(peer, body, now):
                added.append((body.endpoint, body.prefill_tokens if body.prefilling else 0))
            else:
                stats.duplicates += 1
        elif isinstance(body, Released):
            endpoint = self._release(peer, body.request_id, body.phase, now)
            if endpoint is not None:
                added.append((endpoint, 0))
        elif isinstance(body, Placed):
            # Only while the request is in flight there: a placement that arrives after the
            # request's end (reordered) would outlive what it describes.
            entry = peer.entries.get(body.request_id)
            if entry is not None:
                added.append((entry.endpoint, 0))
        else:
            added = self._apply_snapshot(peer, body, message.seq, now)
        return added

    def _add(self, peer: _Peer, routed: Routed, now: float) -> bool:
        entry = peer.entries.get(routed.request_id)
        if entry is not None:
            if entry.endpoint == routed.endpoint:
                return False
            self._unload(entry)  # moved to another endpoint (a fallback)
        entry = _Entry(
            routed.endpoint,
            routed.prefill_tokens,
            routed.prefilling,
            now,
            now + routed.prefill_ttl_s,
            now + routed.ttl_s,
            now + routed.ttl_s / self.config.ttl_factor,
        )
        peer.entries[routed.request_id] = entry
        load = self._load.setdefault(routed.endpoint, EndpointPeerLoad())
        load.requests += 1
        if entry.prefilling:
            load.prefilling += 1
            load.prefill_tokens += entry.prefill_tokens
        if self.on_change is not None:
            self.on_change(routed.endpoint)
        self._next_expiry = min(self._next_expiry, entry.prefill_expires_at, entry.expires_at)
        return True

    def _unload(self, entry: _Entry) -> None:
        load = self._load[entry.endpoint]
        load.requests -= 1
        if entry.prefilling:
            load.prefilling -= 1
            load.prefill_tokens -= entry.prefill_tokens
        if not load.requests:
            del self._load[entry.endpoint]
        if self.on_change is not None:
            self.on_change(entry.endpoint)

    def _end_prefill(self, entry: _Entry) -> None:
        if entry.prefilling:
            entry.prefilling = False
            load = self._load[entry.endpoint]
            load.prefilling -= 1
            load.prefill_tokens -= entry.prefill_tokens
            if self.on_change is not None:
                self.on_change(entry.endpoint)

    def _release(self, peer: _Peer, request_id: str, phase: str, now: float) -> str | None:
        entry = peer.entries.get(request_id)
        if phase == DONE:
            if entry is not None:
                del peer.entries[request_id]
                self._unload(entry)
            peer.released[request_id] = entry.expires_at if entry is not None else now + self.config.min_ttl_s
        elif entry is not None:
            self._end_prefill(entry)
        return None if entry is None else entry.endpoint

    def _apply_snapshot(self, peer: _Peer, snapshot: Snapshot, seq: int, now: float) -> list[tuple[str, int]]:
        listed = {routed.request_id: routed for routed in snapshot.entries}
        for request_id in [rid for rid in peer.entries if rid not in listed]:
            # In flight here, not there: its release was lost.
            self._unload(peer.entries.pop(request_id))
            self.stats.reclaim("snapshot")
        added: list[tuple[str, int]] = []
        for request_id, routed in listed.items():
            entry = peer.entries.get(request_id)
            if entry is None or entry.endpoint != routed.endpoint:
                peer.released.pop(request_id, None)
                self._add(peer, routed, now)
                queued_before = peer.reclaimed.pop(request_id, None) is not None
                if routed.prefilling:
                    added.append((routed.endpoint, 0 if queued_before else routed.prefill_tokens))
                continue
            # Still in flight there: its bounds run from this listing.
            entry.expires_at = now + routed.ttl_s
            if entry.prefilling and not routed.prefilling:
                self._end_prefill(entry)
            elif entry.prefilling:
                entry.prefill_expires_at = now + routed.prefill_ttl_s
            self._next_expiry = min(self._next_expiry, entry.prefill_expires_at, entry.expires_at)
        peer.snapshot_seq = seq
        peer.last_snapshot_at = now
        peer.released.clear()
        return added

    def _drop_peer_entries(self, peer: _Peer) -> int:
        for entry in peer.entries.values():
            self._unload(entry)
        dropped = len(peer.entries)
        peer.entries.clear()
        while peer.expected:
            self._unexpect(peer.expected.popleft())
        return dropped

    # --- the peers' picks not heard of yet ------------------------------------------------

    def concurrent_window_s(self) -> float:
        """How long a pick made now stays unseen by the peers: their messages' mean lag."""
        return min(self.stats.mean_lag_s(), self.config.concurrent_window_max_s)

    def slot(self) -> tuple[int, int]:
        """(this replica's place among the replicas it knows, in name order; how many): every
        replica computes the same places, so their slots differ."""
        names = sorted([*self._peers, self.replica])
        return names.index(self.replica), len(names)

    def expect(self, slot_picks: Sequence[str], prefill_tokens: int, now: float) -> None:
        """This replica routed a request with ``prefill_tokens`` to prefill now: count one
        like it for every peer, on that peer's slot of ``slot_picks`` (what one replica would
        pick for each replica's concurrent request, ``SchedulingPipeline.concurrent_picks``;
        the pick alone when not spreading), until the sync delay has passed or that peer's
        next routing arrives.

        Every replica sees the same index and, with sync, the same load, so a peer picking
        within one delay of this pick, unaware of it, picks what this replica computed for
        its slot. The conversation trace records its arrivals in whole steps (12,031
        requests on 1,180 timestamps, up to 28 at once): each replica routes its share of a
        burst at once, and without this every one of them sends its next request to the pod
        its peers just filled. Only this replica's own picks within the window read the
        count, and the peer's next routing replaces it."""
        if not self.config.expect_concurrent or not self._peers or not slot_picks:
            return
        window = self.concurrent_window_s()
        if window <= 0.0:
            return
        expires_at = now + window
        names = sorted([*self._peers, self.replica])
        stats = self.stats
        for slot, name in enumerate(names):
            peer = self._peers.get(name)
            if peer is None:
                continue
            endpoint = slot_picks[slot % len(slot_picks)]
            peer.expected.append(_Expected(endpoint, prefill_tokens, now, expires_at))
            load = self._load.setdefault(endpoint, EndpointPeerLoad())
            load.requests += 1
            load.prefilling += 1
            load.prefill_tokens += prefill_tokens
            load.expected_prefill_tokens += prefill_tokens
            stats.expected += 1
            if self.on_change is not None:
                self.on_change(endpoint)
        self._next_expiry = min(self._next_expiry, expires_at)

    def _unexpect(self, expected: _Expected) -> None:
        load = self._load[expected.endpoint]
        load.requests -= 1
        load.prefilling -= 1
        load.prefill_tokens -= expected.prefill_tokens
        load.expected_prefill_tokens -= expected.prefill_tokens
        if not load.requests:
            del self._load[expected.endpoint]
        if self.on_change is not None:
            self.on_change(expected.endpoint)

    # --- housekeeping --------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop peers silent past their timeout and entries past their bounds."""
        timeout = self.config.peer_timeout_s
        for name in [name for name, peer in self._peers.items() if now - peer.last_heard > timeout]:
            self.stats.reclaim("peer_timeout", self._drop_peer_entries(self._peers.pop(name)))
        if now < self._next_expiry:
            return
        next_expiry = float("inf")
        for peer in self._peers.values():
            expected = peer.expected
            while expected and expected[0].expires_at <= now:
                self._unexpect(expected.popleft())
            if expected:
                next_expiry = min(next_expiry, expected[0].expires_at)
            for request_id, entry in list(peer.entries.items()):
                if entry.expires_at <= now:
                    del peer.entries[request_id]
                    self._unload(entry)
                    self.stats.reclaim("expired")
                    peer.reclaimed[request_id] = now + self.config.peer_timeout_s
                    continue
                if entry.prefilling:
                    if entry.prefill_expires_at <= now:
                        self._end_prefill(entry)
                        self.stats.reclaim("expired_prefill")
                    else:
                        next_expiry = min(next_expiry, entry.prefill_expires_at)
                next_expiry = min(next_expiry, entry.expires_at)
            for request_id in [rid for rid, until in peer.released.items() if until <= now]:
                del peer.released[request_id]
            for request_id in [rid for rid, until in peer.reclaimed.items() if until <= now]:
                del peer.reclaimed[request_id]
        self._next_expiry = next_expiry

    def reconcile(self, endpoint: str, scraped_requests: int, own_settled: int, now: float) -> int:
        """An endpoint's scrape counted ``scraped_requests`` (waiting + running) and this
        replica has ``own_settled`` of its own requests there routed before the grace period:
        the peers' entries received before it and past their predicted completion, beyond
        what the scrape leaves room for, are phantoms (their releases were lost); the oldest
        go first. Returns how many went."""
        if endpoint not in self._load:
            return 0
        cutoff = now - self.config.reconcile_grace_s
        # A peer whose snapshots arrive is its own authority (they repair a lost release
        # within an interval); a scrape overrules only peers whose snapshots stopped: here,
        # in the simulator, a scrape trailing releases by an engine step otherwise reclaimed
        # 1,631 live entries of a conversation-trace run with nothing lost.
        stale = {
            name
            for name, peer in self._peers.items()
            if peer.last_snapshot_at is None
            or now - peer.last_snapshot_at > 2 * self.config.snapshot_interval_s
        }
        if not stale:
            return 0
        peer_settled = sum(
            1
            for peer in self._peers.values()
            for entry in peer.entries.values()
            if entry.endpoint == endpoint and entry.received_at <= cutoff
        )
        if own_settled + peer_settled <= scraped_requests:
            return 0
        settled = [
            (entry.received_at, name, request_id)
            for name, peer in self._peers.items()
            for request_id, entry in peer.entries.items()
            if name in stale
            and entry.endpoint == endpoint
            and entry.received_at <= cutoff
            and entry.due_at <= now
        ]
        excess = min(own_settled + peer_settled - scraped_requests, len(settled))
        if excess <= 0:
            return 0
        settled.sort()
        reclaimed = 0
        for _, name, request_id in settled[:excess]:
            peer = self._peers[name]
            self._unload(peer.entries.pop(request_id))
            peer.reclaimed[request_id] = now + self.config.peer_timeout_s
            reclaimed += 1
        self.stats.reclaim("reconciled", reclaimed)
        return reclaimed


def ttl_bounds(config: PeerSyncConfig, ttft_ms: float | None, e2e_ms: float | None) -> tuple[float, float]:
    """(whole entry, prefill part) lifetimes for a request predicted to take these times."""
    if ttft_ms is None:
        return config.default_ttl_s, config.default_ttl_s
    floor, factor = config.min_ttl_s, config.ttl_factor
    prefill = max(floor, factor * ttft_ms / 1000.0)
    whole = max(prefill, factor * (e2e_ms if e2e_ms is not None else ttft_ms) / 1000.0)
    return whole, prefill
