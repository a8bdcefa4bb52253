"""The Scheduler: the one object every adapter drives.

It owns the prefix index, the endpoints' last known state (scraped metrics, health) and
kvsched's own accounting of the requests it has routed, and turns a request into a
decision with the routing policy its configuration names (``scheduler.core.policies``: by
default kvsched's scoring pipeline); the policy hears about every request it routed through
``on_routed``/``on_first_token``/``on_completed``. Adapters (ext_proc server, scraper, discovery,
simulator) call only this facade and pass ``now`` in; nothing here reads a clock or does
I/O, so the live server and the virtual-time simulator make identical decisions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.core.flowcontrol import (
    Admission,
    FlowControlConfig,
    FlowController,
    FlowItem,
    SaturationDetector,
)
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.core.latency import PredictorEstimator
from scheduler.core.lookup import EndpointPrefix, PrefixLookup, RankPrefix
from scheduler.core.objectives import ObjectiveTable, ResolvedObjective
from scheduler.core.policies import (
    DEFAULT_POLICY,
    POLICIES,
    PolicyInput,
    PolicySetup,
    RoutingPolicy,
    create_policy,
)
from scheduler.core.predictor import FeatureMatrix, LatencyPredictor, PredictorConfig
from scheduler.core.prefixstats import PrefixStats
from scheduler.core.registry import UnknownNameError
from scheduler.core.scoring import EndpointState, PickRequest, PrefixMatch, ScoringConfig

log = logging.getLogger(__name__)

# Approximate mode: in-flight requests at which an endpoint's remembered prefixes stop
# attracting requests while another endpoint is idle (see Scheduler._approximate_load_guard).
APPROXIMATE_BUSY_INFLIGHT = 2

# Endpoint label naming the InferencePool ("namespace/name") an endpoint belongs to. A request
# whose InferenceObjective belongs to a pool is picked among that pool's endpoints only, so one
# kvsched can serve several pools.
POOL_LABEL = "kvsched.io/pool"


class HealthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unhealthy_after_failures: int = Field(
        3, ge=1, description="Consecutive failed scrapes after which an endpoint is not picked."
    )


class ApproximateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: float = Field(
        300.0,
        gt=0,
        description="For endpoints without KV events: how long a routed prompt is assumed to stay cached.",
    )


class SLODefaults(BaseModel):
    """Objectives for requests that name none (no SLO header, no objective default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float | None = Field(None, gt=0, description="TTFT objective in ms; unset = none.")
    tpot_ms: float | None = Field(
        None, gt=0, description="TPOT objective in ms per output token; unset = none."
    )


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: IndexConfig = Field(default_factory=IndexConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    approximate: ApproximateConfig = Field(default_factory=ApproximateConfig)
    flow_control: FlowControlConfig = Field(
        default_factory=FlowControlConfig, description="Saturation detection and the waiting room."
    )
    predictor: PredictorConfig = Field(
        default_factory=PredictorConfig, description="The online TTFT/TPOT predictor."
    )
    slo_defaults: SLODefaults = Field(
        default_factory=SLODefaults,
        description="Pool-wide objectives, after the request's headers and its InferenceObjective's.",
    )
    seed: int = Field(0, description="Seed of the picker's random source (softmax sampling, tie spreading).")
    policy: str = Field(
        DEFAULT_POLICY,
        description="Routing policy, by registered name (scheduler/core/policies/): "
        + ", ".join(f"'{spec.name}': {spec.description}" for spec in POLICIES.specs()),
    )

    @field_validator("policy")
    @classmethod
    def _registered_policy(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(str(UnknownNameError("policy", name, POLICIES.names())))
        return name


def policy_setup(config: SchedulerConfig) -> PolicySetup:
    """What ``config.policy`` is built (or reconfigured) from."""
    return PolicySetup(config.policy, config.scoring, config.index.block_size)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One routable model-server endpoint (a pod's ip:port)."""

    name: str
    address: str
    kv_events: str | None = None
    kv_replay: str | None = None
    kv_topic: str = ""
    data_parallel_size: int = 1
    metrics_url: str | None = None
    endpoint_class: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)

    def index_workers(self) -> list[str]:
        """Names under which this endpoint's data-parallel ranks appear in the index."""
        return [self.name] + [f"{self.name}#dp{rank}" for rank in range(1, self.data_parallel_size)]


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    waiting: int
    running: int
    kv_usage: float
    block_size: int | None = None
    num_gpu_blocks: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulingRequest:
    request_id: str
    token_ids: Sequence[int]
    model: str | None = None
    subset: frozenset[str] | None = None
    objective: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    fairness_id: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class PickResult:
    status: Literal["ok", "no_endpoints", "shed"]
    endpoints: list[str]
    reason: str = ""
    # The decision's account, or a function that builds it: explaining 64 candidates costs
    # more than scoring them, so it is built only when an audit line or API reply needs it.
    explanation_source: dict[str, Any] | Callable[[], dict[str, Any]] = field(default_factory=dict)
    # (TTFT ms, TPOT ms, source) predicted for the primary, when the predictor ran.
    predicted: tuple[float, float, str] | None = None

    @property
    def explanation(self) -> dict[str, Any]:
        source = self.explanation_source
        if callable(source):
            source = source()
            object.__setattr__(self, "explanation_source", source)
        return source


@dataclass(frozen=True, slots=True)
class EndpointDiff:
    added: list[Endpoint]
    removed: list[Endpoint]


@dataclass(slots=True)
class _EndpointRuntime:
    endpoint: Endpoint
    metrics: EndpointMetrics | None = None
    metrics_at: float | None = None
    consecutive_failures: int = 0
    last_error: str = ""
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_prefilling: int = 0  # of inflight_requests, those before their first token
    # Requests routed here since the last scrape: the scraped waiting count cannot know them yet.
    routed_since_scrape: int = 0


@dataclass(slots=True)
class _InFlight:
    endpoint: str
    prompt_tokens: int
    started_at: float
    # The prompt tokens the endpoint must compute (those not already cached there): what this
    # request adds to the endpoint's prefill work until its first token.
    prefill_tokens: int
    prefilling: bool = True
    first_token_at: float | None = None
    # The endpoint's feature row at the pick, to train the predictor on once this request's
    # latencies are known; None when the request ended up elsewhere.
    features: FeatureMatrix | None = None
    # Prompt tokens the index said the endpoint holds at the pick, and whether that came from
    # the endpoint's KV events (not approximate mode's routing history, not a moved request).
    predicted_cached: int = 0
    predicted_from_events: bool = False


@dataclass(frozen=True, slots=True)
class Completion:
    """What the scheduler learned from one finished request."""

    request_id: str
    endpoint: str
    prompt_tokens: int
    ttft_s: float | None
    e2e_s: float
    cached_tokens: int | None
    completion_tokens: int | None


class Scheduler:
    """Endpoint state + prefix index + scoring pipeline, driven by adapters."""

    def __init__(self, config: SchedulerConfig | None = None, index: PrefixIndex | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.index = index or PrefixIndex(self.config.index)
        self._policy: RoutingPolicy = create_policy(policy_setup(self.config))
        self._rng = random.Random(self.config.seed)
        self._endpoints: dict[str, _EndpointRuntime] = {}
        self._by_address: dict[str, str] = {}
        self._pools: set[str] = set()  # POOL_LABEL values among the endpoints
        self._inflight: dict[str, _InFlight] = {}
        # Approximate mode: (expires_at, endpoint, keys) of prompts routed to endpoints
        # that publish no KV events, oldest first.
        self._approx: list[tuple[float, str, list[int]]] = []
        self.completions = 0
        self.prefix_stats = PrefixStats()
        self.objectives = ObjectiveTable()
        self.flow = FlowController(self.config.flow_control)
        self.saturation = SaturationDetector(self.config.flow_control)
        self.predictor = LatencyPredictor(self.config.predictor)
        self._class_ids: dict[str, int] = {}
        self._estimator = PredictorEstimator(self.predictor, self.config.index.block_size, self._class_id)

    # --- configuration -----------------------------------------------------------------

    def reload(self, config: SchedulerConfig) -> None:
        """Swap scoring and health settings atomically; the index layout cannot change live.

        The same policy is reconfigured and keeps its state (a round-robin position, a
        policy's own accounting); another policy starts afresh."""
        if config.index != self.config.index:
            raise ValueError("index settings (block size, hash mode, bounds) need a restart")
        setup = policy_setup(config)
        policy = self._policy
        if config.policy != self.config.policy:
            policy = create_policy(setup)
        else:
            policy.reconfigure(setup)
        self._policy, self.config = policy, config
        # Both read their config on every call; the waiting room keeps its queue.
        self.flow.config = self.saturation.config = config.flow_control
        if config.predictor != self.predictor.config:
            # A predictor is built for one configuration; a new one starts from its prior.
            self.predictor = LatencyPredictor(config.predictor)
            self._estimator = PredictorEstimator(self.predictor, config.index.block_size, self._class_id)

    def _class_id(self, endpoint_class: str) -> int:
        """A small stable integer per endpoint class, for the predictor's class feature."""
        known = self._class_ids.get(endpoint_class)
        if known is None:
            known = self._class_ids[endpoint_class] = len(self._class_ids)
        return known

    def set_objectives(self, table: ObjectiveTable) -> None:
        """Replace the inference objectives (priorities, default SLOs) requests name."""
        self.objectives = table

    def resolve_objective(self, request: SchedulingRequest) -> ResolvedObjective:
        """Priority and SLOs: the request's headers, else its objective's, else the pool's."""
        resolved = self.objectives.resolve(request.objective, request.slo_ttft_ms, request.slo_tpot_ms)
        defaults = self.config.slo_defaults
        if (resolved.slo_ttft_ms is None and defaults.ttft_ms is not None) or (
            resolved.slo_tpot_ms is None and defaults.tpot_ms is not None
        ):
            resolved = replace(
                resolved,
                slo_ttft_ms=resolved.slo_ttft_ms if resolved.slo_ttft_ms is not None else defaults.ttft_ms,
                slo_tpot_ms=resolved.slo_tpot_ms if resolved.slo_tpot_ms is not None else defaults.tpot_ms,
            )
        return resolved

    # --- endpoints ---------------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint], now: float) -> EndpointDiff:
        wanted = {endpoint.name: endpoint for endpoint in endpoints}
        removed = [rt.endpoint for name, rt in self._endpoints.items() if name not in wanted]
        added: list[Endpoint] = []
        for endpoint in removed:
            del self._endpoints[endpoint.name]
            for worker in endpoint.index_workers():
                self.index.remove_worker(worker)
        for name, endpoint in wanted.items():
            runtime = self._endpoints.get(name)
            if runtime is None:
                self._endpoints[name] = _EndpointRuntime(endpoint)
                added.append(endpoint)
            elif runtime.endpoint != endpoint:
                runtime.endpoint = endpoint
        self._by_address = {rt.endpoint.address: name for name, rt in self._endpoints.items()}
        self._pools = {
            pool
            for rt in self._endpoints.values()
            if (pool := rt.endpoint.labels.get(POOL_LABEL)) is not None
        }
        if removed:
            gone = {endpoint.name for endpoint in removed}
            self._approx = [entry for entry in self._approx if entry[1] not in gone]
        return EndpointDiff(added, removed)

    def endpoints(self) -> list[Endpoint]:
        return [rt.endpoint for rt in self._endpoints.values()]

    def update_metrics(self, name: str, metrics: EndpointMetrics, now: float) -> None:
        runtime = self._endpoints.get(name)
        if runtime is None:
            return
        runtime.metrics = metrics
        runtime.metrics_at = now
        runtime.routed_since_scrape = 0
        runtime.consecutive_failures = 0
        runtime.last_error = ""

    def record_scrape_failure(self, name: str, error: str, now: float) -> None:
        runtime = self._endpoints.get(name)
        if runtime is None:
            return
        runtime.consecutive_failures += 1
        runtime.last_error = error

    def is_healthy(self, name: str) -> bool:
        runtime = self._endpoints.get(name)
        return runtime is not None and self._healthy(runtime)

    def _healthy(self, runtime: _EndpointRuntime) -> bool:
        return runtime.consecutive_failures < self.config.health.unhealthy_after_failures

    def endpoint_state(self, name: str, now: float) -> EndpointState:
        return self._state(self._endpoints[name], now)

    def _state(self, runtime: _EndpointRuntime, now: float) -> EndpointState:
        metrics = runtime.metrics
        age = None if runtime.metrics_at is None else max(now - runtime.metrics_at, 0.0)
        endpoint = runtime.endpoint
        return EndpointState(
            name=endpoint.name,
            address=endpoint.address,
            waiting=metrics.waiting if metrics else 0,
            running=metrics.running if metrics else 0,
            kv_usage=metrics.kv_usage if metrics else 0.0,
            metrics_age_s=age,
            healthy=self._healthy(runtime),
            inflight_requests=runtime.inflight_requests,
            inflight_prefill_tokens=runtime.inflight_prefill_tokens,
            inflight_decode_requests=runtime.inflight_requests - runtime.inflight_prefilling,
            endpoint_class=endpoint.endpoint_class,
            labels=endpoint.labels,
        )

    # --- flow control ------------------------------------------------------------------

    def saturation_states(self, now: float) -> list[EndpointState]:
        """The endpoints as saturation detection judges them.

        Each endpoint's scraped waiting count is raised by the requests routed there since
        that scrape, so a burst of dispatches between two scrapes saturates the pool as it
        would the engines, instead of the whole queue going out on one stale figure.
        """
        states = []
        for runtime in self._endpoints.values():
            state = self._state(runtime, now)
            if runtime.routed_since_scrape:
                state = replace(state, waiting=state.waiting + runtime.routed_since_scrape)
            states.append(state)
        return states

    def pool_saturated(self, now: float) -> bool:
        """Whether the pool can take more work now (``SaturationDetector``, with hysteresis)."""
        return self.saturation.saturated(self.saturation_states(now), now)

    def admit(self, request: SchedulingRequest, now: float, payload: Any = None) -> Admission:
        """Flow control's answer for an arriving request: pick it now, it waits, or it is refused."""
        objective = self.resolve_objective(request)
        item = FlowItem(
            request.request_id,
            priority=objective.priority,
            fairness_id=request.fairness_id or "",
            slo_ttft_ms=objective.slo_ttft_ms,
            enqueued_at=now,
            payload=payload,
        )
        return self.flow.admit(item, self.pool_saturated(now), now)

    def next_dispatch(self, now: float) -> FlowItem | None:
        """The waiting request to pick next, when the pool has room for it."""
        if not len(self.flow) or self.pool_saturated(now):
            return None
        return self.flow.dispatch_next(now)

    # --- picking -----------------------------------------------------------------------

    def _matches(self, keys: Any) -> dict[str, PrefixMatch]:
        """Per endpoint, the best match over its data-parallel ranks."""
        matches = self.index.match(keys)
        if not any("#dp" in worker for worker in matches):
            return matches
        best: dict[str, PrefixMatch] = {}
        for worker, match in matches.items():
            name = worker.split("#dp", 1)[0]
            current = best.get(name)
            if current is None or match.total_blocks > current.total_blocks:
                best[name] = match
        return best

    def pick(self, request: SchedulingRequest, now: float) -> PickResult:
        self._expire_approximate(now)
        keys = self.index.request_keys(request.token_ids)
        prompt_blocks = len(keys)
        matches = self._matches(keys) if prompt_blocks else {}
        objective = self.resolve_objective(request)
        runtimes: Iterable[_EndpointRuntime] = self._endpoints.values()
        if objective.pool is not None and objective.pool in self._pools:
            runtimes = [rt for rt in runtimes if rt.endpoint.labels.get(POOL_LABEL) == objective.pool]
        states = [self._state(rt, now) for rt in runtimes]
        pick_request = PickRequest(
            request_id=request.request_id,
            prompt_blocks=prompt_blocks,
            prompt_tokens=len(request.token_ids),
            subset=request.subset,
            slo_ttft_ms=objective.slo_ttft_ms,
            slo_tpot_ms=objective.slo_tpot_ms,
            priority=objective.priority,
        )
        if self._approx and matches and self._policy.guards_remembered_prefixes:
            matches = self._approximate_load_guard(matches, states, request.subset)
        estimator = self._estimator
        estimator.last_features = None
        wanted = 1 + self.config.scoring.num_fallbacks
        routing = self._policy.route(
            PolicyInput(pick_request, states, matches, self.index.worker_blocks, self._rng, estimator, wanted)
        )
        if not routing.endpoints:
            return PickResult("no_endpoints", [], routing.reason, routing.explanation)
        chosen = routing.endpoints[:wanted]
        addresses = [self._endpoints[name].endpoint.address for name in chosen]
        primary = chosen[0]
        flight = self._start(request, primary, keys, now, self._cached_tokens(matches.get(primary)))
        decision = routing.decision
        if decision is None:
            return PickResult("ok", addresses, "", routing.explanation)
        # The policy scored candidates: the chosen endpoint's feature row trains the predictor
        # once this request's latencies are known, and its prediction goes on the audit line.
        # Every candidate's latency was predicted when the decision used it; otherwise only the
        # chosen endpoint's is, here.
        predicted = decision.predicted
        candidates = decision.candidates
        if candidates is not None and self.config.predictor.enabled:
            position = next(i for i, s in enumerate(candidates.states) if s.name == primary)
            rows = estimator.last_features
            flight.features = (
                rows[position].copy()
                if rows is not None
                else estimator.row(candidates, pick_request, position)
            )
            if predicted is None:
                alone = self.predictor.predict(flight.features[None, :])
                predicted = (float(alone.ttft_ms[0]), float(alone.tpot_ms[0]), alone.source)
        return PickResult("ok", addresses, "", routing.explanation, predicted)

    def fallback_pick(self, request: SchedulingRequest, now: float | None = None) -> list[str]:
        """Least-loaded healthy endpoints, for when the pipeline itself failed."""
        allowed = request.subset
        candidates = [
            rt
            for rt in self._endpoints.values()
            if self._healthy(rt) and (allowed is None or rt.endpoint.address in allowed)
        ]
        candidates.sort(
            key=lambda rt: (
                rt.inflight_requests + (rt.metrics.waiting if rt.metrics else 0),
                rt.inflight_prefill_tokens,
                rt.endpoint.name,
            )
        )
        chosen = [rt.endpoint.address for rt in candidates[: 1 + self.config.scoring.num_fallbacks]]
        if chosen and now is not None:
            self._start(request, self._by_address[chosen[0]], None, now)
        return chosen

    # --- read-only lookup ----------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], now: float, *, model: str | None = None) -> PrefixLookup:
        """What the index says every endpoint holds of a prompt, per data-parallel rank and
        tier, as a pick at ``now`` would see it, changing nothing: no in-flight reservation,
        no flow control, no policy or predictor call, no recency touched in the index, no
        approximate-mode entry expired (those past their TTL are left out of the answer
        instead), and every endpoint reported, healthy or not."""
        keys = self.index.request_keys(token_ids)
        prompt_blocks = len(keys)
        matches = self.index.peek(keys) if prompt_blocks else {}
        live = self._unexpired_approximate(now)
        if live:
            # Iterating a lazy PromptKeys hashes the whole prompt: fine for a diagnosis.
            key_list = [int(key) for key in keys]
            for name, held in live.items():
                depth = next((i for i, key in enumerate(key_list) if key not in held), len(key_list))
                if depth:
                    matches[name] = PrefixMatch(depth, depth, 0, 0)
                else:
                    matches.pop(name, None)
        endpoints = []
        for name in sorted(self._endpoints):
            endpoint = self._endpoints[name].endpoint
            ranks = tuple(
                RankPrefix.of(rank, worker, matches.get(worker), prompt_blocks)
                for rank, worker in enumerate(endpoint.index_workers())
            )
            endpoints.append(
                EndpointPrefix(
                    name,
                    endpoint.address,
                    self._healthy(self._endpoints[name]),
                    "kv_events" if endpoint.kv_events is not None else "routing_history",
                    max(rank.matched_blocks for rank in ranks),
                    ranks,
                )
            )
        best = max((e.matched_blocks for e in endpoints), default=0)
        return PrefixLookup(
            model,
            len(token_ids),
            prompt_blocks,
            min(best + 1, prompt_blocks),
            self.config.index.block_size,
            self.config.index.hash_mode,
            tuple(endpoints),
        )

    def _unexpired_approximate(self, now: float) -> dict[str, set[int]]:
        """Approximate mode, read-only: for each endpoint with entries past their TTL that the
        next pick will forget, the keys its entries still within the TTL hold."""
        expired = {endpoint for expires_at, endpoint, _ in self._approx if expires_at <= now}
        live: dict[str, set[int]] = {endpoint: set() for endpoint in expired}
        for expires_at, endpoint, keys in self._approx:
            if expires_at > now and endpoint in live:
                live[endpoint].update(keys)
        return live

    # --- request lifecycle ---------------------------------------------------------------

    def _cached_tokens(self, match: PrefixMatch | None) -> int:
        return 0 if match is None else match.total_blocks * self.config.index.block_size

    def _start(
        self, request: SchedulingRequest, endpoint: str, keys: Any, now: float, cached_tokens: int = 0
    ) -> _InFlight:
        previous = self._inflight.pop(request.request_id, None)
        if previous is not None:
            self._release(previous)
        runtime = self._endpoints[endpoint]
        prompt_tokens = len(request.token_ids)
        prefill_tokens = max(prompt_tokens - cached_tokens, 0)
        runtime.inflight_requests += 1
        runtime.inflight_prefilling += 1
        runtime.inflight_prefill_tokens += prefill_tokens
        runtime.routed_since_scrape += 1
        flight = self._inflight[request.request_id] = _InFlight(endpoint, prompt_tokens, now, prefill_tokens)
        flight.predicted_cached = cached_tokens
        flight.predicted_from_events = runtime.endpoint.kv_events is not None
        self.prefix_stats.record_decision(cached_tokens // self.config.index.block_size)
        if keys is not None and len(keys) and runtime.endpoint.kv_events is None:
            self._record_approximate(endpoint, keys, now)
        self._policy.on_routed(request.request_id, endpoint, prompt_tokens, prefill_tokens, now)
        return flight

    def _release(self, flight: _InFlight) -> None:
        runtime = self._endpoints.get(flight.endpoint)
        if runtime is None:
            return
        runtime.inflight_requests = max(runtime.inflight_requests - 1, 0)
        if flight.prefilling:
            runtime.inflight_prefilling = max(runtime.inflight_prefilling - 1, 0)
            runtime.inflight_prefill_tokens = max(runtime.inflight_prefill_tokens - flight.prefill_tokens, 0)

    def on_served_by(self, request_id: str, address: str, now: float) -> None:
        """The gateway reports the endpoint that actually took the request (maybe a fallback)."""
        flight = self._inflight.get(request_id)
        name = self._by_address.get(address)
        if flight is None or name is None or name == flight.endpoint:
            return
        self._release(flight)
        # What the fallback holds of this prompt is not known here: count all of it.
        moved = _InFlight(name, flight.prompt_tokens, flight.started_at, flight.prompt_tokens)
        moved.prefilling, moved.first_token_at = flight.prefilling, flight.first_token_at
        runtime = self._endpoints[name]
        runtime.inflight_requests += 1
        if moved.prefilling:
            runtime.inflight_prefilling += 1
            runtime.inflight_prefill_tokens += moved.prefill_tokens
        self._inflight[request_id] = moved
        self._policy.on_routed(request_id, name, moved.prompt_tokens, moved.prefill_tokens, now)

    def on_first_token(self, request_id: str, now: float) -> None:
        flight = self._inflight.get(request_id)
        if flight is None or not flight.prefilling:
            return
        flight.prefilling = False
        flight.first_token_at = now
        runtime = self._endpoints.get(flight.endpoint)
        if runtime is not None:
            runtime.inflight_prefilling = max(runtime.inflight_prefilling - 1, 0)
            runtime.inflight_prefill_tokens = max(runtime.inflight_prefill_tokens - flight.prefill_tokens, 0)
        self._policy.on_first_token(request_id, now)

    def on_completed(
        self,
        request_id: str,
        now: float,
        *,
        served: str | None = None,
        cached_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> Completion | None:
        if served is not None:
            self.on_served_by(request_id, served, now)
        flight = self._inflight.pop(request_id, None)
        if flight is None:
            return None
        self._release(flight)
        self._policy.on_completed(request_id, now)
        self.completions += 1
        if cached_tokens is not None:
            self._record_served(flight, cached_tokens)
        ttft = None if flight.first_token_at is None else flight.first_token_at - flight.started_at
        if flight.features is not None and ttft is not None:
            tpot_ms = None
            if completion_tokens is not None and completion_tokens >= 2 and flight.first_token_at is not None:
                tpot_ms = (now - flight.first_token_at) * 1000.0 / (completion_tokens - 1)
            self.predictor.observe(flight.features, ttft * 1000.0, tpot_ms, now)
        return Completion(
            request_id,
            flight.endpoint,
            flight.prompt_tokens,
            ttft,
            now - flight.started_at,
            cached_tokens,
            completion_tokens,
        )

    def _record_served(self, flight: _InFlight, cached_tokens: int) -> None:
        stats = self.prefix_stats
        was = stats.verdict().status
        stats.record_completion(
            flight.prompt_tokens,
            flight.predicted_cached,
            cached_tokens,
            self.config.index.block_size,
            flight.predicted_from_events,
        )
        if was != "mismatch":
            verdict = stats.verdict()
            if verdict.status == "mismatch":
                log.warning("prefix lookups never match what workers serve from cache: %s", verdict.reason)

    def on_failed(self, request_id: str, now: float) -> None:
        flight = self._inflight.pop(request_id, None)
        if flight is not None:
            self._release(flight)
            self._policy.on_completed(request_id, now)

    def train_if_due(self, now: float) -> bool:
        """Fit and install a new latency model on this thread when one is due (the simulator's
        way; the live server fits in the background with adapters/predictor_trainer.py)."""
        if not self.predictor.training_due(now):
            return False
        self.predictor.train_now(now)
        return True

    def has_inflight(self, name: str) -> bool:
        """Whether kvsched has a request in flight on ``name`` (False for an unknown name)."""
        runtime = self._endpoints.get(name)
        return runtime is not None and runtime.inflight_requests > 0

    def inflight(self, name: str) -> tuple[int, int]:
        runtime = self._endpoints[name]
        return runtime.inflight_requests, runtime.inflight_prefill_tokens

    # --- approximate mode --------------------------------------------------------------

    def _approximate_load_guard(
        self, matches: dict[str, PrefixMatch], states: Sequence[EndpointState], subset: frozenset[str] | None
    ) -> dict[str, PrefixMatch]:
        """Without KV events a match is kvsched's own routing history: it says where a prefix
        was sent, not what it costs to wait there. Such a match stops counting on an endpoint
        with ``APPROXIMATE_BUSY_INFLIGHT`` or more requests in flight while an eligible endpoint
        is idle, so the request goes to the idle one, which then holds the prefix too, and
        later requests of a hot prefix group split between the two by load.

        Without it the prefix weight outweighs every load signal at low load (a hit scores
        0.5 of the total, the whole queue-depth scorer 1/6): measured with 4 prefix groups of
        60 prompts at 4 req/s on 4 endpoints, requests of 1 s, half the seeds sent 120 of 240
        requests to one endpoint and none to another (groups that collided on their first
        request stayed together); with the guard no endpoint idles."""
        idle = any(
            s.healthy
            and s.inflight_requests == 0
            and s.waiting == 0
            and (subset is None or s.address in subset)
            for s in states
        )
        if not idle:
            return matches
        busy = {
            s.name
            for s in states
            if s.name in matches
            and s.inflight_requests >= APPROXIMATE_BUSY_INFLIGHT
            and self._endpoints[s.name].endpoint.kv_events is None
        }
        if not busy:
            return matches
        return {name: match for name, match in matches.items() if name not in busy}

    def _record_approximate(self, endpoint: str, keys: Any, now: float) -> None:
        key_list = [int(key) for key in keys]
        self.index.record_routed(endpoint, key_list)
        self._approx.append((now + self.config.approximate.ttl_s, endpoint, key_list))

    def _expire_approximate(self, now: float) -> None:
        expired = 0
        for expires_at, endpoint, keys in self._approx:
            if expires_at > now:
                break
            self.index.forget_routed(endpoint, keys)
            expired += 1
        if expired:
            del self._approx[:expired]
