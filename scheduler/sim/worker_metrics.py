"""A simulated worker's ``/metrics`` page: vLLM's names for the engine's state, written
straight to Prometheus text (format 0.0.4), byte for byte as prometheus_client's
``generate_latest`` writes the same families (labels sorted, values through its
``floatToGoString``, a counter's HELP and TYPE under its ``_total`` name, a histogram's
buckets then ``_count`` then ``_sum``).

Why not ``generate_latest`` itself: the simulated pool runs its workers on one event loop,
and kvsched scrapes each of them ten times a second. Built from metric family objects, one
page took ~0.8 ms of that loop (name validation, label escaping and sample tuples on every
scrape), so eight workers' scrapes held it ~6% of the time on an idle machine and more under
load, delaying every worker's requests and engine steps: under ``kvsched demo`` the pool's
process spent 39% of its busy time there (py-spy). A real vLLM pod renders its page in the API
server process, beside and not in the way of its engine. Here everything that does not change
between scrapes (HELP and TYPE lines, label sets) is written once; a scrape formats values.

Families (shared PROTOCOLS.md §3; vLLM's ``vllm/v1/metrics/loggers.py``): the scheduler
gauges, ``vllm:lora_requests_info`` when LoRA is on, ``vllm:cache_config_info``, the prefix
cache and token counters, ``vllm:request_success`` and the TTFT, inter-token and e2e
histograms. A name in ``omitted`` (the family's name, a counter's without ``_total``) is
left off the page, as a misconfigured pod would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from prometheus_client.utils import floatToGoString

from scheduler.sim.engine import Engine, EngineConfig, Histogram

# prometheus_client's own value formatting (untyped there), so values read as its pages do.
_value = cast(Callable[[float], str], floatToGoString)

GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
LORA_INFO = ("vllm:lora_requests_info", "Running stats on lora requests.")
CACHE_CONFIG_INFO = ("vllm:cache_config_info", "Information of the LLMEngine CacheConfig")
COUNTERS = (
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens."),
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
)
REQUEST_SUCCESS = ("vllm:request_success", "Count of successfully processed requests.")
HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
)


def _escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_set(labels: Mapping[str, str]) -> str:
    """``{name="value",...}``, names sorted."""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(labels.items())) + "}"


def _header(name: str, doc: str, kind: str) -> str:
    help_text = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def le_label(bound: float) -> str:
    """A histogram bucket's ``le`` value."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class WorkerMetricsPage:
    """The page of one worker serving ``model``, less the ``omitted`` families."""

    def __init__(self, model: str, omitted: Iterable[str] = ()) -> None:
        self._model = model
        self._omitted = frozenset(omitted)
        engine = {"model_name": model, "engine": "0"}
        self._engine_labels = label_set(engine)
        self._success_labels = label_set({**engine, "finished_reason": "length"})
        # Per histogram name: each bucket's line start, and the _count and _sum line starts.
        self._histogram_lines: dict[str, tuple[tuple[float, ...], list[str], str, str]] = {}

    def _kept(self, name: str) -> bool:
        return name not in self._omitted

    def render(self, engine: Engine) -> bytes:
        out: list[str] = []
        write = out.append
        fmt = _value
        labels = self._engine_labels
        for (name, doc), value in zip(
            GAUGES, (engine.num_running, engine.num_waiting, engine.kv_cache_usage), strict=True
        ):
            if self._kept(name):
                write(f"{_header(name, doc, 'gauge')}{name}{labels} {fmt(value)}\n")
        cfg = engine.config
        if cfg.max_loras and self._kept(LORA_INFO[0]):
            # vLLM's form (vllm/v1/metrics/loggers.py): the adapters as comma-separated label
            # values, the value the time the set was current.
            lora = label_set(
                {
                    "running_lora_adapters": ",".join(sorted(engine.running_loras)),
                    "max_lora": str(cfg.max_loras),
                    "waiting_lora_adapters": ",".join(sorted(engine.waiting_loras)),
                }
            )
            write(f"{_header(*LORA_INFO, 'gauge')}{LORA_INFO[0]}{lora} {fmt(time.time())}\n")
        if self._kept(CACHE_CONFIG_INFO[0]):
            info = _cache_config_labels(cfg)
            write(f"{_header(*CACHE_CONFIG_INFO, 'gauge')}{CACHE_CONFIG_INFO[0]}{info} 1.0\n")
        m = engine.metrics
        counts = (m.prefix_cache_queries, m.prefix_cache_hits, m.prompt_tokens, m.generation_tokens)
        for (name, doc), count in zip(COUNTERS, counts, strict=True):
            if self._kept(name):
                total = f"{name}_total"
                write(f"{_header(total, doc, 'counter')}{total}{labels} {fmt(count)}\n")
        if self._kept(REQUEST_SUCCESS[0]):
            total = f"{REQUEST_SUCCESS[0]}_total"
            write(
                f"{_header(total, REQUEST_SUCCESS[1], 'counter')}{total}{self._success_labels} "
                f"{fmt(m.requests_finished)}\n"
            )
        for (name, doc), state in zip(HISTOGRAMS, (m.ttft, m.itl, m.e2e), strict=True):
            if self._kept(name):
                write(_header(name, doc, "histogram"))
                self._histogram(write, name, state)
        return "".join(out).encode("utf-8")

    def _histogram(self, write: Callable[[str], None], name: str, state: Histogram) -> None:
        lines = self._histogram_lines.get(name)
        if lines is None or lines[0] != state.bounds:
            buckets = [
                f"{name}_bucket{label_set({'model_name': self._model, 'engine': '0', 'le': le_label(b)})} "
                for b in (*state.bounds, math.inf)
            ]
            labels = self._engine_labels
            lines = (state.bounds, buckets, f"{name}_count{labels} ", f"{name}_sum{labels} ")
            self._histogram_lines[name] = lines
        _, buckets, count_line, sum_line = lines
        running = 0
        for start, n in zip(buckets, state.counts, strict=True):
            running += n
            write(f"{start}{_value(running)}\n")
        write(f"{count_line}{_value(running)}\n")
        write(f"{sum_line}{_value(state.sum)}\n")


def _cache_config_labels(cfg: EngineConfig) -> str:
    return label_set(
        {
            "block_size": str(cfg.block_size),
            "num_gpu_blocks": str(cfg.capacity_blocks),
            "enable_prefix_caching": "True",
            "prefix_caching_hash_algo": cfg.hash_algo,
            "engine": "0",
        }
    )
