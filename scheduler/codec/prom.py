"""Prometheus text exposition -> the few model-server numbers the Scheduler uses.

Metric names (GIE model-server protocol; shared PROTOCOLS.md §3):

* vLLM: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
  ``vllm:kv_cache_usage_perc`` (0-1; vLLM before v1 called it ``vllm:gpu_cache_usage_perc``),
  ``vllm:cache_config_info{block_size,num_gpu_blocks}`` (an info gauge: the labels are the data),
  ``vllm:lora_requests_info{running_lora_adapters,waiting_lora_adapters,max_lora}`` (see
  ``_lora_slots``);
* SGLang: ``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage`` (0-1).

A pod can expose several series of one metric: one per data-parallel engine (``engine="0"``,
``"1"``, ...) or, rarely, one per served model (``model_name``). With ``model`` set only that
model's series count; otherwise all do. Request counts are summed over the series, cache usage
(a fraction) is averaged, ``num_gpu_blocks`` summed.

Two parsers give identical answers on valid input: ``parse_endpoint_metrics`` reads only the
lines of the wanted metrics (``str.find`` in C over the text, a few short regexes per hit), and
``parse_endpoint_metrics_reference`` runs prometheus_client's full parser. A vLLM page is mostly
histograms the scheduler never reads: measured on one core, a 10 KB page takes 43 us focused vs
2.1 ms through prometheus_client, a 50 KB page 80 us vs 7.7 ms. At 100 endpoints scraped every
100 ms the reference parser alone would need 2-8 cores; it is kept for tests and cross-checks.

Text format grammar: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from scheduler.core.scheduler import EndpointMetrics
from scheduler.core.scoring import LoraSlots

EngineKind = Literal["vllm", "sglang", "auto"]


class PromMetricsError(ValueError):
    """The exposition lacks a required metric or carries an unusable value."""


@dataclass(frozen=True, slots=True)
class MetricNames:
    """Where each number comes from; the first name present wins (newest name first)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    cache_info: str | None = None  # info gauge with block_size / num_gpu_blocks labels
    lora_info: str | None = None  # info gauge with the LoRA adapters' labels


VLLM_NAMES = MetricNames(
    waiting=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    cache_info="vllm:cache_config_info",
    lora_info="vllm:lora_requests_info",
)
SGLANG_NAMES = MetricNames(
    waiting=("sglang:num_queue_reqs",),
    running=("sglang:num_running_reqs",),
    kv_usage=("sglang:token_usage",),
)
ENGINE_NAMES: Mapping[str, MetricNames] = {"vllm": VLLM_NAMES, "sglang": SGLANG_NAMES}


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    """How to read one endpoint's page."""

    engine: EngineKind = "auto"
    # Only series whose model_name label equals this; None = every series.
    model: str | None = None
    # Replaces the engine's built-in names when given (a model server with its own names).
    names: MetricNames | None = None
    model_label: str = "model_name"

    def resolve(self, page: Page) -> MetricNames:
        if self.names is not None:
            return self.names
        if self.engine != "auto":
            return ENGINE_NAMES[self.engine]
        # Searched in this order and only as far as needed: "sglang:" is on no vLLM page, so
        # looking for it costs a scan of the whole page (~30 us of 60 KB).
        for engine, mark in _ENGINE_MARKS:
            found = mark in page if isinstance(page, str) else mark.encode("ascii") in page
            if found:
                return ENGINE_NAMES[engine]
        raise PromMetricsError("no vllm: or sglang: metrics on the page (engine=auto)")

    def resolve_marks(self, marks: int) -> MetricNames:
        """``resolve`` for a page already searched elsewhere (the native scraper):
        ``marks`` is MARK_VLLM when "vllm:" is on the page, else MARK_SGLANG when "sglang:"
        is, else 0."""
        if self.names is not None:
            return self.names
        if self.engine != "auto":
            return ENGINE_NAMES[self.engine]
        if marks & MARK_VLLM:
            return VLLM_NAMES
        if marks & MARK_SGLANG:
            return SGLANG_NAMES
        raise PromMetricsError("no vllm: or sglang: metrics on the page (engine=auto)")

    @property
    def scanned_names(self) -> tuple[str, ...]:
        """Every name a page read with this spec may need, whatever engine it turns out to be."""
        if self.names is not None:
            return _wanted(self.names)
        if self.engine != "auto":
            return _wanted(ENGINE_NAMES[self.engine])
        return _wanted(VLLM_NAMES) + _wanted(SGLANG_NAMES)


_ENGINE_MARKS = (("vllm", "vllm:"), ("sglang", "sglang:"))
MARK_VLLM = 1
MARK_SGLANG = 2


# Label maps are shared through the line cache below: read only.
Labels = Mapping[str, str]
Sample = tuple[Labels, float]
Page = bytes | bytearray | str


# --- focused line parser -------------------------------------------------------------------

# Whole label block in one match (the text format: ``{name="value",...}``, an optional
# trailing comma, blanks around tokens), then the pairs out of it: two calls into the
# regex engine per line instead of two per label (vLLM's cache_config_info has 24 labels).
_PAIR = rb'[ \t]*[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"[ \t]*'
_LABEL_BLOCK = re.compile(rb"\{(?:" + _PAIR + rb",)*(?:" + _PAIR + rb")?[ \t]*\}")
_LABEL_PAIRS = re.compile(rb'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_VALUE = re.compile(rb"[ \t]*(\S+)(?:[ \t]+\S+)?[ \t]*\r?$")
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}
_BLANKS = (b" ", b"\t")


def _unescape(value: bytes) -> str:
    text = value.decode("utf-8")
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), "\\" + m.group(1)), text)


def _float(token: bytes, line: bytes) -> float:
    try:
        return float(token)
    except ValueError:
        raise PromMetricsError(f"bad sample value {token!r} in {line[:200]!r}") from None


@functools.lru_cache(maxsize=4096)
def _parse_line(line: bytes, name_len: int) -> Sample:
    """``name{a="x",...} value [timestamp]`` -> (labels, value); the name is already checked.

    Cached by the line's bytes: most lines of a page are the same from one scrape to the next
    (an idle pod's gauges, the info gauge of every pod of a pool), and a cache hit costs a
    hash of the line instead of the regexes. Pure, so the cache changes no answer."""
    pos = name_len
    while line[pos : pos + 1] in _BLANKS:
        pos += 1
    labels: Labels = {}
    if line.startswith(b"{", pos):
        block = _LABEL_BLOCK.match(line, pos)
        if block is None:
            raise PromMetricsError(f"malformed labels in {line[:200]!r}")
        try:
            labels = {
                key.decode("ascii"): _unescape(value)
                for key, value in _LABEL_PAIRS.findall(line, pos, block.end())
            }
        except UnicodeDecodeError as exc:
            raise PromMetricsError(f"label value is not UTF-8 in {line[:200]!r}: {exc}") from None
        pos = block.end()
    value = _VALUE.match(line, pos)
    if value is None:
        raise PromMetricsError(f"malformed sample line {line[:200]!r}")
    return labels, _float(value.group(1), line)


def _sample_lines(page: bytes | bytearray, name: bytes) -> Iterator[bytes]:
    """Lines whose metric name is exactly ``name`` (not comments, not longer names).

    ``find`` runs in C over the page; every occurrence is looked at, so a family split over
    two groups (which the text format forbids and prometheus_client accepts) is read whole."""
    n = len(name)
    start = 0
    while True:
        i = page.find(name, start)
        if i < 0:
            return
        start = i + n
        after = page[start : start + 1]
        if after not in (b"{", b" ", b"\t"):
            continue
        j = i - 1
        while j >= 0 and page[j] in (32, 9):  # blanks before the name
            j -= 1
        if j >= 0 and page[j] != 10:
            continue
        end = page.find(b"\n", start)
        if end < 0:
            end = len(page)
        yield bytes(page[i:end])
        start = end


def _sample_lines_twin(page: bytes | bytearray, names: tuple[bytes, ...]) -> list[list[bytes]]:
    """``kernels/promlines.pyx::sample_lines`` in Python: per name, its sample lines."""
    return [list(_sample_lines(page, name)) for name in names]


def _native_sample_lines() -> Callable[[bytes | bytearray, tuple[bytes, ...]], list[list[bytes]]] | None:
    try:
        module = importlib.import_module("scheduler._native.promlines")
    except ImportError:  # not built: the twin gives the same lines, ~5x slower
        return None
    return cast(Callable[[bytes | bytearray, tuple[bytes, ...]], list[list[bytes]]], module.sample_lines)


_NATIVE_SAMPLE_LINES = _native_sample_lines()


def _collect_focused(page: bytes | bytearray, wanted: Sequence[str]) -> dict[str, list[bytes]]:
    """Per wanted name found on the page, its sample lines."""
    names = _encoded(tuple(wanted))
    lines = (_NATIVE_SAMPLE_LINES or _sample_lines_twin)(page, names)
    return {name: group for name, group in zip(wanted, lines, strict=True) if group}


def _interpret_lines(
    lines: Mapping[str, list[bytes]], names: MetricNames, spec: MetricsSpec
) -> EndpointMetrics:
    """``interpret`` over sample lines. The info gauges (``cache_config_info``: 24 labels,
    ``lora_requests_info``: a series per adapter set, eight on the realistic page) are read
    once per distinct set of lines: they change when the engine is reconfigured or its
    adapters change, while the load gauges change with every request. Reading them was
    about half of the interpretation (7 of ~15 us for the LoRA series alone)."""
    # The info gauges' lines are read by _info_of_lines only (interpret takes its reading).
    skip = (names.cache_info, names.lora_info)
    found = {
        name: [_parse_line(line, len(name)) for line in group]
        for name, group in lines.items()
        if name not in skip
    }
    info = _info_of_lines(
        names,
        tuple(lines.get(names.cache_info, ())) if names.cache_info is not None else (),
        tuple(lines.get(names.lora_info, ())) if names.lora_info is not None else (),
    )
    return interpret(found, names, spec, info=info)


_Info = tuple[int | None, int | None, LoraSlots | None]


@functools.lru_cache(maxsize=4096)
def _info_of_lines(
    names: MetricNames, cache_lines: tuple[bytes, ...], lora_lines: tuple[bytes, ...]
) -> _Info:
    found: dict[str, list[Sample]] = {}
    if names.cache_info is not None and cache_lines:
        found[names.cache_info] = [_parse_line(line, len(names.cache_info)) for line in cache_lines]
    if names.lora_info is not None and lora_lines:
        found[names.lora_info] = [_parse_line(line, len(names.lora_info)) for line in lora_lines]
    return (*_cache_info(found, names), _lora_slots(found, names))


# --- prometheus_client parser --------------------------------------------------------------


def _collect_reference(text: str, wanted: Iterable[str]) -> dict[str, list[Sample]]:
    from prometheus_client.parser import text_string_to_metric_families

    names = set(wanted)
    found: dict[str, list[Sample]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in names:
                    found.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except ValueError as exc:
        raise PromMetricsError(f"unparseable exposition: {exc}") from None
    return found


# --- interpretation ------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _wanted(names: MetricNames) -> tuple[str, ...]:
    wanted = [*names.waiting, *names.running, *names.kv_usage]
    if names.cache_info is not None:
        wanted.append(names.cache_info)
    if names.lora_info is not None:
        wanted.append(names.lora_info)
    return tuple(wanted)


@functools.lru_cache(maxsize=64)
def _encoded(wanted: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(name.encode("ascii") for name in wanted)


def _select(
    found: Mapping[str, list[Sample]], candidates: tuple[str, ...], spec: MetricsSpec, missing: list[str]
) -> list[float]:
    for name in candidates:
        samples = found.get(name)
        if not samples:
            continue
        if spec.model is None:
            return [value for _, value in samples]
        chosen = [value for labels, value in samples if labels.get(spec.model_label) == spec.model]
        if chosen:
            return chosen
        seen = sorted({labels.get(spec.model_label, "") for labels, _ in samples})
        missing.append(f"{name} with {spec.model_label}={spec.model!r} (seen: {', '.join(seen)})")
        return []
    missing.append(" or ".join(candidates))
    return []


def _finite(name: str, values: list[float]) -> list[float]:
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise PromMetricsError(f"{name}: unusable value {value!r}")
    return values


def _cache_info(found: Mapping[str, list[Sample]], names: MetricNames) -> tuple[int | None, int | None]:
    if names.cache_info is None:
        return None, None
    block_size: int | None = None
    gpu_blocks: int | None = None
    for labels, _ in found.get(names.cache_info, ()):
        try:
            if block_size is None and labels.get("block_size"):
                block_size = int(labels["block_size"])
            if labels.get("num_gpu_blocks") not in (None, "", "None"):
                gpu_blocks = (gpu_blocks or 0) + int(labels["num_gpu_blocks"])
        except ValueError:
            # An info label we cannot read is not a reason to distrust the load figures.
            continue
    return block_size, gpu_blocks


def _adapters(label: str | None) -> frozenset[str]:
    return frozenset(name for part in (label or "").split(",") if (name := part.strip()))


def _lora_slots(found: Mapping[str, list[Sample]], names: MetricNames) -> LoraSlots | None:
    """The adapters of the newest ``vllm:lora_requests_info`` series; None without one.

    vLLM (``vllm/v1/metrics/loggers.py``, ``gauge_lora_info``) sets one series per distinct
    label set to the time it was last current (``set_to_current_time``), with the adapters
    as comma-separated names, so a page can carry old series beside the current one: the
    one with the largest value is the state now, as the Gateway API Inference Extension's
    metrics client reads it (``pkg/epp/backend/metrics``: the latest by value). An
    unreadable ``max_lora`` leaves the adapters unknown rather than the load figures."""
    if names.lora_info is None:
        return None
    samples = found.get(names.lora_info)
    if not samples:
        return None
    labels, _ = max(samples, key=lambda sample: sample[1])
    try:
        max_lora = int(labels.get("max_lora") or 0)
    except ValueError:
        return None
    return LoraSlots(
        _adapters(labels.get("running_lora_adapters")),
        _adapters(labels.get("waiting_lora_adapters")),
        max(max_lora, 0),
    )


def _served_models(
    found: Mapping[str, list[Sample]], names: MetricNames, spec: MetricsSpec
) -> frozenset[str]:
    """The model names the request gauges are labelled with: the endpoint's base model(s)."""
    return frozenset(
        model
        for name in (*names.waiting, *names.running)
        for labels, _ in found.get(name, ())
        if (model := labels.get(spec.model_label))
    )


def interpret(
    found: Mapping[str, list[Sample]], names: MetricNames, spec: MetricsSpec, *, info: _Info | None = None
) -> EndpointMetrics:
    """The Scheduler's figures from the samples found; ``info``: the info gauges' reading
    (block size, GPU blocks, LoRA slots) when already known (``_interpret_lines``)."""
    missing: list[str] = []
    waiting = _select(found, names.waiting, spec, missing)
    running = _select(found, names.running, spec, missing)
    usage = _select(found, names.kv_usage, spec, missing)
    if missing:
        raise PromMetricsError("missing metrics: " + "; ".join(missing))
    _finite("waiting", waiting)
    _finite("running", running)
    _finite("kv usage", usage)
    if info is None:
        block_size, gpu_blocks = _cache_info(found, names)
        lora = _lora_slots(found, names)
    else:
        block_size, gpu_blocks, lora = info
    return EndpointMetrics(
        waiting=round(sum(waiting)),
        running=round(sum(running)),
        kv_usage=sum(usage) / len(usage),
        block_size=block_size,
        num_gpu_blocks=gpu_blocks,
        lora=lora,
        # Only what tells an adapter from the base model, so only where adapters are served.
        served_models=_served_models(found, names, spec) if lora is not None else frozenset(),
    )


def parse_endpoint_metrics(page: Page, spec: MetricsSpec | None = None) -> EndpointMetrics:
    """The focused parser: reads only the wanted metrics' sample lines, straight from the
    bytes (a page of text is encoded first). Lines it does not read are not checked."""
    spec = spec or MetricsSpec()
    data = page.encode("utf-8") if isinstance(page, str) else page
    names = spec.resolve(data)
    return _interpret_lines(_collect_focused(data, _wanted(names)), names, spec)


def parse_sample_lines(
    groups: Sequence[list[bytes]], scanned: tuple[str, ...], marks: int, spec: MetricsSpec
) -> EndpointMetrics:
    """``parse_endpoint_metrics`` for a page scanned elsewhere: ``groups`` holds, per name of
    ``scanned`` (``spec.scanned_names``), that name's sample lines in page order, as
    ``sample_lines`` finds them; ``marks`` as ``MetricsSpec.resolve_marks`` takes them."""
    names = spec.resolve_marks(marks)
    wanted = _wanted(names)
    lines = {name: group for name, group in zip(scanned, groups, strict=True) if group and name in wanted}
    return _interpret_lines(lines, names, spec)


def parse_endpoint_metrics_reference(page: Page, spec: MetricsSpec | None = None) -> EndpointMetrics:
    """Same answer through prometheus_client's parser (validates the whole page)."""
    spec = spec or MetricsSpec()
    if isinstance(page, str):
        text = page
    else:
        try:
            text = bytes(page).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromMetricsError(f"page is not UTF-8: {exc}") from None
    names = spec.resolve(text)
    return interpret(_collect_reference(text, _wanted(names)), names, spec)
