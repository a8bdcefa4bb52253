"""The simulated vLLM 0.33 /metrics page: the shape a real pod's page has, read by both parsers."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from scheduler.codec.prom import parse_endpoint_metrics, parse_endpoint_metrics_reference
from scheduler.sim.vllm_metrics import build_1_2_5_buckets, busy_page


def test_busy_page_has_a_real_pods_families_and_size() -> None:
    page = busy_page(waiting=3, running=24, kv_usage=0.42, lora_series=8)
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    # Tens of KB, as a vLLM 0.33 API server that has served a while writes it.
    assert 40_000 < len(page) < 100_000
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert families["vllm:e2e_request_latency_seconds"].type == "histogram"
    assert len(families["vllm:lora_requests_info"].samples) == 8
    assert {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} <= set(
        families["vllm:lora_requests_info"].samples[0].labels
    )
    assert families["vllm:cache_config_info"].samples[0].labels["num_gpu_blocks"] == "27000"
    assert "http_request_duration_highr_seconds" in families
    assert "process_cpu_seconds" in families


def test_busy_page_reads_the_same_through_both_parsers() -> None:
    page = busy_page(engines=2, waiting=3, running=24, kv_usage=0.42)
    metrics = parse_endpoint_metrics(page)
    assert metrics == parse_endpoint_metrics_reference(page)
    load = (metrics.waiting, metrics.running, metrics.kv_usage, metrics.block_size, metrics.num_gpu_blocks)
    assert load == (6, 48, 0.42, 16, 54_000)
    # The page's vllm:lora_requests_info: the newest series' adapters and slots.
    assert metrics.lora is not None and metrics.lora.max_lora == 4 and metrics.lora.running


def test_token_buckets_follow_vllms_1_2_5_series() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(131_072)[-1] == 100_000
