"""ServeConfig: everything ``kvsched serve`` reads, from a YAML/JSON file plus flag overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error, and
every error names its field by path (``scheduler.scoring.weights.prefix_overlap: ...``).
Ports follow the GIE Endpoint Picker convention (shared PROTOCOLS.md §2): 9002 ext_proc gRPC
(TLS, self-signed by default), 9003 plaintext gRPC health, 9090 Prometheus metrics.

The Helm chart writes ``grpc_port``, ``health_port``, ``metrics_port``, ``tls`` and ``pool``
into the file; the rest comes from the chart's ``config`` value as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.adapters.discovery import (
    DEFAULT_KV_PORT,
    DEFAULT_REPLAY_PORT,
    EndpointDefaults,
    StaticEndpointSpec,
    build_endpoints,
    check_topic_template,
)
from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.kubernetes.config import KubernetesDiscoveryConfig
from scheduler.adapters.scraper import (
    DEFAULT_IDLE_INTERVAL_S,
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PAGES_PER_S,
    DEFAULT_TIMEOUT_S,
)
from scheduler.adapters.tokenizer_probe import TokenizerMode
from scheduler.adapters.tracing import TracingConfig
from scheduler.codec.prom import EngineKind, MetricNames, MetricsSpec
from scheduler.core.kvingest import IngestConfig
from scheduler.core.model_rewrite import MAX_WEIGHT, RewriteRule, RewriteTarget
from scheduler.core.scheduler import Endpoint, SchedulerConfig
from scheduler.core.warmup import WarmupConfig

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class TLSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["self_signed", "files", "plaintext"] = Field(
        "self_signed",
        description="ext_proc transport: a self-signed certificate made at start (the GIE default), "
        "a certificate and key from files (re-read when they change), or plaintext.",
    )
    cert_file: str | None = Field(None, description="PEM certificate (chain) for mode 'files'.")
    key_file: str | None = Field(None, description="PEM private key for mode 'files'.")

    @model_validator(mode="after")
    def _files_only_with_mode_files(self) -> TLSConfig:
        if self.mode == "files" and not (self.cert_file and self.key_file):
            raise ValueError("mode 'files' needs cert_file and key_file")
        if self.mode != "files" and (self.cert_file or self.key_file):
            raise ValueError(f"cert_file/key_file are only used with mode 'files' (mode is {self.mode!r})")
        return self


class KVEventsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Subscribe to the pods' KV events; off = approximate mode for every endpoint."
    )
    port: int = Field(
        DEFAULT_KV_PORT, ge=1, le=65535, description="Live PUB port when an endpoint gives only its address."
    )
    replay_port: int | None = Field(
        DEFAULT_REPLAY_PORT,
        ge=1,
        le=65535,
        description="Replay ROUTER port when an endpoint gives only its address; null = no replay.",
    )
    topic: str = Field(
        "",
        description="ZMQ topic prefix; may name {host}, {port}, {address}, {name}. '' = every topic.",
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    receive_thread: bool = Field(
        True,
        description="Receive the live KV-event sockets on one native thread where the native module "
        "is built (less CPU per batch at many pods); false = on the event loop with pyzmq.",
    )

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, value: str) -> str:
        return check_topic_template(value)


class MetricNamesConfig(BaseModel):
    """Metric names of a model server that is neither vLLM nor SGLang (first present wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    waiting: list[str] = Field(min_length=1, description="Gauge(s) of queued requests.")
    running: list[str] = Field(min_length=1, description="Gauge(s) of running requests.")
    kv_usage: list[str] = Field(min_length=1, description="Gauge(s) of KV-cache usage, 0-1.")
    cache_info: str | None = Field(None, description="Info gauge with block_size/num_gpu_blocks labels.")


class PoolIdentity(BaseModel):
    """The InferencePool this process serves (written by the Helm chart; informational here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    namespace: str | None = None
    group: str | None = None
    model_server_type: Literal["vllm", "sglang"] | None = Field(
        None, description="Which metric names to scrape when scrape_engine is 'auto'."
    )


class DiscoveryConfig(BaseModel):
    """Where the endpoint set comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["static", "kubernetes"] = Field(
        "static",
        description="'static': the endpoints list (and --endpoint flags). 'kubernetes': the ready pods "
        "of InferencePools, with SchedulingPolicy hot reload and InferenceObjective priorities.",
    )
    kubernetes: KubernetesDiscoveryConfig = Field(default_factory=KubernetesDiscoveryConfig)


class ModelMatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["Exact"] = Field("Exact", description="Only Exact, as in the Inference Extension.")
    value: str = Field(..., min_length=1, description="The request body's model name.")


class RewriteMatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelMatchSpec


class RewriteTargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model_rewrite: str = Field(..., alias="modelRewrite", min_length=1, description="The model sent on.")
    weight: int | None = Field(
        None, ge=1, le=MAX_WEIGHT, description="Share of the rule's traffic: weight / sum of weights."
    )


class ModelRewriteRuleSpec(BaseModel):
    """One rule of an InferenceModelRewrite's ``spec.rules`` (inference.networking.x-k8s.io/v1alpha2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    matches: list[RewriteMatchSpec] = Field(
        default_factory=list, description="Any of these model names; empty: every request."
    )
    targets: list[RewriteTargetSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> ModelRewriteRuleSpec:
        given = [target.weight is not None for target in self.targets]
        if any(given) and not all(given):
            raise ValueError("a weight set for one target must be set for every target of the rule")
        return self

    def rule(self) -> RewriteRule:
        return RewriteRule(
            tuple(match.model.value for match in self.matches),
            tuple(RewriteTarget(t.model_rewrite, t.weight or 1) for t in self.targets),
        )


class PeerSyncTransportConfig(BaseModel):
    """Where replicas exchange their in-flight load (on when scheduler.sync.enabled)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(9004, ge=0, le=65535, description="This replica's ZMQ PUB port; 0 = ephemeral.")
    peers: list[str] = Field(
        default_factory=list, description="Static peers' PUB addresses (tcp://host:port)."
    )
    service: str | None = Field(
        None,
        description="Kubernetes: the kvsched Service whose EndpointSlices list the peers "
        "(its ready addresses at `port`, this pod's $POD_IP left out).",
    )
    namespace: str | None = Field(None, description="The Service's namespace; unset = $POD_NAMESPACE.")
    refresh_s: float = Field(10.0, gt=0, description="How often the EndpointSlices are listed.")
    replica: str | None = Field(
        None, description="This replica's name to its peers; unset = $POD_NAME, else the host name."
    )


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("0.0.0.0", description="Address every port binds to.")
    grpc_port: int = Field(9002, ge=0, le=65535, description="ext_proc (and kvsched.v1) gRPC; 0 = ephemeral.")
    health_port: int | None = Field(
        9003, ge=0, le=65535, description="Plaintext grpc.health.v1; 0 = ephemeral, null = off."
    )
    metrics_port: int | None = Field(
        9090, ge=0, le=65535, description="Prometheus /metrics; 0 = ephemeral, null = off."
    )
    tls: TLSConfig = Field(default_factory=TLSConfig)
    pool: PoolIdentity = Field(default_factory=PoolIdentity)

    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    endpoints: list[StaticEndpointSpec] = Field(
        default_factory=list, description="Static model-server endpoints (the static discovery source)."
    )
    kv_events: KVEventsConfig = Field(default_factory=KVEventsConfig)
    peer_sync: PeerSyncTransportConfig = Field(
        default_factory=PeerSyncTransportConfig,
        description="The channel replicas share in-flight load over (scheduler.sync turns it on).",
    )
    warmup: WarmupConfig = Field(
        default_factory=WarmupConfig,
        description="Readiness waits for the KV-event replays and the peers' first snapshots.",
    )

    scrape_interval_s: float = Field(
        DEFAULT_INTERVAL_S, gt=0, le=60, description="Period of each endpoint's /metrics scrape."
    )
    scrape_idle_interval_s: float | None = Field(
        DEFAULT_IDLE_INTERVAL_S,
        gt=0,
        le=60,
        description="Period of the scrape of an endpoint kvsched has no request in flight on (never less "
        "than scrape_interval_s): its figures move only by traffic kvsched does not route. Unset = every "
        "endpoint at scrape_interval_s.",
    )
    scrape_max_pages_per_s: float | None = Field(
        DEFAULT_MAX_PAGES_PER_S,
        gt=0,
        description="Pages a second the scraper fetches at most, every endpoint together: a pool "
        "larger than this times scrape_interval_s is scraped every endpoints / this seconds (1,000 "
        "endpoints: every 0.5 s). A vLLM page costs ~65 us of CPU to fetch and read; the in-flight "
        "accounting covers figures up to a second old. Unset: every endpoint at scrape_interval_s.",
    )
    scrape_timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=60, description="Per-scrape HTTP timeout.")
    scrape_engine: EngineKind = Field(
        "auto",
        description="Metric names to read: 'vllm', 'sglang', or 'auto' (pool.model_server_type, "
        "else whatever the page carries).",
    )
    scrape_model: str | None = Field(
        None, description="Only count series whose model_name label is this; unset = all series."
    )
    scrape_metric_names: MetricNamesConfig | None = Field(
        None, description="Replaces the engine's metric names (scrape_engine is then ignored)."
    )
    scrape_max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)

    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig,
        description="Index (block size, hash mode, seeds, bounds), scoring, endpoint health "
        "(unhealthy after N failed scrapes, staleness), approximate mode, policy.",
    )
    extproc: ExtProcConfig = Field(
        default_factory=ExtProcConfig,
        description="Endpoint Picker protocol settings, among them "
        "on_internal_error (fallback | grpc_error).",
    )
    model_rewrites: list[ModelRewriteRuleSpec] = Field(
        default_factory=list,
        description="InferenceModelRewrite rules (spec.rules): the body's model name rewritten, split by "
        "weight, before picking; exact matches before generic rules, the first listed among equals.",
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig,
        description="OpenTelemetry traces of routing decisions over OTLP (off by default; needs "
        "the 'tracing' extra).",
    )
    tokenizer_dir: str | None = Field(
        None,
        description="Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json with the "
        "chat template) for text and chat prompts; `kvsched sim` prints the simulated pool's.",
    )
    tokenizer_json: str | None = Field(
        None, description="Model tokenizer.json for prompt token ids (instead of tokenizer_dir)."
    )
    tokenizer_config: str | None = Field(None, description="tokenizer_config.json (chat template).")
    tokenizer_mode: TokenizerMode = Field(
        "auto",
        description="'local': the configured tokenizer files; 'worker_render': ask a worker's "
        "/v1/(chat/)completions/render for every new prompt (pools whose tokenizer kvsched cannot "
        "load); 'bytes': the byte stand-in (approximate mode only); 'auto': the configured files, else "
        "the files a worker names in /model_info (the simulated pool does), else worker_render when "
        "the workers answer it, else bytes.",
    )
    tokenizer_cache_mib: float = Field(
        64.0,
        ge=0,
        description="Memory for the pieces of routed text and chat prompts and their ids, so a prompt "
        "that repeats earlier ones (a shared system prompt, the same documents, a conversation's "
        "earlier turns) is tokenised only where it is new: 0.16-0.42x the CPU of tokenising it whole "
        "on the `kvsched bench peers` workloads. 0 = tokenise every prompt whole.",
    )
    tokenizer_probe: bool = Field(
        True,
        description="Once endpoints are known, tokenise a probe prompt locally and through a worker's "
        "/tokenize and report a disagreement (log, metric, /debug/status).",
    )

    log_level: LogLevel | None = Field(None, description="Overrides the command line's --log-level.")
    predictor_model_path: str | None = Field(
        None,
        description="File the TTFT/TPOT model is saved to after each training and loaded from at "
        "start, so a restarted replica predicts from its first request (a writable volume; unset = "
        "in memory only).",
    )
    audit_log: bool = Field(
        False, description="One JSON line per routing decision on the kvsched.audit logger."
    )
    reload_interval_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="How often the --config file is checked for changes (live reload); 0 = only on SIGHUP.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long ext_proc streams in flight may finish."
    )

    @field_validator("endpoints")
    @classmethod
    def _unique_endpoint_names(cls, value: list[StaticEndpointSpec]) -> list[StaticEndpointSpec]:
        names = [spec.name or spec.address for spec in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate endpoint names: {', '.join(duplicates)}")
        return value

    @model_validator(mode="after")
    def _tokenizer_is_consistent(self) -> ServeConfig:
        if self.tokenizer_dir is not None and self.tokenizer_json is not None:
            raise ValueError("give tokenizer_dir or tokenizer_json, not both")
        has_files = self.tokenizer_dir is not None or self.tokenizer_json is not None
        if self.tokenizer_mode == "local" and not has_files:
            raise ValueError("tokenizer_mode 'local' needs tokenizer_dir (or tokenizer_json)")
        if self.tokenizer_mode in ("worker_render", "bytes") and has_files:
            raise ValueError(f"tokenizer_mode {self.tokenizer_mode!r} does not use tokenizer files")
        return self

    @model_validator(mode="after")
    def _discovery_is_consistent(self) -> ServeConfig:
        if self.discovery.type != "kubernetes":
            return self
        if self.endpoints:
            raise ValueError(
                "endpoints are the static discovery source: with discovery.type 'kubernetes' the pools' "
                "pods are the endpoints (remove endpoints, or use discovery.type 'static')"
            )
        if not self.kubernetes_pools():
            raise ValueError(
                "discovery.kubernetes.pools (or pool.name) must name the InferencePool(s) to serve"
            )
        return self

    def kubernetes_pools(self) -> list[str]:
        pools = self.discovery.kubernetes.pools
        if pools:
            return list(pools)
        return [self.pool.name] if self.pool.name else []

    def kubernetes_namespace(self, environ: Mapping[str, str]) -> str | None:
        """The configured namespace, else pool.namespace, else $POD_NAMESPACE (the chart sets it)."""
        return self.discovery.kubernetes.namespace or self.pool.namespace or environ.get("POD_NAMESPACE")

    def pool_api_version(self) -> str:
        configured = self.discovery.kubernetes.pool_api_version
        if configured is not None:
            return configured
        if self.pool.group == "inference.networking.x-k8s.io":
            return "inference.networking.x-k8s.io/v1alpha2"
        return "inference.networking.k8s.io/v1"

    def endpoint_defaults(self) -> EndpointDefaults:
        kv = self.kv_events
        return EndpointDefaults(
            kv_events=kv.enabled, kv_port=kv.port, replay_port=kv.replay_port, kv_topic=kv.topic
        )

    def static_endpoints(self) -> list[Endpoint]:
        """The configured endpoints with pool defaults filled in; no KV events when disabled."""
        endpoints = build_endpoints(self.endpoints, self.endpoint_defaults())
        if self.kv_events.enabled:
            return endpoints
        return [_without_events(endpoint) for endpoint in endpoints]

    def metrics_spec(self) -> MetricsSpec:
        engine: EngineKind = self.scrape_engine
        if engine == "auto" and self.pool.model_server_type is not None:
            engine = self.pool.model_server_type
        names = self.scrape_metric_names
        custom = (
            None
            if names is None
            else MetricNames(
                tuple(names.waiting), tuple(names.running), tuple(names.kv_usage), names.cache_info
            )
        )
        return MetricsSpec(engine=engine, model=self.scrape_model, names=custom)


def _without_events(endpoint: Endpoint) -> Endpoint:
    return Endpoint(
        name=endpoint.name,
        address=endpoint.address,
        data_parallel_size=endpoint.data_parallel_size,
        metrics_url=endpoint.metrics_url,
        endpoint_class=endpoint.endpoint_class,
        labels=endpoint.labels,
    )


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending field."""


def format_validation_error(error: ValidationError, source: str = "") -> str:
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {location}: {message}")
    where = f" ({source})" if source else ""
    return f"invalid configuration{where}:\n" + "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """YAML (a superset of JSON) or JSON by extension; the top level must be a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_path(d, "scheduler.scoring.mode", "softmax")``: nested override, sections created."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_set_flag(text: str) -> tuple[str, Any]:
    """``KEY.PATH=VALUE`` with VALUE read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from None
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    sets: Sequence[tuple[str, Any]] = (),
) -> ServeConfig:
    """File, then top-level ``overrides`` (None values skipped), then dotted ``sets``."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    for dotted, value in sets:
        set_path(data, dotted, value)
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path) if path else "")) from None
