"""The chart's Grafana dashboard: rendered by the Helm engine into the ConfigMap Grafana's
sidecar loads, and every PromQL expression of every panel reads only metrics kvsched exports.

The expressions are parsed by a real PromQL parser (the promql-parser crate's Python binding),
and the exported names come from a running ``kvsched serve`` (ServeApp in process, in front of
simulated vLLM workers), its /metrics page parsed by prometheus-client's own parser: no list of
metric names is kept by hand on either side.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_helm_chart import by_kind, render

from scheduler.demo.run import local_serve_config
from scheduler.server.app import ServeApp
from scheduler.sim.pool import PoolConfig, SimPool

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "kvsched" / "dashboards" / "kvsched.json"
# Grafana's interval variables stand for durations; PromQL needs one to parse the range.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Series names a family of each type exposes (the Prometheus text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in document["panels"] if p["type"] != "row"]


def expressions(document: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(document) for target in panel["targets"]]


def metric_names(expression: str) -> set[str]:
    """Every metric an expression selects, as a PromQL parser reads it."""
    for variable, duration in GRAFANA_INTERVALS.items():
        expression = expression.replace(variable, duration)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expression!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def exported_names(page: str) -> set[str]:
    """Series names on a Prometheus page: the samples' and those each family's type implies."""
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


@pytest.fixture
async def kvsched_metrics_page() -> AsyncIterator[str]:
    async with SimPool(2, PoolConfig(speed=50.0)) as pool:
        config = local_serve_config(
            pool,
            scrape_interval_s=0.02,
            shutdown_grace_s=0,
            # A replica of several (no peer here): its sync families are on the page.
            scheduler={"sync": {"enabled": True}},
            peer_sync={"port": 0},
        )
        async with ServeApp(config) as app:
            deadline = time.monotonic() + 15
            scheduler = app.scheduler
            while not all(
                scheduler.endpoint_state(e.name, time.monotonic()).metrics_age_s is not None
                for e in scheduler.endpoints()
            ):
                assert time.monotonic() < deadline, "endpoints never scraped"
                await asyncio.sleep(0.01)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{app.metrics_port}/metrics") as response,
            ):
                assert response.status == 200
                yield await response.text()


def test_every_panel_expression_parses_and_names_metrics() -> None:
    document = dashboard()
    assert expressions(document)
    for expression in expressions(document):
        assert metric_names(expression), expression


def test_the_name_extraction_sees_through_functions_and_ranges() -> None:
    names = metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="1"}[$__rate_interval])))'
        " / on() b or vector(0)"
    )
    assert names == {"a_bucket", "b"}


async def test_every_metric_a_panel_queries_is_one_kvsched_exports(kvsched_metrics_page: str) -> None:
    exported = exported_names(kvsched_metrics_page)
    assert "kvsched_picker_decision_seconds_bucket" in exported  # the page is kvsched's
    queried = {name for expression in expressions(dashboard()) for name in metric_names(expression)}
    assert queried <= exported, f"not exported by kvsched: {sorted(queried - exported)}"
    # Everything the dashboard is for has a panel reading it.
    for family in (
        "kvsched_picker_requests_total",  # decisions/s
        "kvsched_picker_decision_seconds_bucket",  # decision latency
        "kvsched_prefix_predicted_cached_tokens_total",  # cache hits predicted ...
        "kvsched_prefix_served_cached_tokens_total",  # ... against served
        "kvsched_predictor_running_mape",  # TTFT predicted against observed
        "kvsched_endpoint_inflight_requests",  # per-endpoint load
        "kvsched_flow_rejected_total",  # shed
        "kvsched_flow_requests_total",  # queued
        "kvsched_kv_blocks_stored_total",  # KV-event ingest rate
        "kvsched_kv_gaps_total",  # gaps
        "kvsched_endpoint_metrics_age_seconds",  # lag
        "kvsched_kv_dropped_batches_total",  # the receive queue's byte bound
        "kvsched_sync_lag_seconds_total",  # replicas: sync lag
        "kvsched_sync_messages_lost_total",  # ... losses
        "kvsched_sync_agreement_ratio",  # ... agreement
        "kvsched_sync_phantom_reclaimed_total",  # ... phantom load reclaimed
    ):
        assert family in queried, family


def test_panels_are_well_formed() -> None:
    document = dashboard()
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in document["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    for panel in panels(document):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for expression in (t["expr"] for t in panel["targets"]):
            # Every selector is narrowed to the chosen namespace and replica.
            selectors = re.findall(r"kvsched_\w+\{([^}]*)\}", expression)
            assert selectors and all('namespace=~"$namespace"' in s for s in selectors), expression


def test_the_chart_ships_the_dashboard_only_when_asked() -> None:
    assert not [d for d in by_kind(render({}), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    docs = render({"grafanaDashboard": {"enabled": True}})
    (configmap,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "llm"
    assert json.loads(configmap["data"]["kvsched.json"]) == dashboard()


def test_the_sidecars_label_folder_and_namespace_are_values() -> None:
    values = {
        "grafanaDashboard": {
            "enabled": True,
            "labels": {"grafana_dashboard": "kvsched"},
            "annotations": {"grafana_folder": "Inference"},
            "namespace": "monitoring",
        }
    }
    (configmap,) = [
        d for d in by_kind(render(values), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    ]
    metadata = configmap["metadata"]
    assert metadata["labels"]["grafana_dashboard"] == "kvsched"
    assert metadata["annotations"] == {"grafana_folder": "Inference"}
    assert metadata["namespace"] == "monitoring"
