"""Deterministic virtual-time simulation of a pool: the real Scheduler decides, simulated
engines serve, and every KV event the engines emit reaches the Scheduler's index.

Discrete events on one heap, ordered by (time, sequence number), so a run is a pure
function of the workload, the configuration and the seed:

* ARRIVAL: the Scheduler picks (``Scheduler.pick`` — the same call the ext_proc server
  makes), the request joins that engine's queue, an idle engine starts a step;
* FIRST_TOKEN: a request's prefill ends and its first token exists (the end of the
  step's first iteration);
* DECODE_RUN_DONE: a run of pure-decode iterations ends (its tokens are produced then;
  an arrival that the engine can admit cuts the run short at the next iteration, so it
  waits at most one decode iteration, as with vLLM's continuous batching);
* STEP_DONE: an engine iteration ends: KV events go to the index (after the publish/ingest
  latency, drawn from ``kv_event_delay_s`` to ``kv_event_delay_max_s`` with the run's seed,
  one worker's batches kept in order as ZMQ keeps them), completions go to
  the Scheduler's in-flight accounting and to the results; a busy engine starts its next
  step;
* SCRAPE: every ``scrape_interval_s`` each engine's waiting/running/KV-usage figures are
  handed to ``Scheduler.update_metrics``, as the live scraper does;
* EXPIRE: a waiting request's wait bound passes;
* KV_ARRIVED (disaggregated pools): a prefill pod's KV for a request reaches its decode pod.

Disaggregated (``prefill_workers`` > 0): the first workers are labelled prefill, the rest
decode (llm-d's ``llm-d.ai/role``). A pick that names a prefill pod runs the prompt there as a
one-token request (llm-d's routing sidecar sends the prefill with max_tokens 1); when it
ends, the prompt's KV travels to the decode pod in ``kv_bytes_per_token * tokens /
kv_transfer_bytes_per_s``, and the decode pod then computes only the last prompt token and
generates the output. The client's first token is the decode pod's.

* SYNC: a message from one replica's in-flight sharing reaches another (``sync_delay_s``
  after it was sent, unless the channel lost it: ``sync_loss``);
* SNAPSHOT: every replica sends its whole in-flight list (``sync.snapshot_interval_s``).

With ``replicas`` > 1 there are that many Schedulers, as behind a gateway with several
kvsched replicas: arrivals are spread over them (``replica_spread``: round-robin or random,
as Envoy spreads ext_proc streams), a request's first token and completion reach the replica
that routed it, and every KV event and scrape reaches all of them. The replicas share one
prefix index object: each would apply the same events at the same virtual time, so N copies
would hold the same blocks (only the memory bound's recency order, touched by each replica's
own lookups, could differ) at N times the simulation cost.

Arrivals go through the Scheduler's flow control first (``Scheduler.admit``, as the
ext_proc server does): while the pool is saturated they wait in priority, fairness and
urgency order, or are refused; after every completion and scrape the waiting ones that
now fit are picked.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from scheduler.core.events import EventBatch
from scheduler.core.flowcontrol import QUEUE_FULL, REJECTION_STATUS
from scheduler.core.index import PrefixIndex
from scheduler.core.peerload import SyncMessage
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)
from scheduler.core.scoring import LoraSlots
from scheduler.core.scoring.disaggregation import ROLE_LABEL
from scheduler.sim.engine import Engine, EngineConfig, RequestRejected, StepResult
from scheduler.sim.latency import LatencyModel
from scheduler.workloads.model import RequestOutcome, SLOTargets

# The name the simulated engines serve their base model under; any other model a request
# names is a LoRA adapter (with max_loras > 0).
BASE_MODEL = "sim-base"
_SERVED = frozenset({BASE_MODEL})

ARRIVAL, STEP, FIRST_TOKEN, STEP_DONE, EVENTS, SCRAPE, EXPIRE, DECODE_RUN_DONE, KV_ARRIVED, SYNC, SNAPSHOT = (
    range(11)
)
PREFILL_SUFFIX = "#prefill"  # the prefill pod's request id: the request's, with this added

# KV cache per token of the simulated model: 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 bytes
# (Llama-3-8B bf16, sim/latency.py).
KV_BYTES_PER_TOKEN = 131_072
# Prefill-to-decode KV bandwidth: one 200 Gb/s RDMA NIC (25 GB/s), what NIXL moves KV over
# between pods in llm-d's P/D deployments; an assumption about the fabric, not a measurement.
KV_TRANSFER_BYTES_PER_S = 25e9


class WorkloadItem(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def arrival_s(self) -> float: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def max_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class VirtualPoolConfig:
    workers: int = 8
    block_size: int = 16
    capacity_blocks: int = 1024
    # One simulated token stands for this many real ones (traces scaled down to fit).
    token_scale: float = 1.0
    max_num_seqs: int = 256
    # Real-token budgets, divided by token_scale for the engine.
    max_num_batched_tokens: int = 8192
    max_model_len: int = 131_072
    scrape_interval_s: float = 0.05
    # Time from an engine emitting a KV event to the index applying it (ZMQ + ingest): at
    # least kv_event_delay_s, uniformly up to kv_event_delay_max_s when that is larger.
    kv_event_delay_s: float = 0.001
    kv_event_delay_max_s: float | None = None
    # Least virtual time between two latency-model fits, but for those due because the
    # samples doubled (log2(n) of them). Each fit costs ~0.5-1 s of wall time here; the live
    # server retrains on the predictor's own cadence in the background.
    min_train_interval_s: float = 120.0
    # Objectives every request carries (in real milliseconds per real token for TPOT).
    slo: SLOTargets = field(default_factory=SLOTargets)
    # Scaled traces: run the engines' real iterations with arrivals joining between them
    # (EngineConfig.interleave_decode). False restores whole scaled steps, which make an
    # arrival wait out up to token_scale - 1 decode iterations.
    interleave_decode: bool = True
    # LoRA adapter slots per engine (vLLM's --max-loras; 0: LoRA off) and the time one
    # engine iteration takes longer for each adapter it loads (see EngineConfig).
    max_loras: int = 0
    lora_load_s: float = 0.0
    # KV blocks on demand with vLLM's preemption instead of worst-case reservation
    # (EngineConfig.preemption; unscaled traces only).
    preemption: bool = False
    # Prefill/decode disaggregation: how many of the workers are prefill pods (0: none, every
    # worker serves requests whole), and the KV transfer's size and bandwidth (real tokens).
    prefill_workers: int = 0
    kv_bytes_per_token: float = KV_BYTES_PER_TOKEN
    kv_transfer_bytes_per_s: float = KV_TRANSFER_BYTES_PER_S
    # kvsched replicas behind the gateway, and how arrivals are spread over them.
    replicas: int = 1
    replica_spread: Literal["round_robin", "random"] = "round_robin"
    # The sync channel between replicas (SchedulerConfig.sync turns it on): one-way delay,
    # and the share of messages it loses (independently, seeded).
    sync_delay_s: float = 0.002
    sync_loss: float = 0.0


IDLE, LOADED, SATURATED = "idle", "loaded", "saturated"
LOAD_REGIMES = (IDLE, LOADED, SATURATED)


def load_regime(engine: Engine) -> str:
    """How busy ``engine`` is for a request arriving now, from what the engine knows:

    * ``idle``: nothing running or waiting; the request starts at once and its TTFT is its
      own prefill;
    * ``loaded``: requests running, but less than one iteration's prefill budget
      (``max_num_batched_tokens``) of prompt tokens queued ahead: it starts prefilling in the
      next iteration, sharing iterations with the decode batch;
    * ``saturated``: at least a full iteration's budget of prefill queued ahead (the cache
      hits of waiting prompts left out), or requests waiting for a sequence slot or KV
      blocks: its TTFT is mostly queueing.

    A request that arrived during the iteration in progress waits for the next one whatever
    the load; it is waiting for a slot only when the next iteration could not admit it.
    """
    if not engine.has_work:
        return IDLE
    if (engine.num_waiting and not engine.can_admit()) or (
        engine.queued_prefill_tokens() >= engine.config.max_num_batched_tokens
    ):
        return SATURATED
    return LOADED


@dataclass(slots=True)
class _Worker:
    name: str
    engine: Engine
    stepping: bool = False  # a STEP, STEP_DONE or DECODE_RUN_DONE is pending on the heap
    # Bumped when a decode run is cut short: the DECODE_RUN_DONE pushed for its old end is
    # then ignored.
    decode_run: int = 0


@dataclass(slots=True)
class VirtualPool:
    """Simulated engines in virtual time, routed by a real Scheduler."""

    config: VirtualPoolConfig
    scheduler_config: SchedulerConfig
    workers: list[_Worker] = field(init=False)
    scheduler: Scheduler = field(init=False)  # the first replica
    replicas: list[Scheduler] = field(init=False)
    # The replica that routed each request in flight: its lifecycle goes there.
    _owner: dict[str, Scheduler] = field(init=False, default_factory=dict)
    _arrivals: int = field(init=False, default=0)
    _rng: random.Random = field(init=False)
    sync_sent: int = field(init=False, default=0)
    sync_dropped: int = field(init=False, default=0)
    _heap: list[tuple[float, int, int, object]] = field(init=False, default_factory=list)
    _seq: int = field(init=False, default=0)
    _by_name: dict[str, _Worker] = field(init=False, default_factory=dict)
    _expiry_at: float | None = field(init=False, default=None)
    _trained_at: dict[int, float] = field(init=False, default_factory=dict)
    _delay_rng: random.Random = field(init=False)
    # Per worker, when its last KV-event batch reaches the index: a later batch never overtakes it.
    _events_due: dict[str, float] = field(init=False, default_factory=dict)
    # Disaggregated requests whose prefill runs: prefill id -> (request, decode worker).
    _prefilling: dict[str, tuple[SchedulingRequest, _Worker]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        scale = cfg.token_scale
        engine_config = EngineConfig(
            block_size=cfg.block_size,
            capacity_blocks=cfg.capacity_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=max(int(cfg.max_num_batched_tokens / scale), cfg.block_size),
            max_model_len=max(int(cfg.max_model_len / scale), cfg.block_size),
            latency=LatencyModel(token_scale=scale),
            interleave_decode=cfg.interleave_decode,
            max_loras=cfg.max_loras,
            lora_load_s=cfg.lora_load_s,
            preemption=cfg.preemption,
        )
        self.workers = [_Worker(f"sim-{i}:8000", Engine(engine_config)) for i in range(cfg.workers)]
        index_config = self.scheduler_config.index.model_copy(update={"block_size": cfg.block_size})
        base = self.scheduler_config.model_copy(update={"index": index_config})
        index = PrefixIndex(index_config)
        endpoints = [
            Endpoint(
                name=w.name,
                address=w.name,
                kv_events="sim",
                labels={} if not cfg.prefill_workers else {ROLE_LABEL: _role(i, cfg.prefill_workers)},
            )
            for i, w in enumerate(self.workers)
        ]
        self.replicas = []
        for i in range(max(cfg.replicas, 1)):
            replica = Scheduler(base.model_copy(update={"seed": base.seed + i}), index=index)
            replica.set_endpoints(endpoints, now=0.0)
            replica.start_sync(f"replica-{i}", 1)
            self.replicas.append(replica)
        self.scheduler = self.replicas[0]
        self._rng = random.Random(base.seed)
        self._by_name = {w.name: w for w in self.workers}
        self._delay_rng = random.Random(self.scheduler_config.seed)

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def run(self, requests: Sequence[WorkloadItem]) -> list[RequestOutcome]:
        results: dict[str, RequestOutcome] = {}
        for item in requests:
            self._push(item.arrival_s, ARRIVAL, item)
        pending = len(requests)
        syncing = self.syncing
        if requests:
            self._push(min(item.arrival_s for item in requests), SCRAPE, None)
            if syncing:
                self._push(min(item.arrival_s for item in requests), SNAPSHOT, None)
        while self._heap and pending:
            now, _, kind, payload = heapq.heappop(self._heap)
            if kind == ARRIVAL:
                pending -= self._arrive(payload, now, results)  # type: ignore[arg-type]
            elif kind == STEP:
                self._step(payload, now)  # type: ignore[arg-type]
            elif kind == FIRST_TOKEN:
                request_id = cast(str, payload)
                if request_id in self._prefilling:
                    continue  # the prefill pod's token is not the client's
                results[request_id].first_token_s = now
                self._owner[request_id].on_first_token(request_id, now)
            elif kind == STEP_DONE:
                pending -= self._step_done(payload, now, results)  # type: ignore[arg-type]
            elif kind == DECODE_RUN_DONE:
                worker, run = cast(tuple[_Worker, int], payload)
                if run == worker.decode_run:
                    step = worker.engine.finish_decode_run()
                    pending -= self._step_done((worker, step), now, results)
            elif kind == EVENTS:
                worker_name, batch = cast(tuple[str, EventBatch], payload)
                # The replicas share one index (see above); each confirms its own placements.
                self.scheduler.index.apply_batch(worker_name, batch)
                for replica in self.replicas:
                    replica.on_kv_batch(worker_name, now)
            elif kind == SCRAPE:
                self._scrape(now)
                pending -= self._dispatch_waiting(now, results)
                self._push(now + self.config.scrape_interval_s, SCRAPE, None)
            elif kind == KV_ARRIVED:
                request, worker = cast(tuple[SchedulingRequest, _Worker], payload)
                pending -= self._submit(worker, request, now, results, transferred=len(request.token_ids))
            elif kind == EXPIRE:
                self._expiry_at = None
                pending -= self._dispatch_waiting(now, results)
                self._schedule_expiry()
            elif kind == SYNC:
                target, message = cast(tuple[Scheduler, SyncMessage], payload)
                target.receive_sync(message, now)
            elif kind == SNAPSHOT:
                for replica in self.replicas:
                    replica.send_snapshot(now)
                self._push(now + self.scheduler_config.sync.snapshot_interval_s, SNAPSHOT, None)
            if syncing:
                self._send_sync(now)
        return [results[item.request_id] for item in requests]

    @property
    def syncing(self) -> bool:
        return len(self.replicas) > 1 and self.scheduler_config.sync.enabled

    def _send_sync(self, now: float) -> None:
        """Carry what each replica sent since the last event to every other replica."""
        delay, loss = self.config.sync_delay_s, self.config.sync_loss
        for sender in self.replicas:
            for message in sender.take_sync_messages():
                for target in self.replicas:
                    if target is sender:
                        continue
                    self.sync_sent += 1
                    if loss and self._rng.random() < loss:
                        self.sync_dropped += 1
                        continue
                    self._push(now + delay, SYNC, (target, message))

    def _replica_for_arrival(self) -> Scheduler:
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas[0]
        self._arrivals += 1
        if self.config.replica_spread == "random":
            return replicas[self._rng.randrange(len(replicas))]
        return replicas[(self._arrivals - 1) % len(replicas)]

    def _arrive(self, item: WorkloadItem, now: float, results: dict[str, RequestOutcome]) -> int:
        """A request reaches the gateway: flow control admits, queues or refuses it. Returns
        how many requests ended here (refused, or picked and refused by the engine)."""
        tokens = item.prompt_token_ids
        slo, scale = self.config.slo, self.config.token_scale
        request = SchedulingRequest(
            item.request_id,
            tokens,
            max_tokens=item.max_tokens,
            # Optional on workload items: the InferenceObjective and tenant a request names.
            objective=getattr(item, "objective", None),
            model=getattr(item, "model", None),
            fairness_id=getattr(item, "fairness_id", None),
            slo_ttft_ms=slo.ttft_ms,
            # The scheduler sees the engine's tokens, each standing for token_scale real ones.
            slo_tpot_ms=None if slo.tpot_ms is None else slo.tpot_ms * scale,
        )
        results[item.request_id] = RequestOutcome(
            item.request_id,
            ok=False,
            start_s=now,
            prompt_tokens=len(tokens),
            slo_ttft_ms=slo.ttft_ms,
            slo_tpot_ms=slo.tpot_ms,
        )
        replica = self._replica_for_arrival()
        self._owner[item.request_id] = replica
        admission = replica.admit(request, now, payload=request)
        ended = 0
        if admission.evicted is not None:
            evicted = results[admission.evicted.request_id]
            evicted.error = f"http {REJECTION_STATUS.get(QUEUE_FULL, 429)}: {QUEUE_FULL}"
            ended += 1
        if admission.rejected:
            results[item.request_id].error = f"http {admission.http_status}: {admission.reason}"
            return ended + 1
        if admission.queued:
            self._schedule_expiry()
            return ended + self._dispatch_waiting(now, results)
        return ended + self._dispatch(replica, request, now, results)

    def _dispatch(
        self, replica: Scheduler, request: SchedulingRequest, now: float, results: dict[str, RequestOutcome]
    ) -> int:
        """``replica`` picks an endpoint and the request goes to its engine; 1 if it ended here."""
        result = results[request.request_id]
        pick = replica.pick(request, now)
        if pick.status != "ok":
            result.error = f"{pick.status}: {pick.reason}"
            return 1
        result.routed_s = now
        if pick.predicted is not None:
            ttft_ms, tpot_ms, source = pick.predicted
            result.predicted_ttft_ms = ttft_ms
            result.predicted_tpot_ms = tpot_ms / self.config.token_scale
            result.prediction_source = source
            # The prediction was just made: what answers TTFT now answered it.
            result.predicted_ttft_source = replica.predictor.ttft_source
        worker = self._by_name[pick.endpoints[0]]
        result.endpoint = worker.name
        result.load_regime = load_regime(worker.engine)
        if pick.prefill_endpoint is not None:
            prefill = self._by_name[pick.prefill_endpoint]
            self._prefilling[request.request_id + PREFILL_SUFFIX] = (request, worker)
            return self._submit(prefill, request, now, results, prefill_only=True)
        return self._submit(worker, request, now, results)

    def _submit(
        self,
        worker: _Worker,
        request: SchedulingRequest,
        now: float,
        results: dict[str, RequestOutcome],
        *,
        prefill_only: bool = False,
        transferred: int = 0,
    ) -> int:
        """Hand a request to ``worker``'s engine (its prompt alone when ``prefill_only``; with
        the KV of ``transferred`` prompt tokens received); 1 if it ended here."""
        request_id = request.request_id + PREFILL_SUFFIX if prefill_only else request.request_id
        try:
            worker.engine.add_request(
                request_id,
                list(request.token_ids),
                1 if prefill_only else max(request.max_tokens or 1, 1),
                now,
                lora=None if request.model in (None, BASE_MODEL) else request.model,
                transferred_tokens=transferred,
            )
        except RequestRejected as exc:
            self._prefilling.pop(request_id, None)
            self._owner.pop(request.request_id, self.scheduler).on_failed(request.request_id, now)
            results[request.request_id].error = f"rejected: {exc}"
            return 1
        self._wake(worker, now)
        return 0

    def _wake(self, worker: _Worker, now: float) -> None:
        """Start an idle engine's step, or cut a decode run short for an admissible arrival."""
        if not worker.stepping:
            worker.stepping = True
            self._push(max(now, worker.engine.busy_until), STEP, worker)
        elif worker.engine.can_admit() and (end := worker.engine.interrupt(now)) is not None:
            worker.decode_run += 1
            self._push(end, DECODE_RUN_DONE, (worker, worker.decode_run))

    def _dispatch_waiting(self, now: float, results: dict[str, RequestOutcome]) -> int:
        """Send waiting requests while the pool has room; refuse those past their wait bound."""
        ended = 0
        for replica in self.replicas:
            for item, reason in replica.flow.expire(now):
                results[item.request_id].error = f"http {REJECTION_STATUS.get(reason, 503)}: {reason}"
                ended += 1
            while (waiting := replica.next_dispatch(now)) is not None:
                ended += self._dispatch(replica, cast(SchedulingRequest, waiting.payload), now, results)
        return ended

    def _schedule_expiry(self) -> None:
        deadlines = [d for replica in self.replicas if (d := replica.flow.next_deadline()) is not None]
        deadline = min(deadlines) if deadlines else None
        if deadline is not None and deadline != self._expiry_at:
            self._expiry_at = deadline
            self._push(deadline, EXPIRE, None)

    def _step(self, worker: _Worker, now: float) -> None:
        step = worker.engine.step(now)
        if step.shape.empty:
            if worker.engine.has_work:
                # Admission reserves worst-case blocks, so an idle engine can always admit.
                raise RuntimeError(f"{worker.name} has queued work but scheduled nothing at t={now:.3f}")
            worker.stepping = False
            return
        if step.pending:
            worker.decode_run += 1
            self._push(step.end, DECODE_RUN_DONE, (worker, worker.decode_run))
            return
        for token in step.tokens:
            if token.index == 0:
                self._push(step.first_token_at, FIRST_TOKEN, token.request.request_id)
        self._push(step.end, STEP_DONE, (worker, step))

    def _step_done(
        self, payload: tuple[_Worker, StepResult], now: float, results: dict[str, RequestOutcome]
    ) -> int:
        worker, step = payload
        if step.events:
            self._push(
                self._events_arrive(worker.name, now), EVENTS, (worker.name, EventBatch(now, step.events))
            )
        finished = 0
        for request in step.finished:
            handover = self._prefilling.pop(request.request_id, None)
            if handover is not None:
                # The prompt's KV, in real tokens, crosses to the decode pod.
                size = request.prompt_len * self.config.token_scale * self.config.kv_bytes_per_token
                self._push(now + size / self.config.kv_transfer_bytes_per_s, KV_ARRIVED, handover)
                continue
            result = results[request.request_id]
            result.ok = True
            result.end_s = now
            result.cached_tokens = request.num_cached_tokens
            result.completion_tokens = request.completion_tokens
            self._owner.pop(request.request_id).on_completed(
                request.request_id,
                now,
                cached_tokens=request.num_cached_tokens,
                completion_tokens=request.completion_tokens,
            )
            finished += 1
        if worker.engine.has_work:
            self._push(now, STEP, worker)
        else:
            worker.stepping = False
        if step.finished:
            # Training happens at its virtual time, on this thread: runs stay deterministic.
            for i, replica in enumerate(self.replicas):
                if (
                    now - self._trained_at.get(i, float("-inf")) >= self.config.min_train_interval_s
                    or replica.predictor.samples_doubled
                ) and replica.train_if_due(now):
                    self._trained_at[i] = now
            finished += self._dispatch_waiting(now, results)
        return finished

    def _events_arrive(self, worker: str, now: float) -> float:
        """When a batch the worker emits at ``now`` reaches the index."""
        low, high = self.config.kv_event_delay_s, self.config.kv_event_delay_max_s
        delay = low if high is None or high <= low else self._delay_rng.uniform(low, high)
        at = max(now + delay, self._events_due.get(worker, 0.0))
        self._events_due[worker] = at
        return at

    def _scrape(self, now: float) -> None:
        for worker in self.workers:
            engine = worker.engine
            metrics = EndpointMetrics(
                engine.num_waiting,
                engine.num_running,
                engine.kv_cache_usage,
                lora=LoraSlots(engine.running_loras, engine.waiting_loras, self.config.max_loras)
                if self.config.max_loras
                else None,
                served_models=_SERVED,
            )
            for replica in self.replicas:
                replica.update_metrics(worker.name, metrics, now)


def _role(position: int, prefill_workers: int) -> str:
    return "prefill" if position < prefill_workers else "decode"
