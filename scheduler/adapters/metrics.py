"""kvsched's own Prometheus metrics: a collector that reads the components at scrape time,
and the HTTP endpoint that serves the registry (GIE convention: port 9090, ``/metrics``).

Nothing is counted twice: the Scheduler, the prefix index, the KV-event ingest and the
scraper already keep their counters; ``KvschedCollector`` turns their current values into
metric families when Prometheus asks. The Endpoint Picker's per-outcome request counter and
decision-time histogram are registered on the same registry by the ext_proc server.

The page is rendered on the event loop that owns those components, so it never reads them
mid-update from another thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.adapters.peersync import TransportStats
from scheduler.adapters.predictor_trainer import TrainerStats
from scheduler.adapters.scraper import ScrapeStats
from scheduler.core.kvingest import DROP_REASONS, VIEW_STATES, IngestStats, PublisherView
from scheduler.core.prefixstats import MATCHED_BLOCK_BUCKETS
from scheduler.core.scheduler import Scheduler

log = logging.getLogger(__name__)

STATUS_PATH = "/debug/status"

# Help texts of the ingest counters; a field without one still gets a family.
_INGEST_HELP = {
    "batches_applied": "KV-event batches applied to the index.",
    "blocks_stored": "Blocks stored in the index from BlockStored events.",
    "blocks_removed": "Blocks removed from the index by BlockRemoved events.",
    "gaps": "Gaps in the publisher's sequence numbers (lost batches).",
    "replays_requested": "Replays asked of the publisher after a gap or a late join.",
    "replays_completed": "Replays that closed their gap.",
    "replays_failed": "Replays that could not close their gap (the endpoint was reset instead).",
    "replays_resumed": "Replays asked again from where their answer broke off (replies lost in transit).",
    "resets": "Times the endpoint's index entries were dropped to resynchronise.",
    "restarts": "Publisher restarts seen (the sequence went backwards).",
    "malformed_frames": "ZMQ messages that were not [topic, seq, payload].",
    "malformed_payloads": "Batches whose msgpack payload could not be decoded.",
    "bad_events": "Events inside otherwise good batches that could not be decoded.",
    "orphans": "Stored blocks whose parent block the endpoint never reported.",
}

# IngestStats fields ``dropped_<reason>``: one family with a reason label.
_DROPPED = "dropped_"


class ScrapeView(Protocol):
    def all_stats(self) -> dict[str, ScrapeStats]: ...


class KvschedCollector(Collector):
    """Endpoint, index, scrape and KV-ingest figures read from the live components."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        scraper: ScrapeView | None = None,
        ingest_stats: Callable[[], Mapping[str, IngestStats]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        trainer_stats: Callable[[], TrainerStats] | None = None,
        tokenizer_probe: Callable[[], str] | None = None,
        publisher_views: Callable[[], Sequence[PublisherView]] | None = None,
        sync_transport: Callable[[], TransportStats | None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.sync_transport = sync_transport
        # Every endpoint's KV-event view per data-parallel rank (kv_subscriber.publisher_views).
        self.publisher_views = publisher_views
        self.scraper = scraper
        self.ingest_stats = ingest_stats
        self.clock = clock
        self.trainer_stats = trainer_stats
        # The start-up probe's status ("match", "mismatch", "unknown", ...), when one runs.
        self.tokenizer_probe = tokenizer_probe

    def collect(self) -> Iterator[Metric]:
        yield from self._endpoints()
        yield from self._index()
        yield from self._prefix()
        yield from self._flow_control()
        yield from self._predictor()
        if self.scraper is not None:
            yield from self._scrapes(self.scraper.all_stats())
        if self.ingest_stats is not None:
            yield from self._ingest(self.ingest_stats())
        if self.publisher_views is not None:
            yield from self._views(self.publisher_views())
        if self.scheduler.config.sync.enabled:
            yield from self._sync(self.sync_transport() if self.sync_transport is not None else None)

    def _sync(self, transport: TransportStats | None) -> Iterator[Metric]:
        """The in-flight load shared with peer replicas (core/peerload.py)."""
        peers = self.scheduler.peer_load
        stats = peers.stats
        yield GaugeMetricFamily("kvsched_sync_peers", "Peer replicas heard from.", value=len(peers.peers()))
        yield GaugeMetricFamily(
            "kvsched_sync_peer_inflight", "Requests in flight that peers routed.", value=peers.entries()
        )
        yield CounterMetricFamily(
            "kvsched_sync_messages_received", "Sync messages applied from peers.", value=stats.received
        )
        yield CounterMetricFamily(
            "kvsched_sync_messages_lost",
            "Sync messages from peers never received (gaps in their sequence numbers).",
            value=stats.lost,
        )
        yield CounterMetricFamily(
            "kvsched_sync_lag_seconds",
            "Total time from a peer sending a message to its arrival here (divide by "
            "kvsched_sync_messages_received_total for the mean).",
            value=stats.lag_sum_s,
        )
        yield GaugeMetricFamily(
            "kvsched_sync_lag_last_seconds", "The last message's time in transit.", value=stats.last_lag_s
        )
        reclaimed = CounterMetricFamily(
            "kvsched_sync_phantom_reclaimed",
            "Peer entries dropped without their release, by how: expired, expired_prefill (the "
            "prefill part), snapshot, reconciled (a scrape), peer_timeout, restart.",
            labels=["how"],
        )
        for how in ("expired", "expired_prefill", "snapshot", "reconciled", "peer_timeout", "restart"):
            reclaimed.add_metric([how], stats.reclaimed.get(how, 0))
        yield reclaimed
        yield CounterMetricFamily(
            "kvsched_sync_agreement_samples",
            "Peers' sampled routings judged here (what this replica would have picked).",
            value=stats.agreement_samples,
        )
        yield CounterMetricFamily(
            "kvsched_sync_agreement_same",
            "Of those, routings this replica would have sent to the same endpoint.",
            value=stats.agreement_same,
        )
        yield GaugeMetricFamily(
            "kvsched_sync_agreement_ratio",
            "Sampled agreement rate with the peers so far (same / samples; 1 before any sample).",
            value=stats.agreement_same / stats.agreement_samples if stats.agreement_samples else 1.0,
        )
        if transport is not None:
            yield CounterMetricFamily(
                "kvsched_sync_sent_messages", "Sync messages published.", value=transport.sent_messages
            )
            yield CounterMetricFamily(
                "kvsched_sync_sent_bytes", "Bytes of sync messages published.", value=transport.sent_bytes
            )
            yield CounterMetricFamily(
                "kvsched_sync_received_bytes",
                "Bytes of sync messages received.",
                value=transport.received_bytes,
            )
            yield CounterMetricFamily(
                "kvsched_sync_malformed",
                "Sync frames that could not be decoded (skipped).",
                value=transport.malformed,
            )

    def _endpoints(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        now = self.clock()
        endpoints = scheduler.endpoints()
        yield GaugeMetricFamily("kvsched_endpoints", "Endpoints in the pool.", value=len(endpoints))
        families = {
            "healthy": GaugeMetricFamily(
                "kvsched_endpoint_healthy", "1 when the endpoint may be picked.", labels=["endpoint"]
            ),
            "waiting": GaugeMetricFamily(
                "kvsched_endpoint_waiting_requests",
                "Queued requests at the last scrape.",
                labels=["endpoint"],
            ),
            "running": GaugeMetricFamily(
                "kvsched_endpoint_running_requests",
                "Running requests at the last scrape.",
                labels=["endpoint"],
            ),
            "kv_usage": GaugeMetricFamily(
                "kvsched_endpoint_kv_cache_usage",
                "KV-cache usage (0-1) at the last scrape.",
                labels=["endpoint"],
            ),
            "age": GaugeMetricFamily(
                "kvsched_endpoint_metrics_age_seconds",
                "Age of the last good scrape (NaN: never scraped).",
                labels=["endpoint"],
            ),
            "inflight": GaugeMetricFamily(
                "kvsched_endpoint_inflight_requests",
                "Requests kvsched routed there that have not finished.",
                labels=["endpoint"],
            ),
            "prefill": GaugeMetricFamily(
                "kvsched_endpoint_inflight_prefill_tokens",
                "Prompt tokens kvsched routed there whose first token has not been seen.",
                labels=["endpoint"],
            ),
            "blocks": GaugeMetricFamily(
                "kvsched_endpoint_index_blocks",
                "Blocks the prefix index holds for the endpoint (all data-parallel ranks).",
                labels=["endpoint"],
            ),
        }
        index = scheduler.index
        for endpoint in endpoints:
            state = scheduler.endpoint_state(endpoint.name, now)
            label = [endpoint.name]
            families["healthy"].add_metric(label, 1.0 if state.healthy else 0.0)
            families["waiting"].add_metric(label, state.waiting)
            families["running"].add_metric(label, state.running)
            families["kv_usage"].add_metric(label, state.kv_usage)
            age = state.metrics_age_s
            families["age"].add_metric(label, math.nan if age is None else age)
            families["inflight"].add_metric(label, state.inflight_requests)
            families["prefill"].add_metric(label, state.inflight_prefill_tokens)
            blocks = sum(index.worker_blocks(worker) for worker in endpoint.index_workers())
            families["blocks"].add_metric(label, blocks)
        yield from families.values()
        yield CounterMetricFamily(
            "kvsched_requests_completed",
            "Routed requests whose completion was reported.",
            value=scheduler.completions,
        )

    def _index(self) -> Iterator[Metric]:
        index = self.scheduler.index
        footprint = index.footprint()
        yield GaugeMetricFamily(
            "kvsched_index_blocks", "Blocks in the prefix index.", value=footprint["blocks"]
        )
        yield GaugeMetricFamily(
            "kvsched_index_bytes", "Memory held by the prefix index's block table.", value=footprint["bytes"]
        )
        yield GaugeMetricFamily(
            "kvsched_index_workers",
            "Workers (endpoints x data-parallel ranks) in the index.",
            value=footprint["workers"],
        )
        yield CounterMetricFamily(
            "kvsched_index_evictions",
            "Blocks evicted to keep the index within its bound.",
            value=index.evictions,
        )
        yield CounterMetricFamily(
            "kvsched_index_unknown_removals",
            "BlockRemoved events for blocks the index did not hold.",
            value=index.unknown_removals,
        )
        outcomes = CounterMetricFamily(
            "kvsched_speculative_placements",
            "Speculative placements (prompts routed to endpoints whose KV events had not reported them) "
            "by outcome: placed, then confirmed or contradicted by the endpoint's events, expired, or "
            "failed with their request.",
            labels=["outcome"],
        )
        for outcome, count in self.scheduler.speculative_outcomes.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield CounterMetricFamily(
            "kvsched_picks_failed_open",
            "Picks made among endpoints that all failed their scrapes (health.fail_open): no endpoint "
            "the request could go to was healthy.",
            value=self.scheduler.failed_open_picks,
        )
        yield CounterMetricFamily(
            "kvsched_scrape_timeouts_while_serving",
            "Scrapes that timed out on an endpoint seen serving within health.scrape_timeout_grace_s "
            "(first tokens, completions, KV events): its figures went stale, its health did not.",
            value=self.scheduler.scrape_timeouts_while_serving,
        )
        hot = self.scheduler.hot_prefixes
        yield CounterMetricFamily(
            "kvsched_hot_prefix_picks",
            "Picks whose prompt opened with a hot prefix (its requests per endpoint holding it above "
            "the pool's requests per endpoint), priced as cached on every endpoint by the load scorers.",
            value=hot.hot_requests,
        )
        yield GaugeMetricFamily(
            "kvsched_hot_prefix_counted",
            "Prefixes the hot-prefix table counts now (scoring.hot_prefix.max_entries bounds it).",
            value=len(hot),
        )
        yield GaugeMetricFamily(
            "kvsched_speculative_placements_live",
            "Speculative placements counted in picks now.",
            value=self.scheduler.speculative_placements,
        )

    def _prefix(self) -> Iterator[Metric]:
        """Predicted hits (every decision) against served hits (completions with usage)."""
        stats = self.scheduler.prefix_stats
        matched = HistogramMetricFamily(
            "kvsched_decision_matched_blocks",
            "Leading prompt blocks the index said the chosen endpoint holds, per decision (predicted hit).",
        )
        cumulative, buckets = 0, []
        for bound, count in zip(MATCHED_BLOCK_BUCKETS, stats.matched_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), float(cumulative)))
        matched.add_metric([], buckets, float(stats.matched_blocks))
        yield matched
        yield CounterMetricFamily(
            "kvsched_decisions_prefix_matched",
            "Decisions whose chosen endpoint held at least one leading block of the prompt.",
            value=stats.decisions_matched,
        )
        for name, help_text, value in (
            (
                "kvsched_prefix_prompt_tokens",
                "Prompt tokens of completed requests whose usage reported cached_tokens.",
                stats.prompt_tokens,
            ),
            (
                "kvsched_prefix_predicted_cached_tokens",
                "Of those, the tokens kvsched's index said the chosen endpoint held (predicted hits).",
                stats.predicted_cached_tokens,
            ),
            (
                "kvsched_prefix_served_cached_tokens",
                "Of those, the tokens the workers reported cached (usage cached_tokens).",
                stats.served_cached_tokens,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        for name, help_text, ratio in (
            (
                "kvsched_prefix_served_hit_ratio",
                "Worker-reported cached prompt tokens / prompt tokens, over completions with usage.",
                stats.served_hit_ratio,
            ),
            (
                "kvsched_prefix_predicted_hit_ratio",
                "kvsched's predicted cached prompt tokens / prompt tokens, over the same completions.",
                stats.predicted_hit_ratio,
            ),
        ):
            if ratio is not None:
                yield GaugeMetricFamily(name, help_text, value=ratio)
        mismatch = GaugeMetricFamily(
            "kvsched_tokenization_mismatch",
            "1 when kvsched's token ids cannot match the pool's KV blocks: the start-up probe through a "
            "worker's /tokenize disagreed ('probe'), or workers keep serving cached prefixes that "
            "kvsched's lookups never match ('served_hits').",
            labels=["check"],
        )
        mismatch.add_metric(["served_hits"], 1.0 if stats.verdict().status == "mismatch" else 0.0)
        if self.tokenizer_probe is not None:
            mismatch.add_metric(["probe"], 1.0 if self.tokenizer_probe() == "mismatch" else 0.0)
        yield mismatch

    def _predictor(self) -> Iterator[Metric]:
        stats = self.scheduler.predictor.stats
        running = GaugeMetricFamily(
            "kvsched_predictor_running_mape",
            "Running mean absolute percentage error (fraction) of the latency predictor, per target, "
            "over recent observations (each predicted before it was observed).",
            labels=["target"],
        )
        held_out = GaugeMetricFamily(
            "kvsched_predictor_holdout_mape",
            "Mean absolute percentage error (fraction) on held-out samples never trained on.",
            labels=["target"],
        )
        source = GaugeMetricFamily(
            "kvsched_predictor_source",
            "1 for what answers each target now: the trained model or the analytic prior.",
            labels=["target", "source"],
        )
        for target, running_value, held_value, answering in (
            ("ttft", stats.running_mape_ttft, stats.holdout_mape_ttft, stats.ttft_source),
            ("tpot", stats.running_mape_tpot, stats.holdout_mape_tpot, stats.tpot_source),
        ):
            if running_value is not None:
                running.add_metric([target], running_value)
            if held_value is not None:
                held_out.add_metric([target], held_value)
            for kind in ("model", "prior"):
                source.add_metric([target, kind], 1.0 if answering == kind else 0.0)
        yield from (running, held_out, source)
        yield GaugeMetricFamily(
            "kvsched_predictor_samples", "Latency samples held (training and held-out).", value=stats.samples
        )
        yield CounterMetricFamily(
            "kvsched_predictor_observations",
            "Completed requests offered to the predictor.",
            value=stats.observed,
        )
        yield GaugeMetricFamily(
            "kvsched_predictor_model_version",
            "Version of the installed model (0: none yet).",
            value=stats.model_version,
        )
        if self.trainer_stats is not None:
            trainer = self.trainer_stats()
            yield CounterMetricFamily(
                "kvsched_predictor_fits", "Background model fits finished.", value=trainer.fits
            )
            yield CounterMetricFamily(
                "kvsched_predictor_fit_failures", "Background model fits that failed.", value=trainer.failures
            )
            yield GaugeMetricFamily(
                "kvsched_predictor_last_fit_seconds",
                "Duration of the last model fit.",
                value=trainer.last_fit_s,
            )

    def _flow_control(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        stats = scheduler.flow.stats
        yield GaugeMetricFamily(
            "kvsched_pool_saturated",
            "1 while the pool is saturated (every healthy endpoint over a limit), else 0.",
            value=1.0 if scheduler.saturation.is_saturated else 0.0,
        )
        depth = GaugeMetricFamily(
            "kvsched_flow_queue_depth", "Requests waiting in flow control, by priority.", labels=["priority"]
        )
        for priority, count in sorted(stats.queue_depth.items()):
            depth.add_metric([str(priority)], count)
        yield depth
        outcomes = CounterMetricFamily(
            "kvsched_flow_requests",
            "Requests through flow control by outcome: admitted at once, queued, dispatched from "
            "the queue, cancelled by the client.",
            labels=["outcome"],
        )
        for outcome in ("admitted", "queued", "dispatched_from_queue", "cancelled"):
            outcomes.add_metric([outcome], getattr(stats, outcome))
        yield outcomes
        rejected = CounterMetricFamily(
            "kvsched_flow_rejected",
            "Requests flow control refused, by reason (shed, queue full, wait exceeded, shutdown).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "kvsched_flow_wait_seconds",
            "Total time requests dispatched from the queue spent waiting.",
            value=stats.dispatch_wait_s_sum,
        )

    @staticmethod
    def _scrapes(stats: Mapping[str, ScrapeStats]) -> Iterator[Metric]:
        scrapes = CounterMetricFamily("kvsched_scrapes", "Metric scrapes attempted.", labels=["endpoint"])
        failures = CounterMetricFamily(
            "kvsched_scrape_failures", "Metric scrapes that failed.", labels=["endpoint"]
        )
        streak = GaugeMetricFamily(
            "kvsched_scrape_consecutive_failures",
            "Failed scrapes since the last good one.",
            labels=["endpoint"],
        )
        duration = GaugeMetricFamily(
            "kvsched_scrape_duration_seconds", "Duration of the last scrape.", labels=["endpoint"]
        )
        for name, item in stats.items():
            scrapes.add_metric([name], item.scrapes)
            failures.add_metric([name], item.failures)
            streak.add_metric([name], item.consecutive_failures)
            duration.add_metric([name], item.last_duration_s)
        yield from (scrapes, failures, streak, duration)

    @staticmethod
    def _ingest(stats: Mapping[str, IngestStats]) -> Iterator[Metric]:
        families = {
            field.name: CounterMetricFamily(
                f"kvsched_kv_{field.name}",
                _INGEST_HELP.get(field.name, f"KV-event ingest: {field.name.replace('_', ' ')}."),
                labels=["endpoint"],
            )
            for field in dataclasses.fields(IngestStats)
            if not field.name.startswith(_DROPPED)
        }
        dropped = CounterMetricFamily(
            "kvsched_kv_dropped_batches",
            "Received KV-event messages dropped before ingest because the receive queue was at its "
            "byte bound: the publisher's (publisher_bytes) or the process's (total_bytes). Each is a "
            "sequence gap, replayed or reset like any lost batch.",
            labels=["endpoint", "reason"],
        )
        for name, item in stats.items():
            for field, family in families.items():
                family.add_metric([name], getattr(item, field))
            for reason in DROP_REASONS:
                dropped.add_metric([name, reason], getattr(item, _DROPPED + reason))
        yield from families.values()
        yield dropped

    @staticmethod
    def _views(views: Sequence[PublisherView]) -> Iterator[Metric]:
        labels = ["endpoint", "rank"]
        complete = GaugeMetricFamily(
            "kvsched_kv_view_complete",
            "1 while every KV event since the engine's cache was last empty has been applied for this "
            "publisher (endpoint, data-parallel rank); 0 after lost history or before the first batch.",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "kvsched_kv_view_state",
            "1 for the publisher's view state: exact (complete and current), degraded (a replay is "
            "catching up, or history was lost), fallback (no KV events: approximate mode).",
            labels=[*labels, "state"],
        )
        age = GaugeMetricFamily(
            "kvsched_kv_last_event_age_seconds",
            "Time since the publisher's last live batch arrived (NaN: none yet); an idle engine "
            "publishes nothing.",
            labels=labels,
        )
        replaying = GaugeMetricFamily(
            "kvsched_kv_replay_in_flight", "1 while a replay from the publisher runs.", labels=labels
        )
        buffered = GaugeMetricFamily(
            "kvsched_kv_buffered_batches",
            "Live batches held until the replay in flight ends.",
            labels=labels,
        )
        for view in views:
            label = [view.endpoint, str(view.rank)]
            for name in VIEW_STATES:
                state.add_metric([*label, name], 1.0 if view.state == name else 0.0)
            if view.state == "fallback":
                continue  # no publisher: nothing below applies
            complete.add_metric(label, 1.0 if view.view_complete else 0.0)
            age.add_metric(label, math.nan if view.last_event_age_s is None else view.last_event_age_s)
            replaying.add_metric(label, 1.0 if view.replay_in_flight else 0.0)
            buffered.add_metric(label, view.buffered)
        yield from (complete, state, age, replaying, buffered)


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """A registry of kvsched's own (not the global default one, which tests share)."""
    registry = CollectorRegistry()
    if process_metrics:
        from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class MetricsHTTPServer:
    """``GET /metrics`` for a registry on ``host:port`` (0 = ephemeral; read ``port`` after start),
    and ``GET /debug/status``: ``status()`` as JSON, the state a diagnosis reads (tokenizer,
    probe, predicted against served prefix hits)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "0.0.0.0",
        port: int = 9090,
        status: Callable[[], dict[str, Any]] | None = None,
        routes: Sequence[web.RouteDef] = (),
    ) -> None:
        self.registry = registry
        self.status = status
        # More diagnosis handlers on the same port (server/debug_http.py: /debug/lookup, ...).
        self.routes = list(routes)
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _handle(self, _: web.Request) -> web.Response:
        try:
            body = generate_latest(self.registry)
        except Exception:
            log.exception("rendering kvsched's metrics failed")
            return web.Response(status=500, text="metrics collection failed\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        if self.status is None:
            return web.json_response({}, status=404)
        try:
            document = self.status()
        except Exception:
            log.exception("building kvsched's status failed")
            return web.Response(status=500, text="status failed\n")
        return web.json_response(document)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get(STATUS_PATH, self._status)
        app.add_routes(self.routes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("kvsched metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
