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

import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.core.flowcontrol import (
    Admission,
    FlowControlConfig,
    FlowController,
    FlowItem,
    SaturationDetector,
)
from scheduler.core.hotprefix import HotPrefixes
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.core.latency import PredictorEstimator
from scheduler.core.loadorder import OrderedNames
from scheduler.core.lookup import EndpointPrefix, PrefixLookup, RankPrefix
from scheduler.core.objectives import ObjectiveTable, ResolvedObjective
from scheduler.core.peerload import (
    AGREEMENT_MAX_KEYS,
    DONE,
    FIRST_TOKEN,
    PLACED_MAX_KEYS,
    PeerLoad,
    PeerSyncConfig,
    Placed,
    Released,
    Routed,
    Snapshot,
    SyncMessage,
    ttl_bounds,
)
from scheduler.core.policies import (
    DEFAULT_POLICY,
    POLICIES,
    PolicyInput,
    PolicySetup,
    Routing,
    RoutingPolicy,
    create_policy,
)
from scheduler.core.policies.base import NO_HEALTHY_ENDPOINT
from scheduler.core.predictor import FeatureMatrix, LatencyPredictor, PredictorConfig
from scheduler.core.prefillqueue import DrainRate, PrefillQueue
from scheduler.core.prefixstats import PrefixStats
from scheduler.core.registry import UnknownNameError
from scheduler.core.routedmemory import RoutedMemory
from scheduler.core.scoring import Decision, EndpointState, LoraSlots, PickRequest, PrefixMatch, ScoringConfig
from scheduler.core.scoring.disaggregation import (
    DisaggregationConfig,
    dedicated_prefill,
    serves_decode,
    serves_prefill,
)
from scheduler.core.scoring.filters import NO_ELIGIBLE_IN_SUBSET
from scheduler.core.scoring.rendezvous import session_endpoint

log = logging.getLogger(__name__)

# Approximate mode: in-flight requests at which an endpoint's remembered prefixes stop
# attracting requests while another endpoint is idle (see Scheduler._approximate_load_guard).
APPROXIMATE_BUSY_INFLIGHT = 2

# What becomes of a speculative placement (Scheduler.speculative_outcomes): placed, then one of
# confirmed / contradicted by the endpoint's events, expired (ttl_s), failed (the request did).
SPECULATIVE_OUTCOMES = ("placed", "confirmed", "contradicted", "expired", "failed")

# Adapters remembered per endpoint as routed there lately; only the newest max_lora of them
# count as likely resident (vLLM's --max-loras is 1..a few dozen in practice).
_RECENT_ADAPTERS_KEPT = 64

# Endpoint label naming the InferencePool ("namespace/name") an endpoint belongs to. A request
# whose InferenceObjective belongs to a pool is picked among that pool's endpoints only, so one
# kvsched can serve several pools.
POOL_LABEL = "kvsched.io/pool"


class HealthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unhealthy_after_failures: int = Field(
        3, ge=1, description="Consecutive failed scrapes after which an endpoint is not picked."
    )
    scrape_timeout_grace_s: float = Field(
        5.0,
        ge=0,
        description="A scrape that timed out does not count against an endpoint that produced a first "
        "token, finished a request or published a KV-event batch within this many seconds (its own, "
        "or a peer replica's): its engine is serving and only its API server is slow to answer "
        "/metrics (vLLM tokenises long prompts on the loop that serves it). Its figures go stale "
        "and scoring falls back on the in-flight accounting (scoring.limits.metrics_stale_after_s). "
        "Refused or reset connections, error statuses and bad pages count at once. 0: every timeout "
        "counts.",
    )
    fail_open: bool = Field(
        True,
        description="When every endpoint a request may go to is unhealthy by its scrapes, pick among "
        "them as if they were healthy rather than refuse the request. Engines whose event loops are "
        "busy (long prompts tokenised on the API server's loop) answer /metrics late and their "
        "scrapes time out while they still serve; a pod that is really down fails at the gateway "
        "as it would anyway. False: answer 503 (no healthy endpoint).",
    )
    kv_events_stale_after_s: float = Field(
        10.0,
        gt=0,
        description="An endpoint that publishes KV events and has sent no batch for this long after a "
        "request prefilled a full block there (vLLM reports such blocks in the same engine step) "
        "has stopped publishing: the blocks the index holds for it stop counting in picks until a "
        "batch arrives again. 10 s is twice the replay timeout and 50x the slowest event delay "
        "modelled in the simulator.",
    )


class ApproximateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: float = Field(
        300.0,
        gt=0,
        description="For endpoints without KV events: how long a routed prompt is assumed to stay cached.",
    )


class SpeculativeConfig(BaseModel):
    """Speculative placement: a prompt routed to an endpoint that publishes KV events counts,
    at a discount, as cached there before the events say so.

    vLLM reports blocks after their prefill, and the report then travels (ZMQ, ingest): a burst
    of requests sharing a new prefix, routed before the first one's events arrive, would
    otherwise see no holder and scatter over the pool, each endpoint computing the prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Count kvsched's own recent placements before their KV events.")
    discount: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Weight of a speculative block against one the endpoint's events reported. "
        "Measured in the simulator (128 sessions over 8 new 4k-token system prompts starting "
        "within 0.25 s, events 50-200 ms late, seeds 0/1): TTFT p50 62/53 ms at 0.75, 45/61 at "
        "0.9, 37/30 at 1; the prefill-wait scorer already prices waiting behind the prefill "
        "that will produce the blocks, so a further discount only scatters followers.",
    )
    ttl_s: float = Field(
        10.0, gt=0, description="Longest a placement counts without its events confirming it."
    )
    events_within_s: float = Field(
        1.0,
        gt=0,
        description="Time after a request's first token within which the endpoint's events should "
        "report its blocks; a batch after that which does not hold them contradicts the placement.",
    )


class SLODefaults(BaseModel):
    """Objectives for requests that name none (no SLO header, no objective default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float | None = Field(None, gt=0, description="TTFT objective in ms; unset = none.")
    tpot_ms: float | None = Field(
        None, gt=0, description="TPOT objective in ms per output token; unset = none."
    )


class CandidatesConfig(BaseModel):
    """Which endpoints a pick scores in a large pool.

    Building an endpoint's state and scoring it costs ~9 us, so a pick that visits every
    endpoint costs ~9 ms at 1,000 (``kvsched bench epp --scaling``). Above ``prune_above``
    endpoints a pick scores only the endpoints that can win: the best matches of the prompt's
    prefix, the least loaded (kept in order as loads change, not sorted per pick), those with
    the most free KV cache, and whatever the request's hints require (the session's endpoint,
    the holders of its LoRA adapter, each P/D role's least loaded). The load scorers are
    relative to the best candidate, and the least loaded endpoint (by requests ahead and
    in-flight prefill tokens) is always a candidate, so a candidate scores about as it would
    among all of them (the prefill wait drains with time and may order endpoints otherwise;
    measured: the shortlist's pick had the best total over 800 picks, tests/test_candidates.py).
    Only kvsched's scoring policies prune; the peers' policies see every endpoint, as their
    sources do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_above: int = Field(
        32,
        ge=1,
        description="Endpoints above which a pick scores a shortlist instead of every endpoint. "
        "At 32 scoring every endpoint costs a pick ~10% more than a shortlist (8k-token "
        "prompts: 336-338 against 302-311 us; 48: 395-402 against 290-293), little enough "
        "that a pool this small keeps the decision it always had.",
    )
    best_matched: int = Field(
        8, ge=1, description="Endpoints with the longest prefix match that are candidates."
    )
    least_loaded: int = Field(
        8,
        ge=1,
        description="Least loaded endpoints that are candidates (requests ahead, then in-flight "
        "prefill tokens, then KV usage), and as many of each role in a disaggregated pool.",
    )
    most_free_kv: int = Field(4, ge=0, description="Endpoints with the lowest KV usage that are candidates.")


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: IndexConfig = Field(default_factory=IndexConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    approximate: ApproximateConfig = Field(default_factory=ApproximateConfig)
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig,
        description="Recent placements on endpoints with KV events, counted before the events arrive.",
    )
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
    disaggregation: DisaggregationConfig = Field(
        default_factory=DisaggregationConfig,
        description="Prefill/decode disaggregation: a prefill pod and a decode pod per request.",
    )
    sync: PeerSyncConfig = Field(
        default_factory=PeerSyncConfig, description="In-flight load shared with the other replicas."
    )
    candidates: CandidatesConfig = Field(
        default_factory=CandidatesConfig, description="The shortlist a pick scores in a large pool."
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


def decode_policy_setup(config: SchedulerConfig) -> PolicySetup:
    """The same policy with the decode pick's weights, for a disaggregated pool's decode pod."""
    scoring = config.scoring.model_copy(update={"weights": config.disaggregation.decode_weights})
    return PolicySetup(config.policy, scoring, config.index.block_size)


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
    # vllm:lora_requests_info (None: not exported, i.e. LoRA is off there) and the model
    # names the endpoint's series carry (model_name: its served base model).
    lora: LoraSlots | None = None
    served_models: frozenset[str] = frozenset()


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
    session_id: str | None = None
    # Tokens of the prompt after ``token_ids``, estimated, not tokenised: a long text prompt
    # is tokenised only as far as some endpoint holds it (``Scheduler.prefix_held``), since no
    # later token can change any endpoint's match; the rest counts as uncached prefill.
    untokenized_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids) + self.untokenized_tokens


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
    # With Scheduler.stage_clock set: the clock at the start of lookup, score and predict, and
    # at the end of predict.
    stage_ns: tuple[int, int, int, int] | None = None
    # Prefix blocks the primary holds (any tier), as the index matched them.
    matched_blocks: int | None = None
    # The scoring pipeline's decision, when the policy scored candidates (its per-candidate
    # totals are what an adapter reports as each endpoint's score).
    decision: Decision | None = None
    # Disaggregated: the address of the pod that computes the prompt's KV cache and hands it
    # to the primary (the decode pod); None when the primary computes it itself.
    prefill_endpoint: str | None = None

    @property
    def explanation(self) -> dict[str, Any]:
        source = self.explanation_source
        if callable(source):
            source = source()
            object.__setattr__(self, "explanation_source", source)
        return source


@dataclass(slots=True)
class _Unrecorded:
    """What ``Scheduler.record`` needs of a pick ``Scheduler.choose`` made."""

    request: SchedulingRequest
    pick_request: PickRequest
    routing: Routing
    keys: Any
    matches: dict[str, PrefixMatch]
    reported: dict[str, PrefixMatch]
    prefill: str | None
    estimator: PredictorEstimator
    spread_of: int
    now: float
    stage_ns: tuple[int, int, int] | None


@dataclass(frozen=True, slots=True)
class PickChoice:
    """A pick made and not yet recorded: ``result`` names the endpoints (its ``predicted`` is
    the scoring's, if it predicted), ``Scheduler.record`` counts the request in flight and
    places its prompt. Between the two no other call may reach the Scheduler."""

    result: PickResult
    unrecorded: _Unrecorded | None = None


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
    inflight_decode_tokens: int = 0  # prompt tokens of those past their first token
    # Requests routed here since the last scrape: the scraped waiting count cannot know them yet.
    routed_since_scrape: int = 0
    # Of those, the ones other replicas routed (sync on).
    peer_routed_since_scrape: int = 0
    # The prefill queued here, as a fluid estimate with this endpoint's measured drain rate.
    prefill_queue: PrefillQueue = field(default_factory=PrefillQueue)
    # When it was last seen ending an iteration: a first token, a finished request, or a
    # KV-event batch (vLLM publishes one after each engine step that stored or removed blocks).
    last_event_at: float | None = None
    # LoRA adapters of kvsched's requests in flight there (adapter -> count), and those it
    # routed there lately, oldest first.
    inflight_adapters: dict[str, int] = field(default_factory=dict)
    recent_adapters: dict[str, None] = field(default_factory=dict)
    # Order of arrival among the endpoints: a shortlist is scored in the pool's order.
    position: int = 0


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
    # Prefill tokens estimated to be queued ahead of it when it was routed.
    tokens_ahead: float = 0.0
    # The endpoint's feature row at the pick, to train the predictor on once this request's
    # latencies are known; None when the request ended up elsewhere.
    features: FeatureMatrix | None = None
    # (predictor epoch, TTFT ms, TPOT ms) predicted for ``features`` at the pick.
    prediction: tuple[int, float, float] | None = None
    # Prompt tokens the index said the endpoint holds at the pick, and whether that came from
    # the endpoint's KV events (not approximate mode's routing history, not a moved request).
    predicted_cached: int = 0
    predicted_from_events: bool = False
    adapter: str | None = None  # the LoRA adapter it named
    # Disaggregated: the pod charged with its prefill until the first token; None: ``endpoint``.
    prefill_endpoint: str | None = None
    # Lifetimes peers give this request's entry (sync on): whole, and until its first token.
    ttl_s: float = 0.0
    prefill_ttl_s: float = 0.0


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
        self._decode_policy: RoutingPolicy = create_policy(decode_policy_setup(self.config))
        self._rng = random.Random(self.config.seed)
        # A nanosecond clock set by an adapter that traces decisions: pick then times its stages
        # into PickResult.stage_ns. None (the default) times nothing.
        self.stage_clock: Callable[[], int] | None = None
        # The last ``choose`` whose ``record`` has not run yet.
        self._unrecorded: PickChoice | None = None
        self._endpoints: dict[str, _EndpointRuntime] = {}
        self._by_address: dict[str, str] = {}
        self._pool_sizes: dict[str, int] = {}  # endpoints per POOL_LABEL value
        self._inflight: dict[str, _InFlight] = {}
        # Approximate mode: prompts routed to endpoints that publish no KV events, in the index.
        self._approx = RoutedMemory(self.index)
        # Speculative placement: prompts routed to endpoints that publish KV events, until
        # the events confirm or contradict them; in an index of their own, matched at a discount.
        self._speculative = RoutedMemory(PrefixIndex(self.config.index))
        self.speculative_outcomes = dict.fromkeys(SPECULATIVE_OUTCOMES, 0)
        # Shared prefixes whose requests outgrow their holders, priced as cached everywhere.
        self.hot_prefixes = HotPrefixes(self.config.scoring.hot_prefix)
        # Picks made among unhealthy endpoints because no endpoint was healthy (``fail_open``).
        self.failed_open_picks = 0
        # Scrapes that timed out on an endpoint seen serving, not counted against its health.
        self.scrape_timeouts_while_serving = 0
        # Per endpoint with KV events, the first token of the oldest request that prefilled a
        # full block there since the endpoint's last batch: its blocks are owed a report.
        self._owed_events: dict[str, float] = {}
        self.completions = 0
        self.prefix_stats = PrefixStats()
        self.objectives = ObjectiveTable()
        # What a request naming no objective and no SLO resolves to, with the table and the
        # defaults it was resolved under.
        self._plain_objective: tuple[ObjectiveTable | None, SLODefaults | None, ResolvedObjective | None] = (
            None,
            None,
            None,
        )
        self.flow = FlowController(self.config.flow_control)
        self.saturation = SaturationDetector(self.config.flow_control)
        self.predictor = LatencyPredictor(self.config.predictor)
        self._class_ids: dict[str, int] = {}
        self._estimator = PredictorEstimator(self.predictor, self.config.index.block_size, self._class_id)
        # Measured prefill drain rates by endpoint class, and over every class (for a class
        # not measured yet); before any is measured, the rate the latency prior assumes.
        self._prefill_rates: dict[str, DrainRate] = {}
        self._prefill_rate = DrainRate()
        # Their current values (a pick reads one per endpoint; they change only at first tokens).
        self._class_drain: dict[str, float] = {}
        self._pool_drain = 0.0
        self._assumed_prefill_rate = 1000.0 / self.config.predictor.prior.ttft_ms_per_uncached_token
        # Whether some endpoint reports LoRA figures, and every served base-model name: what
        # tells an adapter from the base model in a request's ``model``. None: recompute.
        self._model_view: tuple[bool, frozenset[str]] | None = None
        # Sharing in-flight load with peer replicas (core/peerload.py): this replica's name
        # and incarnation (its start), its messages' sequence number and those not sent yet.
        self.peer_load = PeerLoad(self.config.sync)
        self.incarnation = 0
        self._sync_seq = 0
        self._outbox: list[SyncMessage] = []
        # Called when the outbox gains its first message since it was last taken, so that the
        # sync transport sends it now rather than at its next periodic flush.
        self.on_sync_outbox: Callable[[], None] | None = None
        self._announced = 0
        self.peer_load.on_change = self._peer_load_changed
        # Above candidates.prune_above endpoints: the endpoints by load and by KV usage, kept
        # current as they change (None below it, where nothing reads them).
        self._by_load: OrderedNames[tuple[int, float]] | None = None
        self._by_kv_usage: OrderedNames[float] | None = None
        self._arrivals = 0
        self._last_pick_at = float("-inf")  # sync on: this replica's last pick
        self._burst_share = 0.0
        self._spread_picks = 0

    # --- configuration -----------------------------------------------------------------

    def reload(self, config: SchedulerConfig) -> None:
        """Swap scoring and health settings atomically; the index layout cannot change live.

        The same policy is reconfigured and keeps its state (a round-robin position, a
        policy's own accounting); another policy starts afresh."""
        if config.index != self.config.index:
            raise ValueError("index settings (block size, hash mode, bounds) need a restart")
        setup, decode_setup = policy_setup(config), decode_policy_setup(config)
        policy, decode_policy = self._policy, self._decode_policy
        if config.policy != self.config.policy:
            policy, decode_policy = create_policy(setup), create_policy(decode_setup)
        else:
            policy.reconfigure(setup)
            decode_policy.reconfigure(decode_setup)
        self._policy, self._decode_policy, self.config = policy, decode_policy, config
        self.peer_load.config = config.sync
        self._keep_orders()
        # Both read their config on every call; the waiting room keeps its queue.
        self.flow.config = self.saturation.config = config.flow_control
        self.hot_prefixes.config = config.scoring.hot_prefix
        if config.predictor != self.predictor.config:
            # A predictor is built for one configuration; a new one starts from its prior.
            self.predictor = LatencyPredictor(config.predictor)
            self._estimator = PredictorEstimator(self.predictor, config.index.block_size, self._class_id)

    def _measured_drain(self, endpoint_class: str, drained: float, waited_s: float) -> None:
        """A first token: ``drained`` prefill tokens (its own and those queued ahead of it)
        took ``waited_s`` on an endpoint of this class."""
        rate = self._prefill_rates.setdefault(endpoint_class, DrainRate())
        rate.add(drained, waited_s)
        self._prefill_rate.add(drained, waited_s)
        if rate.samples:
            self._class_drain[endpoint_class] = rate.tokens_per_s
        self._pool_drain = self._prefill_rate.tokens_per_s

    def _drain_rate(self, endpoint_class: str) -> float:
        """Prefill tokens a second on this class of endpoint; 0 while nothing is measured."""
        return self._class_drain.get(endpoint_class, self._pool_drain)

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
        plain = request.objective is None and request.slo_ttft_ms is None and request.slo_tpot_ms is None
        if plain:
            # Most requests name no objective and no SLO: they all resolve alike until the
            # table or the defaults are replaced (resolving costs ~5 us of frozen records).
            table, defaults, known = self._plain_objective
            if table is self.objectives and defaults is self.config.slo_defaults and known is not None:
                return known
        resolved = self._resolve_objective(request)
        if plain:
            self._plain_objective = (self.objectives, self.config.slo_defaults, resolved)
        return resolved

    def _resolve_objective(self, request: SchedulingRequest) -> ResolvedObjective:
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
                self._endpoints[name] = _EndpointRuntime(endpoint, position=self._arrivals)
                self._arrivals += 1
                added.append(endpoint)
            elif runtime.endpoint != endpoint:
                runtime.endpoint = endpoint
        self._by_address = {rt.endpoint.address: name for name, rt in self._endpoints.items()}
        self._model_view = None
        labels = (rt.endpoint.labels.get(POOL_LABEL) for rt in self._endpoints.values())
        self._pool_sizes = Counter(pool for pool in labels if pool is not None)
        self._keep_orders()
        if removed:
            gone = {endpoint.name for endpoint in removed}
            self._approx.forget_endpoints(gone)
            for name in gone:
                self._owed_events.pop(name, None)
            self._speculative.forget_endpoints(gone)
        return EndpointDiff(added, removed)

    def endpoints(self) -> list[Endpoint]:
        return [rt.endpoint for rt in self._endpoints.values()]

    def update_metrics(self, name: str, metrics: EndpointMetrics, now: float) -> None:
        runtime = self._endpoints.get(name)
        if runtime is None:
            return
        previous = runtime.metrics
        if (
            previous is None
            or (previous.lora is None) != (metrics.lora is None)
            or previous.served_models != metrics.served_models
        ):
            self._model_view = None
        runtime.metrics = metrics
        runtime.metrics_at = now
        if self.config.sync.enabled:
            # The requests the engine must know by now; those routed since the last scrape
            # may not have reached it.
            own_settled = (
                runtime.inflight_requests - runtime.routed_since_scrape + runtime.peer_routed_since_scrape
            )
            self.peer_load.reconcile(name, metrics.waiting + metrics.running, own_settled, now)
        runtime.routed_since_scrape = runtime.peer_routed_since_scrape = 0
        runtime.consecutive_failures = 0
        runtime.last_error = ""
        if self._by_load is not None:
            self._reorder(runtime)

    def record_scrape_failure(self, name: str, error: str, now: float, *, timed_out: bool = False) -> None:
        """A scrape that failed; ``timed_out``: no answer within the scrape timeout (the
        connection held), which counts only against an endpoint with no sign of serving
        lately (``health.scrape_timeout_grace_s``)."""
        runtime = self._endpoints.get(name)
        if runtime is None:
            return
        runtime.last_error = error
        grace = self.config.health.scrape_timeout_grace_s
        if timed_out and grace > 0:
            seen = runtime.last_event_at
            if seen is not None and now - seen <= grace:
                # Found with kvsched bench epp --prompt-bytes 220000: every simulated worker
                # tokenising 220 KB prompts answered /metrics after the 1 s timeout while
                # serving, and every one left the pool.
                self.scrape_timeouts_while_serving += 1
                return
        runtime.consecutive_failures += 1

    def is_healthy(self, name: str) -> bool:
        runtime = self._endpoints.get(name)
        return runtime is not None and self._healthy(runtime)

    def _healthy(self, runtime: _EndpointRuntime) -> bool:
        return runtime.consecutive_failures < self.config.health.unhealthy_after_failures

    def endpoint_state(self, name: str, now: float) -> EndpointState:
        return self._state(self._endpoints[name], now)

    def _state(self, runtime: _EndpointRuntime, now: float, *, for_saturation: bool = False) -> EndpointState:
        metrics = runtime.metrics
        metrics_at = runtime.metrics_at
        endpoint = runtime.endpoint
        endpoint_class = endpoint.endpoint_class
        measured = self._class_drain.get(endpoint_class, self._pool_drain)  # _drain_rate, inlined
        last_event = runtime.last_event_at
        inflight, prefilling, prefill_tokens = (
            runtime.inflight_requests,
            runtime.inflight_prefilling,
            runtime.inflight_prefill_tokens,
        )
        # Sync on: what the other replicas routed there counts as load here too.
        peers = self.peer_load.load(endpoint.name)
        if peers is not None:
            inflight += peers.requests
            prefilling += peers.prefilling
            prefill_tokens += peers.prefill_tokens
        queued = runtime.prefill_queue.ahead(now, prefill_tokens, measured)
        if peers is not None and peers.expected_prefill_tokens:
            # The peers' concurrent picks assumed here (core/peerload.py): just routed, so
            # queued whole, as this replica's own are.
            queued += peers.expected_prefill_tokens
        rate = measured or self._assumed_prefill_rate
        lora = None
        if metrics is None:
            waiting, running, kv_usage = 0, 0, 0.0
        else:
            waiting, running, kv_usage = metrics.waiting, metrics.running, metrics.kv_usage
            if metrics.lora is not None:
                lora = self._lora_slots(runtime)
        prefill_ms = None
        if for_saturation:
            # Saturation judges the scraped waiting count raised by the requests routed there
            # since that scrape, so a burst of dispatches between two scrapes saturates the
            # pool as it would the engines; and, for a policy that prices it, the queued
            # prefill in milliseconds.
            waiting += runtime.routed_since_scrape
            if self._policy.prices_queued_prefill:
                prefill_ms = 1000.0 * queued / rate
        # Positional: a pick builds one state per endpoint, and 16 keyword arguments cost
        # 5.9 us a state against 1.7 us positional (measured). The order is EndpointState's
        # field order; tests/test_scheduler.py checks every field by name.
        return EndpointState(
            endpoint.name,
            endpoint.address,
            waiting,
            running,
            kv_usage,
            None if metrics_at is None else (now - metrics_at if now > metrics_at else 0.0),
            runtime.consecutive_failures < self.config.health.unhealthy_after_failures,  # _healthy
            inflight,
            prefill_tokens,
            inflight - prefilling,
            queued,
            rate,
            None if last_event is None else (now - last_event if now > last_event else 0.0),
            prefill_ms,
            endpoint_class,
            endpoint.labels,
            lora,
            runtime.inflight_decode_tokens,
        )

    def _lora_slots(self, runtime: _EndpointRuntime) -> LoraSlots | None:
        """The endpoint's scraped adapters, with kvsched's own in-flight ones counted running."""
        scraped = runtime.metrics.lora if runtime.metrics is not None else None
        if scraped is None:
            return None
        kept = scraped.max_lora
        recent = frozenset(list(runtime.recent_adapters)[-kept:]) if kept else frozenset()
        inflight = runtime.inflight_adapters
        if not inflight and not recent:
            return scraped
        return LoraSlots(scraped.running | inflight.keys(), scraped.waiting, scraped.max_lora, recent)

    # --- the shortlist of a large pool's pick ---------------------------------------------

    def _keep_orders(self) -> None:
        """Keep the endpoints in load order exactly while the pool is above ``prune_above``."""
        if len(self._endpoints) <= self.config.candidates.prune_above:
            self._by_load = self._by_kv_usage = None
            return
        if self._by_load is None or self._by_kv_usage is None:
            self._by_load, self._by_kv_usage = OrderedNames(), OrderedNames()
        by_load, by_kv_usage = self._by_load, self._by_kv_usage
        for name in [name for name in by_load if name not in self._endpoints]:
            by_load.remove(name)
            by_kv_usage.remove(name)
        for runtime in self._endpoints.values():
            self._reorder(runtime)

    def _reorder(self, runtime: _EndpointRuntime) -> None:
        """Put the endpoint where its load now places it: requests ahead (scraped waiting and
        in flight, peers' included), then in-flight prefill tokens (the picker's load order,
        ``scoring.picker._load_keys``), then KV usage."""
        by_load, by_kv_usage = self._by_load, self._by_kv_usage
        if by_load is None or by_kv_usage is None:
            return
        name = runtime.endpoint.name
        metrics = runtime.metrics
        ahead, prefill_tokens = runtime.inflight_requests, runtime.inflight_prefill_tokens
        peers = self.peer_load.load(name)
        if peers is not None:
            ahead += peers.requests
            prefill_tokens += peers.prefill_tokens
        kv_usage = 0.0
        if metrics is not None:
            ahead += metrics.waiting
            kv_usage = metrics.kv_usage
        by_load.set(name, ((ahead << 40) + prefill_tokens, kv_usage))
        by_kv_usage.set(name, kv_usage)

    def _peer_load_changed(self, name: str) -> None:
        if self._by_load is not None and (runtime := self._endpoints.get(name)) is not None:
            self._reorder(runtime)

    def _shortlist(
        self,
        request: SchedulingRequest,
        pool: str | None,
        matches: Mapping[str, PrefixMatch],
        adapter: str | None,
    ) -> list[_EndpointRuntime] | None:
        """The endpoints a pick in a large pool scores (``CandidatesConfig``), in the pool's
        order; None: score every endpoint (a pool at or below ``prune_above``, or a policy
        that reads every endpoint)."""
        by_load, by_kv_usage = self._by_load, self._by_kv_usage
        if by_load is None or by_kv_usage is None or not self._policy.prunes_candidates:
            return None
        config = self.config.candidates
        endpoints = self._endpoints
        subset = request.subset
        if subset is not None and len(subset) <= config.prune_above:
            # The gateway narrowed the pool already: score what it allows.
            by_address = self._by_address
            named = [by_address[address] for address in subset if address in by_address]
            allowed = [endpoints[name] for name in named]
            if pool is not None:
                allowed = [rt for rt in allowed if rt.endpoint.labels.get(POOL_LABEL) == pool]
            # None when it allows nothing known: scoring every endpoint says why, as before.
            return sorted(allowed, key=_arrival) if allowed else None
        unhealthy_after = self.config.health.unhealthy_after_failures

        def admissible(runtime: _EndpointRuntime) -> bool:
            endpoint = runtime.endpoint
            return (
                runtime.consecutive_failures < unhealthy_after
                and (pool is None or endpoint.labels.get(POOL_LABEL) == pool)
                and (subset is None or endpoint.address in subset)
            )

        chosen: dict[str, _EndpointRuntime] = {}
        if matches:
            wanted = config.best_matched
            best = (
                heapq.nlargest(wanted, matches, key=lambda name: matches[name].total_blocks)
                if len(matches) > wanted
                else list(matches)
            )
            held = [endpoints[name] for name in best if name in endpoints]
            found = [runtime for runtime in held if admissible(runtime)]
            if len(found) < wanted and len(best) < len(matches):
                # Some of the longest matches are not candidates: the longest of those that are.
                eligible = (name for name in matches if name in endpoints and admissible(endpoints[name]))
                found = [
                    endpoints[name]
                    for name in heapq.nlargest(wanted, eligible, key=lambda name: matches[name].total_blocks)
                ]
            for runtime in found:
                chosen[runtime.endpoint.name] = runtime
        least = config.least_loaded
        roles = self.config.disaggregation.enabled
        # A disaggregated pool: as many of each role, and a pod labelled prefill only (what
        # makes the pick disaggregated, ``_roles``) if the pool has one.
        decode_left = prefill_left = least if roles else 0
        dedicated_left = 1 if roles else 0
        for name in by_load:
            runtime = endpoints[name]
            if not admissible(runtime):
                continue
            take = least > 0
            least -= 1
            if roles:
                labels = runtime.endpoint.labels
                if decode_left > 0 and serves_decode(labels):
                    decode_left, take = decode_left - 1, True
                if prefill_left > 0 and serves_prefill(labels):
                    prefill_left, take = prefill_left - 1, True
                if dedicated_left and dedicated_prefill(labels):
                    dedicated_left, take = 0, True
            if take:
                chosen[name] = runtime
            if least <= 0 and decode_left <= 0 and prefill_left <= 0 and not dedicated_left:
                break
        most_free = config.most_free_kv
        if most_free:
            for name in by_kv_usage:
                runtime = endpoints[name]
                if admissible(runtime):
                    chosen[name] = runtime
                    most_free -= 1
                    if not most_free:
                        break
        session = request.session_id
        if session and (self._weighs("session_affinity") or self.config.scoring.session_affinity.hard):
            # Its endpoint among all of them wins among any candidates that include it.
            eligible_runtimes = [rt for rt in endpoints.values() if admissible(rt)]
            if eligible_runtimes:
                home = eligible_runtimes[
                    session_endpoint(session, [rt.endpoint.name for rt in eligible_runtimes])
                ]
                chosen[home.endpoint.name] = home
        if adapter is not None and self._weighs("lora_affinity"):
            for name, runtime in endpoints.items():
                if _holds_adapter(runtime, adapter) and admissible(runtime):
                    chosen[name] = runtime
        if not chosen:
            # Nothing eligible (all unhealthy, say): scoring every endpoint gives the reasons.
            return None
        return sorted(chosen.values(), key=_arrival)

    def _weighs(self, scorer: str) -> bool:
        """Whether the pick (or a disaggregated pool's decode pick) weighs this scorer."""
        return (
            self.config.scoring.weights.get(scorer, 0.0) > 0.0
            or self.config.disaggregation.decode_weights.get(scorer, 0.0) > 0.0
        )

    # --- LoRA adapters -------------------------------------------------------------------

    def adapter_of(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names, or None for the base model.

        vLLM serves an adapter under its own model name beside the base model's
        (``--lora-modules name=path``), and exports ``vllm:lora_requests_info`` only with
        LoRA enabled. So a model counts as an adapter when some endpoint reports LoRA
        figures and no endpoint serves it as its base model (its series' ``model_name``)."""
        if model is None:
            return None
        view = self._model_view
        if view is None:
            metrics = [rt.metrics for rt in self._endpoints.values() if rt.metrics is not None]
            view = self._model_view = (
                any(m.lora is not None for m in metrics),
                frozenset(name for m in metrics for name in m.served_models),
            )
        lora_pool, base_models = view
        return model if lora_pool and model not in base_models else None

    # --- flow control ------------------------------------------------------------------

    def saturation_states(self, now: float) -> Iterator[EndpointState]:
        """The endpoints as saturation detection judges them, built as the detector reads them.

        The detector stops at the first endpoint under its limits, so in a pool with room it
        reads one endpoint, not all of them (a full snapshot cost ~16 us an endpoint: 23 ms
        a decision at 1,000 endpoints). Each endpoint's scraped waiting count is raised by the
        requests routed there since that scrape and its queued prefill is priced in
        milliseconds (``prefill_ms_ahead``) where the policy prices it.
        """
        for runtime in self._endpoints.values():
            yield self._state(runtime, now, for_saturation=True)

    def pool_saturated(self, now: float) -> bool:
        """Whether the pool can take more work now (``SaturationDetector``, with hysteresis)."""
        return self.saturation.saturated(self.saturation_states(now), now)

    def admit(self, request: SchedulingRequest, now: float, payload: Any = None) -> Admission:
        """Flow control's answer for an arriving request: pick it now, it waits, or it is refused."""
        objective = self.resolve_objective(request)
        saturated = self.pool_saturated(now)
        # Only a request that will wait needs its service time (its slack depends on it).
        waits = objective.slo_ttft_ms is not None and (saturated or len(self.flow) > 0)
        item = FlowItem(
            request.request_id,
            priority=objective.priority,
            fairness_id=request.fairness_id or "",
            slo_ttft_ms=objective.slo_ttft_ms,
            enqueued_at=now,
            payload=payload,
            service_s=self.service_estimate_s(request) if waits else 0.0,
        )
        return self.flow.admit(item, saturated, now)

    def service_estimate_s(self, request: SchedulingRequest) -> float:
        """The least time ``request`` needs once sent: its own prefill where most of its
        prompt is cached, at the latency prior's base and cost per prefill token (refitted
        on observed TTFTs)."""
        keys = self.index.request_keys(request.token_ids, adapter=self.adapter_of(request.model))
        matches = self._matches(keys) if len(keys) else {}
        cached = max((match.total_blocks for match in matches.values()), default=0)
        uncached = max(request.prompt_tokens - cached * self.config.index.block_size, 0)
        base, ms_per_token = self.predictor.prior.ttft[:2]
        return (base + ms_per_token * uncached) / 1000.0

    def next_dispatch(self, now: float) -> FlowItem | None:
        """The waiting request to pick next, when the pool has room for it."""
        if not len(self.flow) or self.pool_saturated(now):
            return None
        return self.flow.dispatch_next(now)

    # --- picking -----------------------------------------------------------------------

    def _counts_hot_prefixes(self) -> bool:
        """Requests count in the hot-prefix table: this replica's picks and its peers'."""
        return self._policy.prices_hot_prefixes and self.config.scoring.hot_prefix.enabled

    def _matches(self, keys: Any) -> dict[str, PrefixMatch]:
        """Per endpoint, the best match over its data-parallel ranks."""
        return _best_rank(self.index.match(keys))

    def pick(self, request: SchedulingRequest, now: float) -> PickResult:
        return self.record(self.choose(request, now))

    def choose(self, request: SchedulingRequest, now: float) -> PickChoice:
        """``pick``'s decision without its bookkeeping, for an adapter that answers the gateway
        first and calls ``record`` at once after; nothing the answer carries is decided there.
        A choice left unrecorded is recorded before the next."""
        if self._unrecorded is not None:
            self.record(self._unrecorded)
        stage_clock = self.stage_clock
        lookup_ns = stage_clock() if stage_clock is not None else 0
        self._approx.expire(now)
        self.speculative_outcomes["expired"] += self._speculative.expire(now)
        if self.config.sync.enabled:
            self.peer_load.expire(now)
        adapter = self.adapter_of(request.model)
        keys = self.index.request_keys(request.token_ids, adapter=adapter)
        prompt_blocks = len(keys)
        matches = reported = self._matches(keys) if prompt_blocks else {}
        if (
            len(self._speculative)
            and prompt_blocks
            and self.config.speculative.enabled
            and self._policy.reads_speculative_placement
        ):
            matches = self._with_speculative(keys, reported)
        score_ns = stage_clock() if stage_clock is not None else 0
        objective = self.resolve_objective(request)
        if matches and (silent := self.kv_events_stale(now)):
            matches = {name: match for name, match in matches.items() if name not in silent}
        pool = objective.pool if objective.pool is not None and objective.pool in self._pool_sizes else None
        runtimes: Iterable[_EndpointRuntime] | None = None
        if self._by_load is not None:
            runtimes = self._shortlist(request, pool, matches, adapter)
        shortlisted = runtimes is not None
        if runtimes is None:
            runtimes = self._in_pool(pool)
        states = [self._state(rt, now) for rt in runtimes]
        spread_slot, spread_of = self._spread(now)
        hot_blocks = 0
        if matches and self._counts_hot_prefixes():
            # The fair share is the pool's, not the shortlist's: a shortlist of 16 of 1,000
            # endpoints would make every prefix look 60 times less hot than it is.
            endpoints = len(states)
            if shortlisted:
                endpoints = len(self._endpoints) if pool is None else self._pool_sizes[pool]
            hot_blocks = self.hot_prefixes.observe(keys, matches, endpoints, now)
        pick_request = PickRequest(
            request_id=request.request_id,
            prompt_blocks=prompt_blocks,
            prompt_tokens=request.prompt_tokens,
            subset=request.subset,
            slo_ttft_ms=objective.slo_ttft_ms,
            slo_tpot_ms=objective.slo_tpot_ms,
            priority=objective.priority,
            session_id=request.session_id,
            adapter=adapter,
            spread_slot=spread_slot,
            spread_of=spread_of,
            spread_key=f"{now // self.config.sync.spread_epoch_s:.0f}" if spread_of > 1 else "",
            hot_prefix_blocks=hot_blocks,
        )
        if self._approx and matches and self._policy.guards_remembered_prefixes:
            matches = self._approximate_load_guard(matches, states, request.subset)
        estimator = self._estimator
        estimator.last_features = None
        wanted = 1 + self.config.scoring.num_fallbacks
        routing, roles = self._route(pick_request, states, matches, estimator, wanted, keys, now)
        if not routing.endpoints and self.config.health.fail_open and self._nothing_healthy(routing, request):
            # No endpoint in scope is healthy: route among all of them as if they were. Every
            # endpoint is visited (no shortlist): this runs only while the whole pool fails its
            # scrapes, where refusing every request is the worse outcome.
            states = [replace(self._state(rt, now), healthy=True) for rt in self._in_pool(pool)]
            routing, roles = self._route(pick_request, states, matches, estimator, wanted, keys, now)
            if routing.endpoints:
                self.failed_open_picks += 1
        predict_ns = stage_clock() if stage_clock is not None else 0
        if not routing.endpoints:
            stages = (lookup_ns, score_ns, predict_ns, predict_ns) if stage_clock is not None else None
            return PickChoice(
                PickResult("no_endpoints", [], routing.reason, routing.explanation, stage_ns=stages)
            )
        chosen = routing.endpoints[:wanted]
        addresses = [self._endpoints[name].endpoint.address for name in chosen]
        primary = chosen[0]
        match = matches.get(primary)
        prefill, explanation = None, routing.explanation
        if roles is not None:
            prefill, explanation = self._pick_prefill(
                pick_request, roles[1], matches, keys, primary, routing, now
            )
        # Disaggregated, the answer carries neither scores nor a prediction (record's note).
        decision = routing.decision if prefill is None else None
        choice = PickChoice(
            PickResult(
                "ok",
                addresses,
                "",
                explanation,
                None if decision is None else decision.predicted,
                None,
                0 if match is None else match.total_blocks,
                decision,
                prefill_endpoint=None if prefill is None else self._endpoints[prefill].endpoint.address,
            ),
            _Unrecorded(
                request,
                pick_request,
                routing,
                keys,
                matches,
                reported,
                prefill,
                estimator,
                spread_of,
                now,
                (lookup_ns, score_ns, predict_ns) if stage_clock is not None else None,
            ),
        )
        self._unrecorded = choice
        return choice

    def record(self, choice: PickChoice) -> PickResult:
        """``choose``'s bookkeeping: the request in flight on its endpoint (and its peers told),
        its prompt placed there, the chosen endpoint's feature row kept to train the predictor
        on; the result with the prediction the audit and the observation bounds read."""
        pending = choice.unrecorded
        if pending is None or self._unrecorded is not choice:
            return choice.result
        self._unrecorded = None
        result = choice.result
        request, pick_request, routing = pending.request, pending.pick_request, pending.routing
        keys, matches, reported, prefill, now = (
            pending.keys,
            pending.matches,
            pending.reported,
            pending.prefill,
            pending.now,
        )
        primary = routing.endpoints[0]
        flight = self._start(
            request,
            primary,
            keys,
            now,
            self._cached_tokens(matches.get(prefill or primary)),
            self._cached_tokens(reported.get(prefill or primary)),
            adapter=pick_request.adapter,
            prefill_endpoint=prefill,
        )
        decision = routing.decision
        stage_clock = self.stage_clock
        stages = (
            None if pending.stage_ns is None or stage_clock is None else (*pending.stage_ns, stage_clock())
        )
        if self.config.sync.enabled:
            if pending.spread_of > 1:
                # The peers are likely picking too, and what they pick cannot have arrived
                # yet: count it (core/peerload.py). Not for a lone pick: with arrivals sparser
                # than the sync delay a peer rarely picks meanwhile (agentic at 147 req/s,
                # seeds 0-2: TTFT p99 +1%, +81%, +20% over one replica with every pick
                # expecting, +17%, +31%, +21% with spread picks only).
                self.peer_load.expect(
                    decision.slot_picks if decision is not None and decision.slot_picks else [primary],
                    flight.prefill_tokens,
                    now,
                )
            self._last_pick_at = now
        # The latency model learns aggregated serving: a TTFT spent on another pod, plus the KV
        # transfer, is not the decode pod's to learn from.
        if decision is None or prefill is not None:
            self._announce(request, flight, now, None)
            return replace(result, predicted=None, stage_ns=stages)
        # The policy scored candidates: the chosen endpoint's feature row trains the predictor
        # once this request's latencies are known, and its prediction goes on the audit line.
        # Every candidate's latency was predicted when the decision used it; otherwise only the
        # chosen endpoint's is, here.
        predicted = decision.predicted
        candidates = decision.candidates
        estimator = pending.estimator
        if candidates is not None and self.config.predictor.enabled:
            position = next(i for i, s in enumerate(candidates.states) if s.name == primary)
            # A spread pick's last estimate was of the peers' assumed picks, not these states.
            rows = None if decision.slot_picks else estimator.last_features
            flight.features = (
                rows[position].copy()
                if rows is not None
                else estimator.row(candidates, pick_request, position)
            )
            if predicted is None:
                predicted = self.predictor.predict_row(flight.features)
                flight.prediction = (self.predictor.epoch, predicted[0], predicted[1])
            elif rows is not None:
                # Made from this very row (a spread pick's were of other states).
                flight.prediction = (self.predictor.epoch, predicted[0], predicted[1])
        self._announce(request, flight, now, predicted)
        return replace(result, predicted=predicted, stage_ns=stages)

    def _spread(self, now: float) -> tuple[int, int]:
        """(this replica's slot, replicas) for a pick that takes its slot of what one replica
        would pick for as many concurrent requests (``sync.spread_concurrent``); (0, 1): a
        pick as one replica picks."""
        sync = self.config.sync
        mode = sync.spread_concurrent
        if not sync.enabled or mode == "off":
            return 0, 1
        slot, replicas = self.peer_load.slot()
        if replicas < 2:
            return 0, 1
        window = self.peer_load.concurrent_window_s()
        in_burst = now - self._last_pick_at <= window
        # Of this replica's recent picks, the share that came within the window of its
        # previous one: their mean over the first 64 picks, then an exponential average
        # over about 64.
        self._spread_picks += 1
        weight = 1.0 / min(self._spread_picks, 64)
        self._burst_share += ((1.0 if in_burst else 0.0) - self._burst_share) * weight
        if mode == "auto" and not in_burst and self._burst_share < sync.spread_burst_share:
            return 0, 1
        return slot, replicas

    def _roles(self, states: list[EndpointState]) -> tuple[list[EndpointState], list[EndpointState]] | None:
        """The decode and prefill candidates of a disaggregated pool (one with a pod labelled
        prefill only); None: every pod serves requests whole."""
        if not any(dedicated_prefill(s.labels) for s in states):
            return None
        return [s for s in states if serves_decode(s.labels)], [s for s in states if serves_prefill(s.labels)]

    def _pick_prefill(
        self,
        request: PickRequest,
        candidates: list[EndpointState],
        matches: Mapping[str, PrefixMatch],
        keys: Any,
        decode: str,
        decode_routing: Routing,
        now: float,
    ) -> tuple[str | None, Callable[[], dict[str, Any]]]:
        """The prefill pod for a request whose decode pod is ``decode``, by the pipeline's own
        weights (cache overlap, prefill queue), and the decision's account; None when the
        prompt's part not cached on the decode pod is under the threshold (llm-d's
        prefix-based-pd-decider rule), or the pick lands on the decode pod itself."""
        threshold = self.config.disaggregation.non_cached_tokens_threshold
        uncached = request.prompt_tokens - self._cached_tokens(matches.get(decode))
        if threshold > 0 and uncached < threshold:
            return None, _with_prefill(decode_routing.explanation, {"skipped": f"{uncached} uncached tokens"})
        # The gateway's subset hint names where it may send the request (the decode pod);
        # the prefill pod is reached by the decode pod's sidecar, not through the gateway.
        routing = self._policy.route(
            PolicyInput(
                replace(request, subset=None),
                candidates,
                matches,
                self.index.worker_blocks,
                self._rng,
                self._estimator,
                1,
                keys,
                now,
            )
        )
        self._estimator.last_features = None  # they describe the prefill candidates
        prefill = routing.endpoints[0] if routing.endpoints else None
        if prefill == decode:
            prefill = None
        account = {"endpoint": prefill, "reason": routing.reason, "decision": routing.explanation}
        return prefill, _with_prefill(decode_routing.explanation, account)

    def fallback_pick(self, request: SchedulingRequest, now: float | None = None) -> list[str]:
        """Least-loaded healthy endpoints, for when the pipeline itself failed (with
        ``health.fail_open``, the least loaded of all when none is healthy)."""
        allowed = request.subset
        eligible = [
            rt for rt in self._endpoints.values() if allowed is None or rt.endpoint.address in allowed
        ]
        candidates = [rt for rt in eligible if self._healthy(rt)]
        if not candidates and self.config.health.fail_open:
            candidates = eligible
        candidates.sort(
            key=lambda rt: (
                rt.inflight_requests + (rt.metrics.waiting if rt.metrics else 0),
                rt.inflight_prefill_tokens,
                rt.endpoint.name,
            )
        )
        chosen = [rt.endpoint.address for rt in candidates[: 1 + self.config.scoring.num_fallbacks]]
        if chosen and now is not None:
            self._announce(request, self._start(request, self._by_address[chosen[0]], None, now), now, None)
        return chosen

    # --- read-only lookup ----------------------------------------------------------------

    def prefix_held(self, token_ids: Sequence[int], *, model: str | None = None) -> bool:
        """Whether some endpoint holds every full block of ``token_ids``, as reported or as
        placed by a pick whose events have not come yet. While one does, the prompt's next
        blocks may match too; once none does, no later token can change any endpoint's
        match (each block's key chains its predecessors'), so a longer prompt need not be
        tokenised further to be picked for. Reads only: no recency touched."""
        keys = self.index.request_keys(token_ids, adapter=self.adapter_of(model))
        blocks = len(keys)
        if not blocks:
            return True
        if any(match.total_blocks >= blocks for match in self.index.peek(keys).values()):
            return True
        if len(self._speculative) and self.config.speculative.enabled:
            placed = self._speculative.index.peek(keys)
            return any(match.total_blocks >= blocks for match in placed.values())
        return False

    def lookup(self, token_ids: Sequence[int], now: float, *, model: str | None = None) -> PrefixLookup:
        """What the index says every endpoint holds of a prompt, per data-parallel rank and
        tier, as a pick at ``now`` would see it, changing nothing: no in-flight reservation,
        no flow control, no policy or predictor call, no recency touched in the index, no
        approximate-mode entry expired (those past their TTL are left out of the answer
        instead), and every endpoint reported, healthy or not."""
        keys = self.index.request_keys(token_ids, adapter=self.adapter_of(model))
        prompt_blocks = len(keys)
        matches = self.index.peek(keys) if prompt_blocks else {}
        live = self._approx.unexpired_keys(now)
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

    # --- request lifecycle ---------------------------------------------------------------

    def _cached_tokens(self, match: PrefixMatch | None) -> int:
        return 0 if match is None else match.total_blocks * self.config.index.block_size

    def _nothing_healthy(self, routing: Routing, request: SchedulingRequest) -> bool:
        """Was the pick empty for want of a healthy endpoint? With a subset hint the policies
        say only that the subset left nothing: then, if any endpoint in it is unhealthy."""
        if routing.reason == NO_HEALTHY_ENDPOINT:
            return True
        if routing.reason != NO_ELIGIBLE_IN_SUBSET or request.subset is None:
            return False
        by_address, endpoints = self._by_address, self._endpoints
        return any(
            address in by_address and not self._healthy(endpoints[by_address[address]])
            for address in request.subset
        )

    def _in_pool(self, pool: str | None) -> Iterable[_EndpointRuntime]:
        """Every endpoint, or those of ``pool`` (``POOL_LABEL``) when one is named."""
        runtimes = self._endpoints.values()
        if pool is None:
            return runtimes
        return [rt for rt in runtimes if rt.endpoint.labels.get(POOL_LABEL) == pool]

    def _route(
        self,
        request: PickRequest,
        states: list[EndpointState],
        matches: dict[str, PrefixMatch],
        estimator: PredictorEstimator,
        wanted: int,
        keys: Any,
        now: float,
    ) -> tuple[Routing, tuple[list[EndpointState], list[EndpointState]] | None]:
        """The policy's routing over ``states``, and the P/D roles it was split into."""
        roles = self._roles(states) if self.config.disaggregation.enabled else None
        routing = (self._policy if roles is None else self._decode_policy).route(
            PolicyInput(
                request,
                states if roles is None else roles[0],
                matches,
                self.index.worker_blocks,
                self._rng,
                estimator,
                wanted,
                keys,
                now,
            )
        )
        return routing, roles

    def _start(
        self,
        request: SchedulingRequest,
        endpoint: str,
        keys: Any,
        now: float,
        cached_tokens: int = 0,
        reported_tokens: int | None = None,
        *,
        adapter: str | None = None,
        prefill_endpoint: str | None = None,
    ) -> _InFlight:
        """``cached_tokens``: what the pick counted as cached there (speculative placements
        included, at their discount); ``reported_tokens``: of that, what the index says
        without them (default: all of it), the prediction held against what is served."""
        reported = cached_tokens if reported_tokens is None else reported_tokens
        previous = self._inflight.pop(request.request_id, None)
        if previous is not None:
            self._release(previous)
        runtime = self._endpoints[endpoint]
        # Disaggregated, the prefill pod computes the uncached prompt (its queue, its prefill
        # tokens, a request there until the first token) and the decode pod runs the request.
        charged = runtime if prefill_endpoint is None else self._endpoints[prefill_endpoint]
        prompt_tokens = request.prompt_tokens
        prefill_tokens = max(prompt_tokens - cached_tokens, 0)
        rate = self._drain_rate(charged.endpoint.endpoint_class)
        ahead = charged.prefill_queue.add(prefill_tokens, now, self._routed_prefill(charged), rate)
        runtime.inflight_requests += 1
        runtime.routed_since_scrape += 1
        if charged is not runtime:
            charged.inflight_requests += 1
            charged.routed_since_scrape += 1
        charged.inflight_prefilling += 1
        charged.inflight_prefill_tokens += prefill_tokens
        if self._by_load is not None:
            self._reorder(runtime)
            if charged is not runtime:
                self._reorder(charged)
        flight = self._inflight[request.request_id] = _InFlight(endpoint, prompt_tokens, now, prefill_tokens)
        flight.prefill_endpoint = prefill_endpoint
        flight.tokens_ahead = ahead
        flight.predicted_cached = reported
        # A pick that leaned on a speculative placement is no evidence about tokenization:
        # its followers are served from blocks the events had not reported yet.
        flight.predicted_from_events = charged.endpoint.kv_events is not None and cached_tokens == reported
        if adapter is not None:
            flight.adapter = adapter
            self._hold_adapter(runtime, adapter)
        self.prefix_stats.record_decision(reported // self.config.index.block_size)
        if keys is not None and len(keys):
            # Approximate mode and speculative placement remember the pod that computes the
            # prompt (the prefill pod of a disaggregated pick): its cache holds the blocks.
            holder = prefill_endpoint or endpoint
            if charged.endpoint.kv_events is None:
                self._approx.record(
                    request.request_id,
                    holder,
                    [int(key) for key in keys],
                    now + self.config.approximate.ttl_s,
                )
            elif self.config.speculative.enabled and self._policy.reads_speculative_placement:
                self._speculate(request.request_id, holder, keys, reported, now)
        self._policy.on_routed(request.request_id, endpoint, prompt_tokens, prefill_tokens, now)
        return flight

    @staticmethod
    def _hold_adapter(runtime: _EndpointRuntime, adapter: str) -> None:
        runtime.inflight_adapters[adapter] = runtime.inflight_adapters.get(adapter, 0) + 1
        recent = runtime.recent_adapters
        recent.pop(adapter, None)
        recent[adapter] = None
        if len(recent) > _RECENT_ADAPTERS_KEPT:
            del recent[next(iter(recent))]

    def _end_prefill(self, flight: _InFlight) -> _EndpointRuntime | None:
        """Take the request's prefill off the pod charged with it; that pod's runtime."""
        charged = self._endpoints.get(flight.prefill_endpoint or flight.endpoint)
        if charged is None:
            return None
        charged.inflight_prefilling = max(charged.inflight_prefilling - 1, 0)
        charged.inflight_prefill_tokens = max(charged.inflight_prefill_tokens - flight.prefill_tokens, 0)
        if flight.prefill_endpoint is not None:
            charged.inflight_requests = max(charged.inflight_requests - 1, 0)
        if self._by_load is not None:
            self._reorder(charged)
        return charged

    def _routed_prefill(self, runtime: _EndpointRuntime) -> int:
        """Prefill tokens routed to an endpoint and before their first token, peers' included."""
        peers = self.peer_load.load(runtime.endpoint.name)
        return runtime.inflight_prefill_tokens + (peers.prefill_tokens if peers is not None else 0)

    def _release(self, flight: _InFlight) -> None:
        if flight.prefilling:
            self._end_prefill(flight)
        runtime = self._endpoints.get(flight.endpoint)
        if runtime is None:
            return
        runtime.inflight_requests = max(runtime.inflight_requests - 1, 0)
        if not flight.prefilling:
            runtime.inflight_decode_tokens = max(runtime.inflight_decode_tokens - flight.prompt_tokens, 0)
        if self._by_load is not None:
            self._reorder(runtime)
        if flight.adapter is not None:
            held = runtime.inflight_adapters.get(flight.adapter, 0) - 1
            if held > 0:
                runtime.inflight_adapters[flight.adapter] = held
            else:
                runtime.inflight_adapters.pop(flight.adapter, None)

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
        if not moved.prefilling:
            runtime.inflight_decode_tokens += moved.prompt_tokens
        if flight.adapter is not None:
            moved.adapter = flight.adapter
            self._hold_adapter(runtime, flight.adapter)
        if moved.prefilling:
            moved.tokens_ahead = runtime.prefill_queue.add(
                moved.prefill_tokens,
                now,
                self._routed_prefill(runtime),
                self._drain_rate(runtime.endpoint.endpoint_class),
            )
            runtime.inflight_prefilling += 1
            runtime.inflight_prefill_tokens += moved.prefill_tokens
        if self._by_load is not None:
            self._reorder(runtime)
        self._inflight[request_id] = moved
        moved.ttl_s, moved.prefill_ttl_s = flight.ttl_s, flight.prefill_ttl_s
        self._send(Routed(request_id, name, moved.prefill_tokens, moved.ttl_s, moved.prefill_ttl_s), now)
        self._policy.on_routed(request_id, name, moved.prompt_tokens, moved.prefill_tokens, now)

    def on_first_token(self, request_id: str, now: float) -> None:
        flight = self._inflight.get(request_id)
        if flight is None or not flight.prefilling:
            return
        flight.prefilling = False
        flight.first_token_at = now
        decoding = self._endpoints.get(flight.endpoint)
        if decoding is not None:
            decoding.inflight_decode_tokens += flight.prompt_tokens
        runtime = self._end_prefill(flight)
        if runtime is not None:
            endpoint_class = runtime.endpoint.endpoint_class
            runtime.prefill_queue.first_token(
                now, self._routed_prefill(runtime), self._drain_rate(endpoint_class)
            )
            drained, waited = flight.tokens_ahead + flight.prefill_tokens, now - flight.started_at
            self._measured_drain(endpoint_class, drained, waited)
            runtime.last_event_at = now
            self._send(Released(request_id, FIRST_TOKEN, drained, waited), now)
            if (
                runtime.endpoint.kv_events is not None
                and flight.prefill_tokens >= self.config.index.block_size
                and flight.endpoint not in self._owed_events
            ):
                self._owed_events[flight.endpoint] = now
        placed = self._speculative.prompt_of(request_id)
        if placed is not None:
            placed.due_at = now + self.config.speculative.events_within_s
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
        self._send(Released(request_id, DONE), now)
        if (runtime := self._endpoints.get(flight.endpoint)) is not None:
            runtime.last_event_at = now
        self._policy.on_completed(request_id, now)
        self.completions += 1
        if cached_tokens is not None:
            self._record_served(flight, cached_tokens)
        ttft = None if flight.first_token_at is None else flight.first_token_at - flight.started_at
        if flight.features is not None and ttft is not None:
            tpot_ms = None
            if completion_tokens is not None and completion_tokens >= 2 and flight.first_token_at is not None:
                tpot_ms = (now - flight.first_token_at) * 1000.0 / (completion_tokens - 1)
            self.predictor.observe(flight.features, ttft * 1000.0, tpot_ms, now, flight.prediction)
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
        placed = self._speculative.prompt_of(request_id)
        if placed is not None:
            # Whatever the endpoint computed of it, nothing says it kept it.
            self._speculative.forget(placed)
            self.speculative_outcomes["failed"] += 1
        if flight is not None:
            self._release(flight)
            self._send(Released(request_id, DONE), now)
            self._policy.on_completed(request_id, now)

    # --- in-flight load shared with peer replicas ----------------------------------------

    def start_sync(self, replica: str, incarnation: int) -> None:
        """Name this replica to its peers; ``incarnation`` must grow with every start (its
        start time in ns, say), so peers drop what an earlier start routed."""
        self.peer_load.replica, self.incarnation = replica, incarnation

    def _send(self, body: Routed | Released | Snapshot | Placed, now: float) -> None:
        if self.config.sync.enabled:
            self._sync_seq += 1
            first = not self._outbox
            self._outbox.append(
                SyncMessage(self.peer_load.replica, self.incarnation, self._sync_seq, now, body)
            )
            if first and self.on_sync_outbox is not None:
                self.on_sync_outbox()

    def _announce(
        self,
        request: SchedulingRequest,
        flight: _InFlight,
        now: float,
        predicted: tuple[float, float, str] | None,
    ) -> None:
        if not self.config.sync.enabled:
            return
        ttft_ms = e2e_ms = None
        if predicted is not None:
            ttft_ms = predicted[0]
            e2e_ms = ttft_ms + predicted[1] * request.max_tokens if request.max_tokens else None
        flight.ttl_s, flight.prefill_ttl_s = ttl_bounds(self.config.sync, ttft_ms, e2e_ms)
        sample_keys: tuple[int, ...] = ()
        every = self.config.sync.agreement_sample_every
        self._announced += 1
        if every and self._announced % every == 0:
            keys = self.index.request_keys(request.token_ids)
            sample_keys = tuple(int(key) for key in itertools.islice(keys, AGREEMENT_MAX_KEYS))
        placed_keys: tuple[int, ...] = ()
        placed_on = ""
        placed = self._speculative.prompt_of(request.request_id)
        if placed is not None and not placed.forgotten:
            placed_keys = _wire_keys(placed.keys)
            placed_on = placed.endpoint
        routed = Routed(
            request.request_id,
            flight.endpoint,
            flight.prefill_tokens,
            flight.ttl_s,
            flight.prefill_ttl_s,
            True,
            sample_keys,
            len(request.token_ids) if sample_keys else 0,
            placed_keys,
            placed_on,
        )
        self._send(routed, now)

    def would_route(
        self, keys: Sequence[int], prompt_tokens: int, now: float, request_id: str = ""
    ) -> str | None:
        """The endpoint this replica's policy would pick now for a prompt with these block
        keys, changing nothing (no reservation, no recency, a throwaway random source): how
        a peer's sampled routing is judged."""
        folded = _best_rank(self.index.peek(keys)) if keys else {}
        # The shortlist a pick would score (in a large pool), so ties go as a pick's would.
        runtimes: Iterable[_EndpointRuntime] | None = None
        if self._by_load is not None:
            runtimes = self._shortlist(SchedulingRequest(request_id, ()), None, folded, None)
        states = [self._state(rt, now) for rt in (self._endpoints.values() if runtimes is None else runtimes)]
        estimator = self._estimator
        estimator.last_features = None
        routing = self._policy.route(
            PolicyInput(
                PickRequest(request_id, len(keys), prompt_tokens),
                states,
                folded,
                self.index.worker_blocks,
                random.Random(self._sync_seq),
                estimator,
                1,
                keys,
                now,
            )
        )
        estimator.last_features = None
        return routing.endpoints[0] if routing.endpoints else None

    def send_snapshot(self, now: float) -> None:
        """Queue the whole in-flight list for the peers (every ``sync.snapshot_interval_s``)."""
        entries = []
        for request_id, flight in self._inflight.items():
            age = now - flight.started_at
            # Still in flight here for sure: the peer's bound only covers releases lost after
            # this snapshot, so it never goes below the least lifetime.
            floor = self.config.sync.min_ttl_s
            entries.append(
                Routed(
                    request_id,
                    flight.endpoint,
                    flight.prefill_tokens,
                    max(flight.ttl_s - age, floor),
                    max(flight.prefill_ttl_s - age, floor),
                    flight.prefilling,
                )
            )
        self._send(Snapshot(tuple(entries)), now)

    def take_sync_messages(self) -> list[SyncMessage]:
        """The messages for the peers since the last call, oldest first."""
        out, self._outbox = self._outbox, []
        return out

    def receive_sync(self, message: SyncMessage, now: float) -> None:
        """A peer's message: its requests count as load where it routed them."""
        if not self.config.sync.enabled:
            return
        self.peer_load.expire(now)
        body = message.body
        if isinstance(body, Routed) and body.sample_keys and message.replica != self.peer_load.replica:
            stats = self.peer_load.stats
            stats.agreement_samples += 1
            mine = self.would_route(list(body.sample_keys), body.sample_prompt_tokens, now, body.request_id)
            stats.agreement_same += mine == body.endpoint
        for name, prefill_tokens in self.peer_load.receive(message, now):
            runtime = self._endpoints.get(name)
            if runtime is None:
                continue
            if isinstance(body, Placed):
                self._peer_placement(
                    message.replica, body.request_id, body.placed_on, body.placed_keys, now, widened=True
                )
                continue
            if isinstance(body, Released):
                if body.phase == FIRST_TOKEN:
                    self._peer_first_token(message.replica, body.request_id, now)
                # A first token or completion there: the end of one of its iterations.
                at = message.sent_at
                if runtime.last_event_at is None or at > runtime.last_event_at:
                    runtime.last_event_at = at
                if body.phase == FIRST_TOKEN:
                    endpoint_class = runtime.endpoint.endpoint_class
                    # Everything queued ahead of it there is done, as for one of ours.
                    runtime.prefill_queue.first_token(
                        now, self._routed_prefill(runtime), self._drain_rate(endpoint_class)
                    )
                    self._measured_drain(endpoint_class, body.drained_tokens, body.waited_s)
                continue
            if isinstance(body, Routed):
                if body.placed_keys:
                    holder = body.placed_on or body.endpoint
                    self._peer_placement(message.replica, body.request_id, holder, body.placed_keys, now)
                if self._counts_hot_prefixes():
                    self.hot_prefixes.observe_elsewhere(body.placed_keys, now)
            runtime.routed_since_scrape += 1
            runtime.peer_routed_since_scrape += 1
            if prefill_tokens:
                # Bounded by what is routed there, this entry included (already counted).
                runtime.prefill_queue.add(
                    prefill_tokens,
                    now,
                    self._routed_prefill(runtime) - prefill_tokens,
                    self._drain_rate(runtime.endpoint.endpoint_class),
                )

    def _peer_placement(
        self,
        replica: str,
        request_id: str,
        holder: str,
        placed_keys: Sequence[int],
        now: float,
        *,
        widened: bool = False,
    ) -> None:
        """A peer placed a prompt speculatively (at its pick, or ``widened`` after it): count
        it as this replica counts its own, until the endpoint's events confirm or contradict
        it or its time is up."""
        if not (
            self.config.speculative.enabled
            and self._policy.reads_speculative_placement
            and holder in self._endpoints
        ):
            return
        keys = cast("Sequence[int]", np.asarray(placed_keys, dtype=np.uint64))
        if widened:
            self._record_placement(_peer_request(replica, request_id), holder, keys, now)
        else:
            # A pick (a fallback's included) starts afresh, as this replica's own do.
            self._speculative.record(
                _peer_request(replica, request_id), holder, keys, now + self.config.speculative.ttl_s
            )

    def _peer_first_token(self, replica: str, request_id: str, now: float) -> None:
        placed = self._speculative.prompt_of(_peer_request(replica, request_id))
        if placed is not None:
            placed.due_at = now + self.config.speculative.events_within_s

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

    # --- endpoints whose KV events stopped ----------------------------------------------

    def kv_events_stale(self, now: float) -> dict[str, str]:
        """Endpoints that owe a KV-event batch for longer than ``health.kv_events_stale_after_s``,
        with the reason: what the index holds for them is stale, and picks ignore it."""
        limit = self.config.health.kv_events_stale_after_s
        stale: dict[str, str] = {}
        for name, since in self._owed_events.items():
            if now - since > limit:
                stale[name] = (
                    f"KV events stopped: no batch in {now - since:.1f} s since a request prefilled "
                    f"there (limit {limit:g} s); its cached blocks are not counted"
                )
        return stale

    # --- speculative placement -------------------------------------------------------

    @property
    def speculative_placements(self) -> int:
        """Placements counted in picks now (not yet confirmed, contradicted or expired)."""
        return len(self._speculative)

    def place_whole_prompt(self, request_id: str, token_ids: Sequence[int], now: float) -> bool:
        """A request picked from its prompt's leading ids (``SchedulingRequest.untokenized_tokens``
        said how many more there were): its placement, speculative or approximate, now covers
        every full block of the whole prompt, so that the next request sharing more of it than
        was tokenised at the pick finds the endpoint. The pick and the in-flight accounting are
        not revisited. False when the request is no longer in flight or keeps no placement."""
        flight = self._inflight.get(request_id)
        if flight is None:
            return False
        holder = flight.prefill_endpoint or flight.endpoint
        runtime = self._endpoints.get(holder)
        if runtime is None:
            return False
        keys = self.index.request_keys(token_ids, adapter=flight.adapter)
        if not len(keys):
            return False
        if runtime.endpoint.kv_events is None:
            self._approx.record(
                request_id, holder, [int(key) for key in keys], now + self.config.approximate.ttl_s
            )
            return True
        if not (self.config.speculative.enabled and self._policy.reads_speculative_placement):
            return False
        if self._speculative.prompt_of(request_id) is None:
            # The leading ids were held there whole, so nothing was placed: what the endpoint
            # reports already is not placed again.
            reported = self.index.peek(keys).get(holder)
            if reported is not None and reported.total_blocks >= len(keys):
                return False
            self.speculative_outcomes["placed"] += 1
        placed_keys = self._placed_keys(keys)
        self._record_placement(request_id, holder, placed_keys, now)
        if self.config.sync.enabled:
            self._send(Placed(request_id, holder, _wire_keys(placed_keys)), now)
        return True

    def _record_placement(self, request_id: str, holder: str, keys: Sequence[int], now: float) -> None:
        """(Re)place a prompt on ``holder``; a placement widened after its request's first
        token keeps the time its events are due by."""
        previous = self._speculative.prompt_of(request_id)
        due_at = None if previous is None else previous.due_at
        self._speculative.record(request_id, holder, keys, now + self.config.speculative.ttl_s)
        if due_at is not None:
            placed = self._speculative.prompt_of(request_id)
            assert placed is not None
            placed.due_at = due_at

    @staticmethod
    def _placed_keys(keys: Any) -> Sequence[int]:
        # The native backend's lazy keys as a uint64 array, which the index reads in place:
        # 1.5 us for a 512-block prompt against list()'s 16.6 (measured; py-spy put list() at
        # 10.8% of a pick at 8 endpoints, 8k tokens). The reference backend's are a list.
        return (
            list(keys) if isinstance(keys, list) else cast("Sequence[int]", np.asarray(keys, dtype=np.uint64))
        )

    def _speculate(self, request_id: str, endpoint: str, keys: Any, cached_tokens: int, now: float) -> None:
        """Remember that ``endpoint`` will report this prompt's blocks, unless it already does."""
        if cached_tokens >= len(keys) * self.config.index.block_size:
            return
        self._speculative.record(
            request_id, endpoint, self._placed_keys(keys), now + self.config.speculative.ttl_s
        )
        self.speculative_outcomes["placed"] += 1

    def _with_speculative(self, keys: Any, matches: dict[str, PrefixMatch]) -> dict[str, PrefixMatch]:
        """``matches`` with each endpoint's speculative blocks beyond its reported ones added at
        ``speculative.discount`` (rounded down: a block counts whole or not at all)."""
        discount = self.config.speculative.discount
        merged = matches
        for name, placed in self._speculative.index.match(keys).items():
            real = matches.get(name)
            reported = 0 if real is None else real.total_blocks
            extra = int((placed.total_blocks - reported) * discount)
            if extra <= 0:
                continue
            if merged is matches:
                merged = dict(matches)
            merged[name] = (
                PrefixMatch(extra, extra, 0, 0)
                if real is None
                else PrefixMatch(
                    reported + extra, real.gpu_blocks + extra, real.cpu_blocks, real.storage_blocks
                )
            )
        return merged

    def on_kv_batch(self, worker: str, now: float) -> None:
        """An index worker's KV-event batch was applied: its endpoint's placements whose
        blocks the events now report are confirmed (the index proper takes over), and those
        whose events are due and still do not report them are contradicted (evicted at
        once, or never cached); both are forgotten."""
        endpoint = worker.split("#dp", 1)[0]
        self._owed_events.pop(endpoint, None)
        runtime = self._endpoints.get(endpoint)
        # A batch marks the end of an engine step, and decoding requests fill blocks every few
        # steps, so on a busy engine it is the latest sign of where its iteration stands: the
        # wait a new request has for the step in progress. First tokens and completions alone
        # left most picks 20-100 ms from the last one (rag moderate).
        if runtime is not None and (runtime.last_event_at is None or now > runtime.last_event_at):
            runtime.last_event_at = now
        memory = self._speculative
        for placed in memory.of_endpoint(endpoint):
            if placed.due_at is None:
                continue  # its prefill is not done: nothing to confirm yet
            if self._reported_blocks(endpoint, placed.keys) >= len(placed.keys):
                outcome = "confirmed"
            elif now >= placed.due_at:
                outcome = "contradicted"
            else:
                continue
            memory.forget(placed)
            self.speculative_outcomes[outcome] += 1

    def _reported_blocks(self, endpoint: str, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` the endpoint's events report, on its best rank."""
        ranks = self._endpoints[endpoint].endpoint.index_workers() if endpoint in self._endpoints else []
        found = self.index.peek(keys)
        return max((found[rank].total_blocks for rank in ranks if rank in found), default=0)


def _arrival(runtime: _EndpointRuntime) -> int:
    return runtime.position


def _holds_adapter(runtime: _EndpointRuntime, adapter: str) -> bool:
    """The adapter is running or waiting there, or kvsched routed it there lately."""
    if adapter in runtime.inflight_adapters or adapter in runtime.recent_adapters:
        return True
    lora = runtime.metrics.lora if runtime.metrics is not None else None
    return lora is not None and (adapter in lora.running or adapter in lora.waiting)


def _wire_keys(keys: Sequence[int]) -> tuple[int, ...]:
    """A placement's leading block keys as plain ints, as many as a sync message carries."""
    head = keys[:PLACED_MAX_KEYS]
    return tuple(head.tolist() if isinstance(head, np.ndarray) else head)


def _peer_request(replica: str, request_id: str) -> str:
    """A peer's request as this replica's speculative memory names it (ids are per replica)."""
    return f"{replica}\x00{request_id}"


def _best_rank(matches: dict[str, PrefixMatch]) -> dict[str, PrefixMatch]:
    """Per endpoint, the best of its data-parallel ranks' matches (index workers "name#dpN")."""
    if not any("#dp" in worker for worker in matches):
        return matches
    best: dict[str, PrefixMatch] = {}
    for worker, match in matches.items():
        name = worker.split("#dp", 1)[0]
        current = best.get(name)
        if current is None or match.total_blocks > current.total_blocks:
            best[name] = match
    return best


def _with_prefill(
    decode: dict[str, Any] | Callable[[], dict[str, Any]], prefill: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """A disaggregated pick's account: the decode pick's, with the prefill pick under
    ``prefill``; built only when asked for, like the decode pick's own."""

    def build() -> dict[str, Any]:
        account = decode() if callable(decode) else decode
        inner = prefill.get("decision")
        if callable(inner):
            prefill["decision"] = inner()
        return {**account, "prefill": prefill}

    return build
