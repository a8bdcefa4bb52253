"""The /metrics page of a vLLM 0.33 OpenAI API server: its families, labels and buckets.

What a scraper of a real pod reads, family for family, so that kvsched's scrape cost is
measured against a page of the real size and shape (40-60 KB for one engine) rather than
the handful of gauges it uses. Sources, vLLM 0.33:

* ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``): per engine (labels
  ``model_name``, ``engine``) the scheduler gauges, ``vllm:engine_sleep_state``, the cache,
  token and request counters (``vllm:prompt_tokens_by_source`` by ``source``,
  ``vllm:request_success`` by ``finished_reason``), fifteen histograms with the bucket
  bounds given here (the token-count ones ``build_1_2_5_buckets(max_model_len)``),
  ``vllm:lora_requests_info`` when LoRA is on (labels ``max_lora``,
  ``waiting_lora_adapters``, ``running_lora_adapters``; value: the time it was last set; a
  new series for every adapter combination seen, none ever removed) and
  ``vllm:cache_config_info`` (every ``CacheConfig`` field as a label).
* ``vllm/entrypoints/serve/instrumentator/metrics.py``: prometheus-fastapi-instrumentator's
  default metrics on the same registry (``http_requests_total``, request and response size
  summaries, a 21-bucket latency histogram and a per-handler one), for every handler but
  ``/metrics``, ``/health``, ``/load``, ``/ping``, ``/version``, ``/server_info``.
* ``vllm/v1/metrics/prometheus.py``: with one API server the page is prometheus_client's
  global registry, so the process, platform and GC collectors are on it too, and every
  counter, summary and histogram carries its ``_created`` sample.

Not modelled: speculative decoding, KV-connector and KV-residency families (present only
when those features are configured). Histograms the simulated engine does not track are
exposed with no observations unless the caller fills them (``EngineFigures.histograms``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from scheduler.sim.engine import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Histogram
from scheduler.sim.worker_metrics import le_label

ENGINE_LABELS = ("model_name", "engine")
FINISHED_REASONS = ("stop", "length", "abort", "error")  # vllm/v1/engine FinishReason
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
# prometheus-fastapi-instrumentator's defaults (metrics.default()).
HTTP_HIGHR_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10, 30, 60,
)  # fmt: skip
HTTP_LOWR_BUCKETS = (0.1, 0.5, 1)
# Handlers vLLM's instrumentator leaves out (instrumentator/metrics.py).
HTTP_EXCLUDED = frozenset(
    {"/metrics", "/health", "/health/decode", "/load", "/ping", "/version", "/server_info"}
)

COUNTERS = (
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    (
        "vllm:external_prefix_cache_queries",
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of "
        "number of queried tokens.",
    ),
    (
        "vllm:external_prefix_cache_hits",
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
        "number of cached tokens.",
    ),
    ("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items."),
    ("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."),
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."),
    ("vllm:prompt_tokens_recomputed", "Number of cached tokens recomputed for forward pass."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's ``build_1_2_5_buckets``)."""
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


def histogram_families(max_model_len: int) -> tuple[tuple[str, str, tuple[float, ...]], ...]:
    """(name, help, bucket bounds) of every per-engine histogram, in vLLM's order."""
    tokens = tuple(float(b) for b in build_1_2_5_buckets(max_model_len))
    latency = tuple(float(b) for b in E2E_BUCKETS)
    return (
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens),
        ("vllm:request_generation_tokens", "Number of generation tokens processed.", tokens),
        (
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            tuple(float(b) for b in ITERATION_TOKEN_BUCKETS),
        ),
        (
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tokens,
        ),
        (
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            tuple(float(b) for b in PARAMS_N_BUCKETS),
        ),
        ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens),
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        ),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", latency),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            latency,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            latency,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            latency,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            latency,
        ),
        (
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            tokens,
        ),
    )


@dataclass(frozen=True, slots=True)
class PageShape:
    """What a pod's configuration puts on its page."""

    model: str
    max_model_len: int
    block_size: int
    num_gpu_blocks: int
    max_loras: int = 0  # 0: LoRA off, no vllm:lora_requests_info
    created: float = field(default_factory=time.time)


@dataclass(slots=True)
class EngineFigures:
    """One engine's numbers (one data-parallel rank: the ``engine`` label)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    counters: Mapping[str, float] = field(default_factory=dict)  # family name -> value
    prompt_tokens_by_source: Mapping[str, float] = field(default_factory=dict)
    finished: Mapping[str, float] = field(default_factory=dict)  # finished_reason -> count
    histograms: Mapping[str, Histogram] = field(default_factory=dict)  # family name -> state
    awake: bool = True


@dataclass(frozen=True, slots=True)
class LoraSeries:
    """One adapter combination vllm:lora_requests_info has seen, and when it was last set."""

    running: str
    waiting: str
    at: float


@dataclass(slots=True)
class HttpFigures:
    """prometheus-fastapi-instrumentator's numbers, per handler (status grouped as ``2xx``)."""

    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (handler, method, status)
    request_bytes: dict[str, tuple[int, float]] = field(default_factory=dict)  # handler -> (count, sum)
    response_bytes: dict[str, tuple[int, float]] = field(default_factory=dict)
    duration: Histogram = field(default_factory=lambda: Histogram(HTTP_HIGHR_BUCKETS))
    duration_by_handler: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (method, handler)

    def observe(
        self, handler: str, method: str, status: int, request_bytes: int, response_bytes: int, seconds: float
    ) -> None:
        if handler in HTTP_EXCLUDED:
            return
        key = (handler, method, f"{status // 100}xx")
        self.requests[key] = self.requests.get(key, 0) + 1
        count, total = self.request_bytes.get(handler, (0, 0.0))
        self.request_bytes[handler] = (count + 1, total + request_bytes)
        count, total = self.response_bytes.get(handler, (0, 0.0))
        self.response_bytes[handler] = (count + 1, total + response_bytes)
        self.duration.observe(seconds)
        lowr = self.duration_by_handler.get((method, handler))
        if lowr is None:
            lowr = self.duration_by_handler[(method, handler)] = Histogram(HTTP_LOWR_BUCKETS)
        lowr.observe(seconds)


def _buckets(state: Histogram | None, bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    if state is None:
        return [(le_label(b), 0.0) for b in (*bounds, math.inf)], 0.0
    return [(le_label(b), float(n)) for b, n in state.cumulative()], state.sum


def _created(family: Metric, labels: Mapping[str, str], at: float) -> None:
    family.add_sample(family.name + "_created", dict(labels), at)


def _engine_families(shape: PageShape, engines: Sequence[EngineFigures]) -> Iterator[Metric]:
    values = [[shape.model, str(i)] for i in range(len(engines))]
    labels = [dict(zip(ENGINE_LABELS, v, strict=True)) for v in values]

    def gauge(name: str, doc: str, pick: list[float]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=ENGINE_LABELS)
        for v, x in zip(values, pick, strict=True):
            family.add_metric(v, x)
        return family

    yield gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [e.running for e in engines],
    )
    yield gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [e.waiting for e in engines],
    )
    sleep = GaugeMetricFamily(
        "vllm:engine_sleep_state",
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
        "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
        labels=(*ENGINE_LABELS, "sleep_state"),
    )
    for state in SLEEP_STATES:
        for v, e in zip(values, engines, strict=True):
            sleep.add_metric([*v, state], float(e.awake if state == "awake" else 0))
    yield sleep
    yield gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        [e.kv_usage for e in engines],
    )
    for name, doc in COUNTERS:
        family = CounterMetricFamily(name, doc, labels=ENGINE_LABELS)
        for v, e in zip(values, engines, strict=True):
            family.add_metric(v, float(e.counters.get(name, 0.0)), created=shape.created)
        yield family
        if name == "vllm:prompt_tokens":
            by_source = CounterMetricFamily(
                "vllm:prompt_tokens_by_source",
                "Number of prompt tokens by source.",
                labels=(*ENGINE_LABELS, "source"),
            )
            for source in PROMPT_TOKEN_SOURCES:
                for v, e in zip(values, engines, strict=True):
                    value = float(e.prompt_tokens_by_source.get(source, 0.0))
                    by_source.add_metric([*v, source], value, created=shape.created)
            yield by_source
    success = CounterMetricFamily(
        "vllm:request_success",
        "Count of successfully processed requests.",
        labels=(*ENGINE_LABELS, "finished_reason"),
    )
    for reason in FINISHED_REASONS:
        for v, e in zip(values, engines, strict=True):
            success.add_metric([*v, reason], float(e.finished.get(reason, 0.0)), created=shape.created)
    yield success
    for name, doc, bounds in histogram_families(shape.max_model_len):
        histogram = HistogramMetricFamily(name, doc, labels=ENGINE_LABELS)
        for v, label, e in zip(values, labels, engines, strict=True):
            buckets, total = _buckets(e.histograms.get(name), bounds)
            histogram.add_metric(v, buckets, total)
            _created(histogram, label, shape.created)
        yield histogram


def _cache_info(shape: PageShape, engines: int) -> Metric:
    # CacheConfig.metrics_info(): every field as str(value), plus the engine.
    info = {
        "block_size": str(shape.block_size),
        "cache_dtype": "auto",
        "calculate_kv_scales": "False",
        "cpu_kvcache_space_bytes": "None",
        "cpu_offload_gb": "0",
        "enable_prefix_caching": "True",
        "gpu_memory_utilization": "0.9",
        "is_attention_free": "False",
        "kv_cache_memory_bytes": "None",
        "kv_offloading_backend": "None",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "auto",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(shape.num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256",
        "sliding_window": "None",
        "swap_space": "4",
    }
    family = GaugeMetricFamily(
        "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=[*info, "engine"]
    )
    for engine in range(engines):
        family.add_metric([*info.values(), str(engine)], 1.0)
    return family


def _lora(shape: PageShape, series: Sequence[LoraSeries]) -> Iterator[Metric]:
    if shape.max_loras <= 0:
        return
    family = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        labels=("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
    )
    for item in series:
        family.add_metric([str(shape.max_loras), item.waiting, item.running], item.at)
    yield family


def _http(http: HttpFigures, created: float) -> Iterator[Metric]:
    total = CounterMetricFamily(
        "http_requests_total",
        "Total number of requests by method, status and handler.",
        labels=("method", "status", "handler"),
    )
    for (handler, method, status), count in sorted(http.requests.items()):
        total.add_metric([method, status, handler], float(count), created=created)
    yield total
    for name, doc, sizes in (
        (
            "http_request_size_bytes",
            "Content length of incoming requests by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ",
            http.request_bytes,
        ),
        (
            "http_response_size_bytes",
            "Content length of outgoing responses by handler. Only value of header is respected. "
            "Otherwise ignored. No percentile calculated. ",
            http.response_bytes,
        ),
    ):
        summary = SummaryMetricFamily(name, doc, labels=("handler",))
        for handler, (count, size) in sorted(sizes.items()):
            summary.add_metric([handler], count, size)
            _created(summary, {"handler": handler}, created)
        yield summary
    highr = HistogramMetricFamily(
        "http_request_duration_highr_seconds",
        "Latency with many buckets but no API specific labels. "
        "Made for more accurate percentile calculations. ",
    )
    buckets, seconds = _buckets(http.duration, HTTP_HIGHR_BUCKETS)
    highr.add_metric([], buckets, seconds)
    _created(highr, {}, created)
    yield highr
    lowr = HistogramMetricFamily(
        "http_request_duration_seconds",
        "Latency with only few buckets by handler. "
        "Made to be only used if aggregation by handler is important. ",
        labels=("method", "handler"),
    )
    for (method, handler), state in sorted(http.duration_by_handler.items()):
        buckets, seconds = _buckets(state, HTTP_LOWR_BUCKETS)
        lowr.add_metric([method, handler], buckets, seconds)
        _created(lowr, {"method": method, "handler": handler}, created)
    yield lowr


def vllm_families(
    shape: PageShape,
    engines: Sequence[EngineFigures],
    *,
    http: HttpFigures | None = None,
    lora: Sequence[LoraSeries] = (),
) -> Iterator[Metric]:
    """Every vLLM family of the page, in the order vLLM registers them."""
    yield from _engine_families(shape, engines)
    yield from _lora(shape, lora)
    yield _cache_info(shape, len(engines))
    if http is not None:
        yield from _http(http, shape.created)


def busy_page(
    *,
    model: str = "meta-llama/Llama-3.1-8B-Instruct",
    engines: int = 1,
    waiting: float = 3.0,
    running: float = 24.0,
    kv_usage: float = 0.42,
    lora_series: int = 8,
    seed: int = 0,
) -> bytes:
    """A page as a pod that has served a while writes it: every histogram filled, LoRA
    adapters seen, HTTP handlers used, the process collectors present (131,072-token
    context, 27,000 blocks of 16). For benchmarks that need a realistic page, not a sim."""
    import random

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import Collector

    rng = random.Random(seed)
    shape = PageShape(model, 131_072, 16, 27_000, max_loras=4 if lora_series else 0, created=1.7e9)
    figures = []
    for _ in range(engines):
        histograms = {}
        for name, _doc, bounds in histogram_families(shape.max_model_len):
            state = Histogram(bounds)
            for _ in range(400):
                state.observe(rng.lognormvariate(math.log(max(bounds[len(bounds) // 3], 1e-3)), 1.0))
            histograms[name] = state
        counters = {name: float(rng.randrange(10**5, 10**9)) for name, _ in COUNTERS}
        figures.append(
            EngineFigures(
                running,
                waiting,
                kv_usage,
                counters,
                {s: float(rng.randrange(10**6, 10**9)) for s in PROMPT_TOKEN_SOURCES},
                {r: float(rng.randrange(0, 10**5)) for r in FINISHED_REASONS},
                histograms,
            )
        )
    http = HttpFigures()
    for _ in range(2000):
        handler = rng.choice(("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"))
        method = "GET" if handler == "/v1/models" else "POST"
        http.observe(
            handler, method, rng.choice((200, 200, 200, 400)), rng.randrange(100, 60_000), 900, rng.random()
        )
    adapters = [f"adapter-{i}" for i in range(8)]
    lora = [
        LoraSeries(
            ",".join(rng.sample(adapters, rng.randrange(0, 4))),
            ",".join(rng.sample(adapters, rng.randrange(0, 2))),
            1.7e9 + i,
        )
        for i in range(lora_series)
    ]

    class _Page(Collector):
        def collect(self) -> Iterator[Metric]:
            return vllm_families(shape, figures, http=http, lora=lora)

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_Page())
    return generate_latest(registry)
