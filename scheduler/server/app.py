"""The Endpoint Picker process: the one place that composes the core with its adapters.

    discovery (endpoint sets) --> Scheduler.set_endpoints
                              --> per endpoint: /metrics scraping, KV-event subscription
    scraper (HTTP)            --> Scheduler.update_metrics / record_scrape_failure
    KV-event ingest (ZMQ)     --> Scheduler.index
    ext_proc gRPC server      --> Scheduler.pick / on_* (request lifecycle)
    metrics HTTP server       <-- every component's counters, read at scrape time

Everything runs on one asyncio event loop, so the Scheduler is only touched from that loop.
``async with ServeApp(config) as app`` starts it all (ports may be 0; ``app.grpc_port``,
``app.health_port``, ``app.metrics_port`` are the bound ones) and stops it all on exit;
``serve_until_signalled`` is the same until SIGTERM/SIGINT.

With ``discovery.type: kubernetes`` the endpoint sets come from the served InferencePools'
ready pods, and the served pools' SchedulingPolicy is laid over the configuration file's
scheduler settings (``apply_policy``): a policy and a file reload each rebuild the effective
settings from both, so neither undoes the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from scheduler.adapters.discovery import EndpointDefaults, EndpointSource, StaticEndpointSource
from scheduler.adapters.extproc import ExtProcServer, TLSSettings
from scheduler.adapters.extproc.lookup import PromptLookup
from scheduler.adapters.kubernetes.client import KubeClient, in_cluster_namespace
from scheduler.adapters.kubernetes.discovery import KubernetesDiscovery
from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
from scheduler.adapters.kubernetes.pools import POOL_RESOURCES
from scheduler.adapters.kubernetes.reflector import Backoff
from scheduler.adapters.kv_subscriber import KVEventIngestService, SubscriberConfig, publisher_views
from scheduler.adapters.metrics import KvschedCollector, MetricsHTTPServer, new_registry
from scheduler.adapters.peersync import EndpointSlicePeers, PeerSyncTransport
from scheduler.adapters.predictor_trainer import PredictorTrainer
from scheduler.adapters.scraper import MetricsScraper
from scheduler.adapters.tokenizer import make_tokenizer
from scheduler.adapters.tokenizer_probe import TokenizerService
from scheduler.adapters.tracing import otlp_tracer
from scheduler.core.kvingest import IngestStats, PublisherView
from scheduler.core.model_rewrite import ModelRewrites
from scheduler.core.scheduler import Endpoint, EndpointDiff, EndpointMetrics, Scheduler, SchedulerConfig
from scheduler.core.warmup import Warmup, WarmupState
from scheduler.server.config import ConfigError, ServeConfig, TLSConfig
from scheduler.server.debug_http import debug_routes, kv_ingest_document

log = logging.getLogger(__name__)

# How long start() waits for discovery's first endpoint set before serving without it
# (readiness stays NOT_SERVING until a set arrives).
FIRST_SET_TIMEOUT_S = 10.0
# How often readiness is evaluated until the replica is first ready, so that it reports
# SERVING within this of its view turning warm (the health refresh is every 1 s; a gateway's
# health check every 0.2 s in the bench's Envoy).
READY_POLL_S = 0.05


class _ScrapeSink:
    """The scraper's results go to the Scheduler; each one also calls ``refreshed``."""

    def __init__(self, scheduler: Scheduler, refreshed: Callable[[], None]) -> None:
        self._scheduler = scheduler
        self._refreshed = refreshed

    def update_metrics(self, name: str, metrics: EndpointMetrics, now: float) -> None:
        self._scheduler.update_metrics(name, metrics, now)
        self._refreshed()

    def record_scrape_failure(self, name: str, error: str, now: float, *, timed_out: bool = False) -> None:
        self._scheduler.record_scrape_failure(name, error, now, timed_out=timed_out)
        self._refreshed()


def peer_sync_transport(
    config: ServeConfig, scheduler: Scheduler, clock: Callable[[], float]
) -> PeerSyncTransport:
    """The sync channel of this replica: named after its pod (or host), numbered by its start."""
    sync = config.peer_sync
    replica = sync.replica or os.environ.get("POD_NAME") or socket.gethostname()
    # Wall-clock nanoseconds at start: a restart always numbers higher than the run before.
    scheduler.start_sync(replica, time.time_ns())
    return PeerSyncTransport(
        scheduler, bind=f"tcp://{config.host}:{sync.port}", peers=sync.peers, clock=clock
    )


def tls_settings(config: TLSConfig) -> TLSSettings:
    if config.mode == "plaintext":
        return TLSSettings.plaintext()
    if config.mode == "files":
        assert config.cert_file is not None and config.key_file is not None
        return TLSSettings.from_files(config.cert_file, config.key_file)
    return TLSSettings()


class ServeApp:
    """Scheduler + ext_proc server + KV-event ingest + scraper + metrics + discovery."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        source: EndpointSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        config_loader: Callable[[], ServeConfig] | None = None,
        watch_file: str | Path | None = None,
    ) -> None:
        self.config = config
        self.config_loader = config_loader
        self._watch_file = None if watch_file is None else Path(watch_file)
        self._watch_task: asyncio.Task[None] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()
        # What the running configuration was loaded from; later content is a change.
        self._watch_seen = None if self._watch_file is None else _read_bytes(self._watch_file)
        self._reload_lock = asyncio.Lock()
        # Watched-file reloads: applied, and refused (the file did not validate), and why.
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error = ""
        self.clock = clock
        self.scheduler = Scheduler(config.scheduler)
        self.registry = new_registry()
        self.ingest: KVEventIngestService | None = (
            KVEventIngestService(
                self.scheduler.index,
                clock=clock,
                on_applied=self.scheduler.on_kv_batch,
                max_queued_bytes_total=config.kv_events.ingest.max_queued_bytes_total,
                receive_thread=config.kv_events.receive_thread,
            )
            if config.kv_events.enabled
            else None
        )
        # Each refresh of an endpoint's metrics may let a waiting request go.
        self.scraper = MetricsScraper(
            _ScrapeSink(self.scheduler, self._metrics_refreshed),
            interval_s=config.scrape_interval_s,
            idle_interval_s=(
                None
                if config.scrape_idle_interval_s is None
                else max(config.scrape_idle_interval_s, config.scrape_interval_s)
            ),
            activity=self.scheduler.has_inflight,
            max_pages_per_s=config.scrape_max_pages_per_s,
            timeout_s=config.scrape_timeout_s,
            spec=config.metrics_spec(),
            max_body_bytes=config.scrape_max_body_bytes,
            clock=clock,
        )
        self.tokenizers = tokenizer_service(config, self._healthy_addresses)
        self._tokenizer_task: asyncio.Task[None] | None = None
        self.tracer = otlp_tracer(config.tracing) if config.tracing.enabled else None
        self.server = ExtProcServer(
            self.scheduler,
            host=config.host,
            port=config.grpc_port,
            tls=tls_settings(config.tls),
            health_port=config.health_port,
            config=config.extproc,
            tokenizer=self.tokenizers.tokenizer,
            ready=self._ready,
            clock=clock,
            metrics_registry=self.registry,
            tracer=self.tracer,
            model_rewrites=ModelRewrites([spec.rule() for spec in config.model_rewrites]),
        )
        # Fits in a lower-priority process: on a thread here they held the GIL (and so every
        # ext_proc stream) for most of each fit.
        self.trainer = PredictorTrainer(
            self.scheduler.predictor, model_path=config.predictor_model_path, clock=clock, fit_in="process"
        )
        self.registry.register(
            KvschedCollector(
                self.scheduler,
                scraper=self.scraper,
                ingest_stats=self._ingest_stats,
                clock=clock,
                trainer_stats=lambda: self.trainer.stats,
                tokenizer_probe=lambda: self.tokenizers.probe.status,
                publisher_views=self.publisher_views,
                sync_transport=lambda: None if self.peer_sync is None else self.peer_sync.stats,
            )
        )
        self.peer_sync: PeerSyncTransport | None = None
        self.peer_discovery: EndpointSlicePeers | None = None
        if config.scheduler.sync.enabled:
            self.peer_sync = peer_sync_transport(config, self.scheduler, clock)
            # Observation streams that land on the replica that did not route the request.
            self.server.observations.forward = self.peer_sync.send_observed
            self.peer_sync.on_observed = self.server.observations.receive
        # Read-only: what the index says every endpoint holds of a prompt (/debug/lookup).
        self.lookups = PromptLookup(self.scheduler, self.server.runner)
        self.metrics_server = (
            None
            if config.metrics_port is None
            else MetricsHTTPServer(
                self.registry,
                host=config.host,
                port=config.metrics_port,
                status=self.status,
                routes=debug_routes(self.lookups, self.kv_ingest_status),
            )
        )
        # The SchedulingPolicy in force (None: the configuration file's settings alone).
        self.policy: PolicySettings | None = None
        self.kubernetes: KubernetesDiscovery | None = None
        if source is None and config.discovery.type == "kubernetes":
            self.kubernetes = kubernetes_discovery(config, self)
            source = self.kubernetes.source
        self.source: EndpointSource = source or StaticEndpointSource(config.static_endpoints())
        self._updates: AsyncIterator[list[Endpoint]] | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._first_set = asyncio.Event()
        self._started = False
        # Readiness waits for a warm view (core/warmup.py); the clock starts in start().
        self.warmup = Warmup(config.warmup, clock())

    # --- bound ports -----------------------------------------------------------------------

    @property
    def grpc_port(self) -> int:
        if self.server.port is None:
            raise RuntimeError("the ext_proc server is not started")
        return self.server.port

    @property
    def health_port(self) -> int | None:
        return self.server.health_port

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.port

    @property
    def ports(self) -> dict[str, int | None]:
        return {"grpc": self.grpc_port, "health": self.health_port, "metrics": self.metrics_port}

    @property
    def certificate_pem(self) -> bytes | None:
        """The ext_proc certificate clients should trust (None in plaintext mode)."""
        return self.server.certificate_pem

    # --- components' views -----------------------------------------------------------------

    def _ready(self) -> bool:
        if not (self._first_set.is_set() and self.scheduler.endpoints()):
            return False
        return self.warm_state().warm

    def warm_state(self) -> WarmupState:
        """The warm-up gate as of now (a latch: once warm, nothing is read again)."""
        warmup = self.warmup
        if warmup.warm:
            return warmup.state
        was = warmup.state
        sync = self.peer_sync
        state = warmup.update(
            self.clock(),
            self.publisher_views() if self._first_set.is_set() else [],
            sync=sync is not None,
            peers_known=0 if sync is None else len(sync.peers),
            peers_with_snapshot=self.scheduler.peer_load.peers_with_snapshot(),
        )
        if state.warm:
            log.info(
                "view warm after %.2fs%s",
                (state.warm_at or warmup.started_at) - warmup.started_at,
                f"; gave up waiting on: {', '.join(state.given_up)}" if state.given_up else "",
            )
        elif state.waiting != was.waiting:
            log.info("not ready yet: waiting on %s", ", ".join(state.waiting))
        return state

    def _healthy_addresses(self) -> list[str]:
        scheduler = self.scheduler
        return [e.address for e in scheduler.endpoints() if scheduler.is_healthy(e.name)]

    def status(self) -> dict[str, Any]:
        """What a diagnosis reads (``/debug/status`` on the metrics port)."""
        stats = self.scheduler.prefix_stats
        verdict = stats.verdict()
        return {
            "endpoints": len(self.scheduler.endpoints()),
            # Endpoints by KV-event view state; each one's detail is on /debug/kv-ingest.
            "kv_events": self.kv_ingest_status()["endpoints_by_state"],
            # Where the live KV-event sockets are received: "native" (one thread), "python"
            # (pyzmq on the event loop), or "off".
            "kv_receive": "off" if self.ingest is None else self.ingest.receive_mode,
            "tokenizer": self.tokenizers.status(),
            # Readiness: whether the view is warm, and what it waits on (or gave up on).
            "warmup": self.warm_state().as_dict(self.warmup.started_at),
            "prefix_match": {
                "status": verdict.status,
                "reason": verdict.reason,
                "decisions": stats.decisions,
                "decisions_matched": stats.decisions_matched,
                "served_hit_ratio": stats.served_hit_ratio,
                "predicted_hit_ratio": stats.predicted_hit_ratio,
            },
            # The configuration file's live reloads; a refused one leaves the running settings.
            "config": {
                "reloads": self.reloads,
                "reload_errors": self.reload_errors,
                "last_error": self.last_reload_error,
                "policy": None if self.policy is None else self.policy.source,
            },
        }

    def publisher_views(self) -> list[PublisherView]:
        """Every endpoint's KV-event view per data-parallel rank; an exact view of an endpoint
        whose events stopped (``Scheduler.kv_events_stale``) is degraded, with that reason."""
        views = publisher_views(self.scheduler.endpoints(), self.ingest)
        stale = self.scheduler.kv_events_stale(self.clock())
        if not stale:
            return views
        return [
            replace(view, state="degraded", reason=stale[view.endpoint])
            if view.state == "exact" and view.endpoint in stale
            else view
            for view in views
        ]

    def kv_ingest_status(self) -> dict[str, Any]:
        """``/debug/kv-ingest`` on the metrics port."""
        return kv_ingest_document(self.scheduler.endpoints(), self.publisher_views())

    def _ingest_stats(self) -> dict[str, IngestStats]:
        if self.ingest is None:
            return {}
        return {name: subscriber.stats for name, subscriber in self.ingest.subscribers.items()}

    # --- discovery -------------------------------------------------------------------------

    async def apply_endpoints(self, endpoints: Sequence[Endpoint]) -> EndpointDiff:
        """One full endpoint set from discovery: update the Scheduler, then scraping and KV events.

        Subscriptions of departing endpoints stop before the Scheduler forgets them, so no
        late KV event can bring a departed endpoint's blocks back into the index.
        """
        wanted = {endpoint.name: endpoint for endpoint in endpoints}
        departing = [endpoint.name for endpoint in self.scheduler.endpoints() if endpoint.name not in wanted]
        for name in departing:
            if self.ingest is not None:
                await self.ingest.remove_endpoint(name, purge=True)
            await self.scraper.remove(name)
        diff = self.scheduler.set_endpoints(wanted.values(), self.clock())
        await self.scraper.set_targets(
            {name: endpoint.metrics_url for name, endpoint in wanted.items() if endpoint.metrics_url}
        )
        if self.ingest is not None:
            for name, endpoint in wanted.items():
                if endpoint.kv_events is None:
                    await self.ingest.remove_endpoint(name, purge=True)
                    continue
                await self.ingest.add_endpoint(
                    SubscriberConfig(
                        name=name,
                        endpoint=endpoint.kv_events,
                        replay_endpoint=endpoint.kv_replay,
                        topic=endpoint.kv_topic,
                        data_parallel_size=endpoint.data_parallel_size,
                        ingest=self.config.kv_events.ingest,
                    )
                )
        if diff.added and (self._tokenizer_task is None or self._tokenizer_task.done()):
            # Settle the tokenizer and probe it against the pool, off the routing path.
            self._tokenizer_task = asyncio.create_task(self._check_tokenizer(), name="tokenizer probe")
        if diff.added or diff.removed:
            log.info(
                "endpoints: %d (+%d: %s; -%d: %s)",
                len(wanted),
                len(diff.added),
                ", ".join(e.name for e in diff.added[:10]),
                len(diff.removed),
                ", ".join(e.name for e in diff.removed[:10]),
            )
        return diff

    async def _follow(self, updates: AsyncIterator[list[Endpoint]]) -> None:
        async for endpoints in updates:
            try:
                await self.apply_endpoints(endpoints)
            except Exception:  # one bad set must not end discovery; the previous set stays
                log.exception("applying a discovered endpoint set of %d failed", len(endpoints))
            self._first_set.set()
        log.warning("endpoint discovery ended; the last endpoint set stays in use")

    async def _check_tokenizer(self) -> None:
        try:
            await self.tokenizers.on_endpoints()
        except Exception:  # a probe must never take the picker down
            log.exception("checking the tokenizer against the pool failed")

    # --- SchedulingPolicy -----------------------------------------------------------------

    def _policy_scheduler_config(
        self, base: SchedulerConfig, policy: PolicySettings | None
    ) -> SchedulerConfig:
        """``base`` (the file's settings, on the running index) with ``policy`` laid over it."""
        base = base.model_copy(update={"index": self.scheduler.config.index})
        return base if policy is None else policy.scheduler_config(base)

    def _endpoint_defaults(self, config: ServeConfig, policy: PolicySettings | None) -> EndpointDefaults:
        defaults = config.endpoint_defaults()
        return defaults if policy is None else policy.endpoint_defaults(defaults)

    async def apply_policy(self, settings: PolicySettings | None) -> None:
        """Apply a SchedulingPolicy's settings (None: back to the file's), all or, raising
        PolicyError, none: scheduler settings in one swap, then KV-event defaults and the
        scrape period."""
        async with self._reload_lock:
            scheduler_config = self._policy_scheduler_config(self.config.scheduler, settings)
            self.policy = settings
            if scheduler_config != self.scheduler.config:
                self.scheduler.reload(scheduler_config)
                self._follow_predictor()
            self._apply_process_settings()
            await self._set_scrape_interval(
                self.config.scrape_interval_s
                if settings is None or settings.scrape_interval_s is None
                else settings.scrape_interval_s
            )

    def _apply_process_settings(self) -> None:
        if self.kubernetes is not None:
            self.kubernetes.source.set_defaults(self._endpoint_defaults(self.config, self.policy))

    async def _set_scrape_interval(self, interval_s: float) -> None:
        """Restart the scrape loops at a new period (each loop fixes its ticks when it starts)."""
        if interval_s == self.scraper.base_interval_s:
            return
        self.scraper.set_interval(interval_s)
        targets = {e.name: e.metrics_url for e in self.scheduler.endpoints() if e.metrics_url}
        await self.scraper.set_targets({})
        await self.scraper.set_targets(targets)
        log.info("scrape interval now %.3fs", interval_s)

    # --- configuration reload --------------------------------------------------------------

    async def reload(self, new: ServeConfig | None = None) -> list[str]:
        """Apply a changed configuration while serving; returns the fields that need a restart.

        Live: scheduler scoring/health/approximate/policy settings (an atomic swap in the
        Scheduler), the static endpoint list and KV-event defaults (applied like a discovery
        update), audit_log and log_level. Everything else (ports, TLS, scrape settings, index
        layout, ...) is reported and keeps its running value until the process restarts.
        """
        async with self._reload_lock:
            if new is None:
                if self.config_loader is None:
                    raise RuntimeError("no configuration loader to reload from")
                new = self.config_loader()
            old = self.config
            pending = [
                name
                for name in type(old).model_fields
                if name not in _LIVE_FIELDS and getattr(old, name) != getattr(new, name)
            ]
            if new.kv_events.enabled != old.kv_events.enabled:
                pending.append("kv_events.enabled")
            scheduler_config = new.scheduler
            if scheduler_config.index != old.scheduler.index:
                # The index layout (block size, hash mode, bounds) is fixed for the process.
                pending.append("scheduler.index")
                scheduler_config = scheduler_config.model_copy(update={"index": old.scheduler.index})
            try:
                effective = self._policy_scheduler_config(scheduler_config, self.policy)
            except PolicyError as exc:
                log.warning(
                    "SchedulingPolicy %s does not fit the reloaded file (%s); the file's settings apply",
                    self.policy.source if self.policy else "",
                    exc,
                )
                effective = scheduler_config
            if effective != self.scheduler.config:
                self.scheduler.reload(effective)
                self._follow_predictor()
            if new.audit_log != old.audit_log:
                logging.getLogger("kvsched.audit").setLevel(
                    logging.INFO if new.audit_log else logging.WARNING
                )
            if new.log_level is not None and new.log_level != old.log_level:
                logging.getLogger().setLevel(new.log_level)
            kv_events = new.kv_events
            if new.kv_events.enabled != old.kv_events.enabled:
                kv_events = new.kv_events.model_copy(update={"enabled": old.kv_events.enabled})
            self.config = old.model_copy(
                update={
                    "scheduler": scheduler_config,
                    "endpoints": new.endpoints,
                    "kv_events": kv_events,
                    "audit_log": new.audit_log,
                    "log_level": new.log_level,
                    "reload_interval_s": new.reload_interval_s,
                }
            )
            if isinstance(self.source, StaticEndpointSource):
                wanted = self.config.static_endpoints()
                if wanted != self.source.endpoints:
                    self.source.replace(wanted)
            self._apply_process_settings()
            if pending:
                log.warning("configuration reloaded; these changes need a restart: %s", ", ".join(pending))
            else:
                log.info("configuration reloaded")
            return pending

    async def _watch(self, path: Path) -> None:
        """Poll the file (a Kubernetes ConfigMap volume is updated by a symlink swap, which
        inotify on the file itself would miss) and reload when its content changes."""
        seen = self._watch_seen
        failed: bytes | None = None
        while self.config.reload_interval_s > 0:
            await asyncio.sleep(self.config.reload_interval_s)
            current = _read_bytes(path)
            if current is None or current in (seen, failed):
                continue
            try:
                await self.reload()
            except Exception as exc:  # a bad edit must not stop the running picker
                log.error("configuration %s not reloaded, the running one stays: %s", path, exc)
                self.reload_errors += 1
                self.last_reload_error = str(exc)
                failed = current
                continue
            self.reloads += 1
            seen, failed = current, None

    # --- lifecycle -------------------------------------------------------------------------

    def _metrics_refreshed(self) -> None:
        gate = self.server.flow_gate
        if gate is not None:
            gate.poke()

    def _follow_predictor(self) -> None:
        # New predictor settings replace the Scheduler's predictor: train that one from now on.
        self.trainer.predictor = self.scheduler.predictor

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        self.warmup = Warmup(self.config.warmup, self.clock())
        logging.getLogger("kvsched.audit").setLevel(
            logging.INFO if self.config.audit_log else logging.WARNING
        )
        await self.trainer.start()
        await self.scraper.start()
        if self.peer_sync is not None:
            await self.peer_sync.start()
            sync = self.config.peer_sync
            if sync.service is not None:
                namespace = sync.namespace or self.config.kubernetes_namespace(os.environ) or "default"
                self.peer_discovery = EndpointSlicePeers(
                    self.peer_sync,
                    KubeClient.connect(),
                    namespace=namespace,
                    service=sync.service,
                    port=sync.port,
                    refresh_s=sync.refresh_s,
                )
                self.peer_discovery.start()
        await self.server.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        if self.kubernetes is not None:
            self.kubernetes.start()
        self._updates = self.source.updates()
        self._discovery = asyncio.create_task(self._follow(self._updates), name="endpoint discovery")
        first = asyncio.ensure_future(self._first_set.wait())
        done, _ = await asyncio.wait(
            {first, self._discovery}, timeout=FIRST_SET_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if first not in done:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            if self._discovery in done:
                self._discovery.result()  # re-raise what ended discovery before its first set
            log.warning(
                "no endpoint set from discovery after %.0fs; serving without one", FIRST_SET_TIMEOUT_S
            )
        if self._watch_file is not None and self.config_loader is not None:
            self._watch_task = asyncio.create_task(self._watch(self._watch_file), name="config watch")
        self._ready_task = asyncio.create_task(self._until_ready(), name="readiness")
        log.info(
            "kvsched serving: ext_proc %s:%d (%s, %s transport), KV events received %s, health %s, "
            "metrics %s, %d endpoints",
            self.config.host,
            self.grpc_port,
            self.config.tls.mode,
            self.server.transport,
            "off"
            if self.ingest is None
            else (
                "on a native thread"
                if self.ingest.receive_mode == "native"
                else f"on the event loop ({self.ingest.receive_mode_reason})"
            ),
            self.health_port if self.health_port is not None else "off",
            self.metrics_port if self.metrics_port is not None else "off",
            len(self.scheduler.endpoints()),
        )

    async def _until_ready(self) -> None:
        """Report SERVING as soon as the replica is first ready (its view warm)."""
        while not self._ready():
            await asyncio.sleep(READY_POLL_S)
        await self.server.refresh_readiness()
        self._ready_event.set()

    async def until_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the replica first reports SERVING (a gateway started after this finds
        it healthy at its first health check). Raises TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self._ready_event.wait(), timeout_s)

    async def stop(self, grace: float | None = None) -> None:
        """Stop discovery, drain the ext_proc server for ``grace`` (default: the config's
        shutdown_grace_s), then stop scraping, KV events and the metrics server. Idempotent."""
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
            self._ready_task = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._discovery
            self._discovery = None
        if self._updates is not None:
            aclose = getattr(self._updates, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            self._updates = None
        if self.kubernetes is not None:
            await self.kubernetes.stop()
        if self._tokenizer_task is not None:
            self._tokenizer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tokenizer_task
            self._tokenizer_task = None
        await self.server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self.tracer is not None:
            # The batch exporter's last spans; the exporter's own timeout bounds the wait.
            await asyncio.to_thread(self.tracer.close)
        if self.peer_discovery is not None:
            await self.peer_discovery.stop()
        if self.peer_sync is not None:
            await self.peer_sync.stop()
        await self.tokenizers.close()
        await self.scraper.stop()
        await self.trainer.stop()
        if self.ingest is not None:
            await self.ingest.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()

    async def __aenter__(self) -> ServeApp:
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, stop: asyncio.Event, *, ready_file: str | Path | None = None) -> None:
        """Serve until ``stop`` is set; ``ready_file`` receives the bound ports as JSON once serving."""
        async with self:
            if ready_file is not None:
                write_ready_file(ready_file, self.ports)
            await stop.wait()
            log.info("stopping: draining ext_proc streams for up to %.1fs", self.config.shutdown_grace_s)
        log.info("stopped")


# ServeConfig fields a reload applies while serving (kv_events except ``enabled`` takes
# effect through the endpoints it derives).
_LIVE_FIELDS = frozenset(
    {"scheduler", "endpoints", "kv_events", "audit_log", "log_level", "reload_interval_s"}
)


def kubernetes_discovery(config: ServeConfig, app: ServeApp) -> KubernetesDiscovery:
    """The InferencePool source, and the policy and objective watchers ``config`` enables."""
    settings = config.discovery.kubernetes
    namespace = config.kubernetes_namespace(os.environ) or in_cluster_namespace()
    if namespace is None:
        raise ConfigError(
            "discovery.kubernetes.namespace is not set and cannot be inferred "
            "(no pool.namespace, $POD_NAMESPACE or service-account namespace)"
        )
    try:
        client = KubeClient.connect(
            api_server=settings.api_server,
            kubeconfig=settings.kubeconfig,
            context=settings.context,
            in_cluster=settings.in_cluster,
        )
    except Exception as exc:  # the kubernetes client's ConfigException, a missing file, ...
        raise ConfigError(f"discovery.kubernetes: no usable API server credentials: {exc}") from exc
    return KubernetesDiscovery(
        client,
        namespace,
        config.kubernetes_pools(),
        app._endpoint_defaults(config, None),
        pool_resource=POOL_RESOURCES[config.pool_api_version()],
        policy_target=app if settings.policies else None,
        set_objectives=app.scheduler.set_objectives if settings.objectives else None,
        objective_api_versions=settings.objective_api_versions,
        backoff=Backoff(initial_s=settings.backoff_initial_s, max_s=settings.backoff_max_s),
        watch_timeout_s=settings.watch_timeout_s,
    )


def tokenizer_service(config: ServeConfig, addresses: Callable[[], Sequence[str]]) -> TokenizerService:
    local = None
    description = ""
    piece_cache_bytes = int(config.tokenizer_cache_mib * 1024 * 1024)
    if config.tokenizer_mode in ("auto", "local"):
        if config.tokenizer_dir is not None:
            local = make_tokenizer(tokenizer_dir=config.tokenizer_dir, piece_cache_bytes=piece_cache_bytes)
            description = f"tokenizer_dir {config.tokenizer_dir}"
        elif config.tokenizer_json is not None:
            local = make_tokenizer(
                config.tokenizer_json, config.tokenizer_config, piece_cache_bytes=piece_cache_bytes
            )
            description = f"tokenizer_json {config.tokenizer_json}"
    return TokenizerService(
        config.tokenizer_mode,
        local,
        description,
        addresses,
        probe=config.tokenizer_probe,
        render_when_auto=config.kv_events.enabled,
        piece_cache_bytes=piece_cache_bytes,
    )


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_ready_file(path: str | Path, ports: dict[str, Any]) -> None:
    """Atomically (rename) so a reader never sees half a file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"ports": ports}) + "\n", encoding="utf-8")
    partial.replace(path)


async def serve_until_signalled(
    config: ServeConfig,
    *,
    ready_file: str | Path | None = None,
    config_loader: Callable[[], ServeConfig] | None = None,
    watch_file: str | Path | None = None,
    on_app: Callable[[ServeApp], None] | None = None,
) -> None:
    """``kvsched serve``: run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads.
    ``on_app`` sees the app before it starts (a benchmark's debug hook)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    app = ServeApp(config, config_loader=config_loader, watch_file=watch_file)
    if on_app is not None:
        on_app(app)
    installed: list[signal.Signals] = []
    reloads: set[asyncio.Task[list[str]]] = set()

    def on_stop(signum: signal.Signals) -> None:
        log.info("%s received", signum.name)
        stop.set()

    def on_reload() -> None:
        if config_loader is None:
            log.warning("SIGHUP ignored: no --config file to reload")
            return
        task = asyncio.ensure_future(app.reload())
        reloads.add(task)
        task.add_done_callback(_reload_done(reloads))

    handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
        (signal.SIGTERM, lambda: on_stop(signal.SIGTERM)),
        (signal.SIGINT, lambda: on_stop(signal.SIGINT)),
        (signal.SIGHUP, on_reload),
    ]
    for signum, handler in handlers:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, handler)
            installed.append(signum)
    try:
        await app.run(stop, ready_file=ready_file)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        for task in reloads:
            task.cancel()


def _reload_done(tasks: set[asyncio.Task[list[str]]]) -> Callable[[asyncio.Task[list[str]]], None]:
    def done(task: asyncio.Task[list[str]]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("configuration not reloaded, the running one stays: %s", task.exception())

    return done
