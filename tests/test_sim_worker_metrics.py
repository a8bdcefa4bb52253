"""The simulated worker's /metrics page, written directly, against prometheus_client's own
``generate_latest`` over the same families built as metric family objects: byte for byte, in
an idle engine, a busy one (histograms, counters, LoRA adapters with awkward names), with
families omitted and with a model name that needs escaping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from scheduler.sim.engine import Engine, EngineConfig
from scheduler.sim.worker_metrics import (
    CACHE_CONFIG_INFO,
    COUNTERS,
    GAUGES,
    HISTOGRAMS,
    LORA_INFO,
    REQUEST_SUCCESS,
    WorkerMetricsPage,
    le_label,
)

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


class _Reference(Collector):
    """The page's families as prometheus_client objects (how the page used to be made)."""

    def __init__(self, engine: Engine, model: str, omitted: frozenset[str]) -> None:
        self.engine, self.model, self.omitted = engine, model, omitted

    def collect(self) -> Iterator[Metric]:
        return (m for m in self._families() if m.name not in self.omitted)

    def _families(self) -> Iterator[Metric]:
        engine, cfg, m = self.engine, self.engine.config, self.engine.metrics
        names, values = ["model_name", "engine"], [self.model, "0"]
        for (name, doc), value in zip(
            GAUGES, (engine.num_running, engine.num_waiting, engine.kv_cache_usage), strict=True
        ):
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, value)
            yield gauge
        if cfg.max_loras:
            lora = GaugeMetricFamily(
                *LORA_INFO, labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"]
            )
            lora.add_metric(
                [
                    ",".join(sorted(engine.running_loras)),
                    str(cfg.max_loras),
                    ",".join(sorted(engine.waiting_loras)),
                ],
                time.time(),
            )
            yield lora
        info = GaugeMetricFamily(
            *CACHE_CONFIG_INFO,
            labels=[
                "block_size",
                "num_gpu_blocks",
                "enable_prefix_caching",
                "prefix_caching_hash_algo",
                "engine",
            ],
        )
        info.add_metric([str(cfg.block_size), str(cfg.capacity_blocks), "True", cfg.hash_algo, "0"], 1.0)
        yield info
        counts = (m.prefix_cache_queries, m.prefix_cache_hits, m.prompt_tokens, m.generation_tokens)
        for (name, doc), count in zip(COUNTERS, counts, strict=True):
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, count)
            yield counter
        success = CounterMetricFamily(*REQUEST_SUCCESS, labels=[*names, "finished_reason"])
        success.add_metric([*values, "length"], m.requests_finished)
        yield success
        for (name, doc), state in zip(HISTOGRAMS, (m.ttft, m.itl, m.e2e), strict=True):
            histogram = HistogramMetricFamily(name, doc, labels=names)
            buckets = [(le_label(bound), float(count)) for bound, count in state.cumulative()]
            histogram.add_metric(values, buckets, state.sum)
            yield histogram


def _reference_page(engine: Engine, model: str, omitted: frozenset[str] = frozenset()) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reference(engine, model, omitted))
    return generate_latest(registry)


def _busy_engine(*, max_loras: int = 0, steps: int = 40) -> Engine:
    engine = Engine(EngineConfig(capacity_blocks=4096, max_loras=max_loras))
    now = 0.0
    for i in range(12):
        lora = None if not max_loras else ['a"quoted"', "back\\slash", "new\nline"][i % 3]
        prompt = [7] * 64 + [100 + i] * (16 * (1 + i % 5))
        engine.add_request(f"r{i}", prompt, max_tokens=3 + i % 4, now=now, lora=lora)
        now += 0.001
    for _ in range(steps):
        now = max(engine.step(now).end, now + 1e-4)
    return engine


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # The LoRA family's value is the time the page is written.
    monkeypatch.setattr(time, "time", lambda: 1_796_000_000.25)


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("state", ["idle", "busy", "lora"])
def test_the_page_is_prometheus_clients_byte_for_byte(state: str) -> None:
    if state == "idle":
        engine = Engine(EngineConfig())
    else:
        # With LoRA, mid-run: adapters running and waiting, named with quotes, a backslash
        # and a newline, which the label values must escape.
        engine = _busy_engine(max_loras=2, steps=3) if state == "lora" else _busy_engine()
    if state == "busy":
        assert engine.metrics.requests_finished > 0 and engine.metrics.ttft.count > 0
    if state == "lora":
        assert engine.running_loras and engine.waiting_loras and engine.metrics.ttft.count > 0
    page = WorkerMetricsPage(MODEL)
    written = page.render(engine)
    assert written == _reference_page(engine, MODEL)
    # Written twice (the cached label lines reused), the same.
    assert page.render(engine) == written
    families = {family.name for family in text_string_to_metric_families(written.decode())}
    assert "vllm:num_requests_running" in families and "vllm:time_to_first_token_seconds" in families
    assert ("vllm:lora_requests_info" in families) == (state == "lora")


@pytest.mark.usefixtures("frozen_clock")
def test_omitted_families_and_a_model_name_that_needs_escaping() -> None:
    engine = _busy_engine(max_loras=2)
    model = 'tenant "a"\\model\nv2'
    omitted = frozenset(
        {"vllm:num_requests_waiting", "vllm:prefix_cache_hits", "vllm:inter_token_latency_seconds"}
    )
    written = WorkerMetricsPage(model, omitted).render(engine)
    assert written == _reference_page(engine, model, omitted)
    text = written.decode()
    assert "vllm:num_requests_waiting" not in text and "vllm:prefix_cache_hits_total" not in text
    assert "vllm:inter_token_latency_seconds" not in text and "vllm:prefix_cache_queries_total" in text
