"""Prometheus page -> EndpointMetrics: the focused parser against prometheus_client's parser.

Pages are written by prometheus_client's own exposition writer (``generate_latest``), so
both parsers read what a real vLLM/SGLang /metrics endpoint sends.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.codec.prom import (
    MetricNames,
    MetricsSpec,
    PromMetricsError,
    _sample_lines_twin,
    parse_endpoint_metrics,
    parse_endpoint_metrics_reference,
)
from scheduler.core.scheduler import EndpointMetrics

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def page(*families: Metric) -> str:
    registry = CollectorRegistry()
    registry.register(_Families(list(families)))
    return generate_latest(registry).decode()


def gauge(name: str, series: list[tuple[dict[str, str], float]]) -> GaugeMetricFamily:
    labels = sorted({key for labels, _ in series for key in labels})
    family = GaugeMetricFamily(name, f"{name} help", labels=labels)
    for values, value in series:
        family.add_metric([values.get(key, "") for key in labels], value)
    return family


def noise() -> list[Metric]:
    """Histograms a vLLM page carries and the scheduler never reads."""
    out: list[Metric] = []
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        family = HistogramMetricFamily(name, "latency", labels=["model_name", "engine"])
        family.add_metric([MODEL, "0"], [("0.1", 3.0), ("1.0", 7.0), ("+Inf", 9.0)], 4.5)
        out.append(family)
    return out


def vllm_page(
    waiting: float = 3,
    running: float = 5,
    usage: float = 0.25,
    *,
    engines: int = 1,
    usage_name: str = "vllm:kv_cache_usage_perc",
    model: str = MODEL,
) -> str:
    def per_engine(value: float) -> list[tuple[dict[str, str], float]]:
        return [({"model_name": model, "engine": str(e)}, value) for e in range(engines)]

    cache = {"block_size": "16", "num_gpu_blocks": "27000", "enable_prefix_caching": "True"}
    info = [({**cache, "engine": str(e)}, 1.0) for e in range(engines)]
    return page(
        gauge("vllm:num_requests_running", per_engine(running)),
        gauge("vllm:num_requests_waiting", per_engine(waiting)),
        gauge(usage_name, per_engine(usage)),
        gauge("vllm:cache_config_info", info),
        *noise(),
    )


def both(text: str, spec: MetricsSpec | None = None) -> EndpointMetrics:
    fast = parse_endpoint_metrics(text, spec)
    reference = parse_endpoint_metrics_reference(text, spec)
    assert fast == reference
    return fast


def test_vllm_page() -> None:
    assert both(vllm_page(3, 5, 0.25)) == EndpointMetrics(3, 5, 0.25, 16, 27000)


def test_older_vllm_cache_usage_name() -> None:
    assert both(vllm_page(usage=0.5, usage_name="vllm:gpu_cache_usage_perc")).kv_usage == 0.5


def test_data_parallel_engines_sum_counts_average_usage_and_sum_blocks() -> None:
    text = vllm_page(2, 4, 0.5, engines=3)
    assert both(text) == EndpointMetrics(6, 12, 0.5, 16, 81000)


def test_model_filter_picks_one_model() -> None:
    text = page(
        gauge("vllm:num_requests_waiting", [({"model_name": "a"}, 1), ({"model_name": "b"}, 10)]),
        gauge("vllm:num_requests_running", [({"model_name": "a"}, 2), ({"model_name": "b"}, 20)]),
        gauge("vllm:kv_cache_usage_perc", [({"model_name": "a"}, 0.1), ({"model_name": "b"}, 0.9)]),
    )
    assert both(text, MetricsSpec(model="b")) == EndpointMetrics(10, 20, 0.9)
    summed = both(text)
    assert (summed.waiting, summed.running, summed.kv_usage) == (11, 22, pytest.approx(0.5))
    with pytest.raises(PromMetricsError, match=r"model_name='c' \(seen: a, b\)"):
        parse_endpoint_metrics(text, MetricsSpec(model="c"))


def test_sglang_page_auto_and_explicit() -> None:
    labels = {"model_name": MODEL}
    text = page(
        gauge("sglang:num_queue_reqs", [(labels, 7)]),
        gauge("sglang:num_running_reqs", [(labels, 9)]),
        gauge("sglang:token_usage", [(labels, 0.75)]),
    )
    expected = EndpointMetrics(7, 9, 0.75)
    assert both(text) == expected
    assert both(text, MetricsSpec(engine="sglang")) == expected
    with pytest.raises(PromMetricsError, match="vllm:num_requests_waiting"):
        parse_endpoint_metrics(text, MetricsSpec(engine="vllm"))


def test_custom_metric_names() -> None:
    text = page(gauge("x_queue", [({}, 4)]), gauge("x_busy", [({}, 1)]), gauge("x_kv", [({}, 0.5)]))
    spec = MetricsSpec(names=MetricNames(waiting=("x_queue",), running=("x_busy",), kv_usage=("x_kv",)))
    assert both(text, spec) == EndpointMetrics(4, 1, 0.5)


def test_missing_metrics_are_named() -> None:
    text = page(gauge("vllm:num_requests_running", [({}, 1)]))
    for parse in (parse_endpoint_metrics, parse_endpoint_metrics_reference):
        with pytest.raises(PromMetricsError) as caught:
            parse(text, None)
        message = str(caught.value)
        assert "vllm:num_requests_waiting" in message
        assert "vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc" in message
        assert "vllm:num_requests_running" not in message


def test_page_without_model_server_metrics() -> None:
    with pytest.raises(PromMetricsError, match="no vllm: or sglang: metrics"):
        parse_endpoint_metrics("# nothing here\nprocess_cpu_seconds_total 1.0\n")


def test_longer_names_comments_and_label_values_do_not_match() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 100.0\n'
        'other_metric{note="\\nvllm:num_requests_waiting 50"} 1.0\n'
        'vllm:num_requests_waiting{model_name="m"} 2.0\n'
        "vllm:num_requests_running 1.0 1712345678000\n"
        "  vllm:kv_cache_usage_perc\t0.125\n"
    )
    assert parse_endpoint_metrics(text) == EndpointMetrics(2, 1, 0.125)


def test_escaped_label_values() -> None:
    tricky = 'a"b\\c}d,e\nf'
    text = page(
        gauge("vllm:num_requests_waiting", [({"model_name": tricky}, 4)]),
        gauge("vllm:num_requests_running", [({"model_name": tricky}, 1)]),
        gauge("vllm:kv_cache_usage_perc", [({"model_name": tricky}, 0.5)]),
    )
    assert both(text, MetricsSpec(model=tricky)) == EndpointMetrics(4, 1, 0.5)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-1", "abc"])
def test_unusable_values_fail(value: str) -> None:
    text = f"vllm:num_requests_waiting {value}\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
    with pytest.raises(PromMetricsError):
        parse_endpoint_metrics(text)


@pytest.mark.parametrize(
    "line",
    [
        'vllm:num_requests_waiting{model_name="m" 1',
        "vllm:num_requests_waiting{model_name=m} 1",
        "vllm:num_requests_waiting{} ",
        "vllm:num_requests_waiting",
    ],
)
def test_malformed_sample_lines_fail(line: str) -> None:
    text = f"{line}\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
    with pytest.raises(PromMetricsError):
        parse_endpoint_metrics(text)


def test_unreadable_cache_info_keeps_the_load_figures() -> None:
    text = page(
        gauge("vllm:num_requests_waiting", [({}, 1)]),
        gauge("vllm:num_requests_running", [({}, 1)]),
        gauge("vllm:kv_cache_usage_perc", [({}, 0.1)]),
        gauge("vllm:cache_config_info", [({"block_size": "sixteen", "num_gpu_blocks": "None"}, 1.0)]),
    )
    assert both(text) == EndpointMetrics(1, 1, 0.1, None, None)


label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    series=st.lists(
        st.tuples(
            label_text,
            st.integers(0, 10_000),
            st.integers(0, 10_000),
            st.floats(0, 1, allow_nan=False),
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda item: item[0],
    ),
    pick=st.booleans(),
)
def test_focused_parser_agrees_with_prometheus_client(
    series: list[tuple[str, int, int, float]], pick: bool
) -> None:
    def family(name: str, column: int) -> GaugeMetricFamily:
        return gauge(name, [({"model_name": item[0], "engine": "0"}, float(item[column])) for item in series])

    text = page(
        family("vllm:num_requests_waiting", 1),
        family("vllm:num_requests_running", 2),
        family("vllm:kv_cache_usage_perc", 3),
        *noise(),
    )
    spec = MetricsSpec(model=series[-1][0]) if pick else None
    result = both(text, spec)
    chosen = series[-1:] if pick else series
    assert result.waiting == sum(item[1] for item in chosen)
    assert math.isclose(result.kv_usage, sum(item[3] for item in chosen) / len(chosen), abs_tol=1e-12)


@pytest.mark.parametrize(
    "line",
    [
        'vllm:num_requests_waiting { model_name = "m" } 5',
        'vllm:num_requests_waiting{model_name="m",} 5',
        'vllm:num_requests_waiting{model_name="m"}5',
        "vllm:num_requests_waiting\t5",
        "vllm:num_requests_waiting  5  1712345678000",
        "vllm:num_requests_waiting 5\r",
    ],
)
def test_spacing_variants_the_text_format_allows(line: str) -> None:
    text = f"{line}\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"
    assert both(text) == EndpointMetrics(5, 1, 0.5)


# --- the line-scan kernel and its twin -----------------------------------------------------

_NAMES = (b"vllm:a", b"vllm:ab", b"vllm:num_requests_waiting", b"x")
_line_piece = st.sampled_from(
    [
        b"vllm:a",
        b"vllm:ab",
        b"vllm:num_requests_waiting",
        b"x",
        b"{",
        b"}",
        b" ",
        b"\t",
        b"\n",
        b"\r",
        b"#",
        b"1",
    ]
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_line_piece, max_size=40))
def test_line_scan_kernel_and_its_twin_find_the_same_lines(pieces: list[bytes]) -> None:
    native = pytest.importorskip("scheduler._native.promlines")
    page = b"".join(pieces)
    assert native.sample_lines(page, _NAMES) == _sample_lines_twin(page, _NAMES)
    assert native.sample_lines(bytearray(page), _NAMES) == _sample_lines_twin(bytearray(page), _NAMES)


def test_line_scan_finds_names_at_line_starts_only() -> None:
    page = b'vllm:a 1\n  vllm:a{x="vllm:a 2"} 3\n# HELP vllm:a\nvllm:ab 4\nvllm:a'
    expected = [[b"vllm:a 1", b'vllm:a{x="vllm:a 2"} 3'], [b"vllm:ab 4"], [], []]
    assert _sample_lines_twin(page, _NAMES) == expected
    native = pytest.importorskip("scheduler._native.promlines")
    assert native.sample_lines(page, _NAMES) == expected
