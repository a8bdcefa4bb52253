"""Deterministic virtual-time simulation of a pool: the real Scheduler decides, simulated
engines serve, and every KV event the engines emit reaches the Scheduler's index.

Discrete events on one heap, ordered by (time, sequence number), so a run is a pure
function of the workload, the configuration and the seed:

* ARRIVAL: the Scheduler picks (``Scheduler.pick`` — the same call the ext_proc server
  makes), the request joins that engine's queue, an idle engine starts a step;
* FIRST_TOKEN: a request's prefill ends and its first token exists (the end of the
  step's first iteration);
* STEP_DONE: an engine iteration ends: KV events go to the index (after
  ``kv_event_delay_s``, the publish/ingest latency), completions go to
  the Scheduler's in-flight accounting and to the results; a busy engine starts its next
  step;
* SCRAPE: every ``scrape_interval_s`` each engine's waiting/running/KV-usage figures are
  handed to ``Scheduler.update_metrics``, as the live scraper does.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from scheduler.core.events import EventBatch
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)
from scheduler.replay.report import RequestOutcome, SLOTargets
from scheduler.sim.engine import Engine, EngineConfig, RequestRejected, StepResult
from scheduler.sim.latency import LatencyModel

ARRIVAL, STEP, FIRST_TOKEN, STEP_DONE, EVENTS, SCRAPE = range(6)


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
    # Time from an engine emitting a KV event to the index applying it (ZMQ + ingest).
    kv_event_delay_s: float = 0.001
    # Objectives every request carries (in real milliseconds per real token for TPOT).
    slo: SLOTargets = field(default_factory=SLOTargets)


@dataclass(slots=True)
class _Worker:
    name: str
    engine: Engine
    stepping: bool = False  # a STEP or STEP_DONE is pending on the heap


@dataclass(slots=True)
class VirtualPool:
    """Simulated engines in virtual time, routed by a real Scheduler."""

    config: VirtualPoolConfig
    scheduler_config: SchedulerConfig
    workers: list[_Worker] = field(init=False)
    scheduler: Scheduler = field(init=False)
    _heap: list[tuple[float, int, int, object]] = field(init=False, default_factory=list)
    _seq: int = field(init=False, default=0)
    _by_name: dict[str, _Worker] = field(init=False, default_factory=dict)

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
        )
        self.workers = [_Worker(f"sim-{i}:8000", Engine(engine_config)) for i in range(cfg.workers)]
        index_config = self.scheduler_config.index.model_copy(update={"block_size": cfg.block_size})
        self.scheduler = Scheduler(self.scheduler_config.model_copy(update={"index": index_config}))
        self.scheduler.set_endpoints(
            [Endpoint(name=w.name, address=w.name, kv_events="sim") for w in self.workers], now=0.0
        )
        self._by_name = {w.name: w for w in self.workers}

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def run(self, requests: Sequence[WorkloadItem]) -> list[RequestOutcome]:
        results: dict[str, RequestOutcome] = {}
        for item in requests:
            self._push(item.arrival_s, ARRIVAL, item)
        pending = len(requests)
        if requests:
            self._push(min(item.arrival_s for item in requests), SCRAPE, None)
        while self._heap and pending:
            now, _, kind, payload = heapq.heappop(self._heap)
            if kind == ARRIVAL:
                pending -= self._arrive(payload, now, results)  # type: ignore[arg-type]
            elif kind == STEP:
                self._step(payload, now)  # type: ignore[arg-type]
            elif kind == FIRST_TOKEN:
                request_id = cast(str, payload)
                results[request_id].first_token_s = now
                self.scheduler.on_first_token(request_id, now)
            elif kind == STEP_DONE:
                pending -= self._step_done(payload, now, results)  # type: ignore[arg-type]
            elif kind == EVENTS:
                worker_name, batch = cast(tuple[str, EventBatch], payload)
                self.scheduler.index.apply_batch(worker_name, batch)
            elif kind == SCRAPE:
                self._scrape(now)
                self._push(now + self.config.scrape_interval_s, SCRAPE, None)
        return [results[item.request_id] for item in requests]

    def _arrive(self, item: WorkloadItem, now: float, results: dict[str, RequestOutcome]) -> int:
        tokens = item.prompt_token_ids
        slo, scale = self.config.slo, self.config.token_scale
        request = SchedulingRequest(
            item.request_id,
            tokens,
            max_tokens=item.max_tokens,
            slo_ttft_ms=slo.ttft_ms,
            # The scheduler sees the engine's tokens, each standing for token_scale real ones.
            slo_tpot_ms=None if slo.tpot_ms is None else slo.tpot_ms * scale,
        )
        pick = self.scheduler.pick(request, now)
        result = RequestOutcome(
            item.request_id,
            ok=False,
            start_s=now,
            prompt_tokens=len(tokens),
            slo_ttft_ms=slo.ttft_ms,
            slo_tpot_ms=slo.tpot_ms,
        )
        results[item.request_id] = result
        if pick.status != "ok":
            result.error = f"{pick.status}: {pick.reason}"
            return 1
        if pick.predicted is not None:
            ttft_ms, tpot_ms, source = pick.predicted
            result.predicted_ttft_ms = ttft_ms
            result.predicted_tpot_ms = tpot_ms / scale
            result.prediction_source = source
        worker = self._by_name[pick.endpoints[0]]
        result.endpoint = worker.name
        try:
            worker.engine.add_request(item.request_id, list(tokens), max(item.max_tokens, 1), now)
        except RequestRejected as exc:
            self.scheduler.on_failed(item.request_id, now)
            result.error = f"rejected: {exc}"
            return 1
        if not worker.stepping:
            worker.stepping = True
            self._push(max(now, worker.engine.busy_until), STEP, worker)
        return 0

    def _step(self, worker: _Worker, now: float) -> None:
        step = worker.engine.step(now)
        if step.shape.empty:
            if worker.engine.has_work:
                # Admission reserves worst-case blocks, so an idle engine can always admit.
                raise RuntimeError(f"{worker.name} has queued work but scheduled nothing at t={now:.3f}")
            worker.stepping = False
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
                now + self.config.kv_event_delay_s, EVENTS, (worker.name, EventBatch(now, step.events))
            )
        finished = 0
        for request in step.finished:
            result = results[request.request_id]
            result.ok = True
            result.end_s = now
            result.cached_tokens = request.num_cached_tokens
            result.completion_tokens = request.completion_tokens
            self.scheduler.on_completed(
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
        return finished

    def _scrape(self, now: float) -> None:
        for worker in self.workers:
            engine = worker.engine
            self.scheduler.update_metrics(
                worker.name,
                EndpointMetrics(engine.num_waiting, engine.num_running, engine.kv_cache_usage),
                now,
            )
