"""OpenTelemetry spans of each routing decision, exported over OTLP; off unless configured.

One trace per decision: a ``kvsched.decision`` span with a child per stage the decision went
through, in order: ``parse`` (the request body), ``tokenize`` (the prompt's ids), ``lookup``
(block keys and the prefix index walk), ``score`` (the routing policy: filters, scorers, the
SLO stage and the picker, with the candidates' predictions when a scorer reads them) and
``predict`` (the chosen endpoint's TTFT/TPOT prediction when scoring did not make it already).
The decision span carries the outcome, the chosen endpoint, the predicted TTFT and TPOT and
the prefix blocks the chosen endpoint holds. A ``traceparent`` header (W3C Trace Context) on
the request makes the decision a child of the caller's span.

The stages are timed as they run (``time.time_ns``) and the spans are made after the decision,
all at once, with those times: nothing is awaited between a stage's start and end, so the
spans need no context carried across the event loop, and a decision costs the span objects
only when tracing is on. Off (the default), nothing here is imported or called: the pick path
tests ``tracer is None`` once per stage.

The ``opentelemetry-sdk`` and OTLP exporter packages are the ``tracing`` extra
(``pip install 'kvsched[tracing]'``); only ``otlp_tracer`` needs them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DECISION_SPAN = "kvsched.decision"
TRACE_HEADERS = ("traceparent", "tracestate")


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Export a trace of every routing decision over OTLP.")
    otlp_endpoint: str = Field(
        "http://localhost:4317", description="OTLP/gRPC collector address (the OpenTelemetry default)."
    )
    insecure: bool = Field(True, description="Plaintext to the collector (a sidecar or node agent).")
    service_name: str = Field("kvsched", description="The service.name resource attribute.")
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of decisions traced (parent-based: a sampled caller wins)."
    )


@dataclass(slots=True)
class DecisionTrace:
    """The stages of one decision as they are timed; ``DecisionTracer.finish`` makes the spans."""

    started_ns: int
    carrier: Mapping[str, str]
    stages: list[tuple[str, int, int]] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str, start_ns: int, end_ns: int | None = None) -> None:
        self.stages.append((name, start_ns, time.time_ns() if end_ns is None else end_ns))


class DecisionTracer:
    """Spans of decisions on an OpenTelemetry ``Tracer`` (any provider: OTLP, or in-memory in tests)."""

    def __init__(self, tracer: Any, propagator: Any | None = None, provider: Any | None = None) -> None:
        self._tracer = tracer
        self._provider = provider
        if propagator is None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            propagator = TraceContextTextMapPropagator()
        self._propagator = propagator

    def close(self) -> None:
        """Export what is still batched and stop (a provider this tracer made)."""
        if self._provider is not None:
            self._provider.shutdown()

    @staticmethod
    def begin(carrier: Mapping[str, str] | None = None) -> DecisionTrace:
        return DecisionTrace(time.time_ns(), carrier or {})

    def finish(self, trace: DecisionTrace) -> None:
        parent = self._propagator.extract(trace.carrier) if trace.carrier else None
        end_ns = time.time_ns()
        root = self._tracer.start_span(
            DECISION_SPAN, context=parent, start_time=trace.started_ns, attributes=trace.attributes
        )
        from opentelemetry import trace as otel_trace

        context = otel_trace.set_span_in_context(root)
        for name, start_ns, stop_ns in trace.stages:
            child = self._tracer.start_span(name, context=context, start_time=start_ns)
            child.end(end_time=stop_ns)
        root.end(end_time=max(end_ns, *(stop for _, _, stop in trace.stages)) if trace.stages else end_ns)


def decision_attributes(
    outcome: str,
    endpoints: Sequence[str],
    predicted: tuple[float, float, str] | None,
    matched_blocks: int | None,
    prompt_tokens: int,
    reason: str,
) -> dict[str, Any]:
    """The decision span's attributes (OpenTelemetry accepts str, bool, int, float and lists)."""
    attributes: dict[str, Any] = {"kvsched.outcome": outcome, "kvsched.prompt_tokens": prompt_tokens}
    if endpoints:
        attributes["kvsched.endpoint"] = endpoints[0]
        attributes["kvsched.fallback_endpoints"] = list(endpoints[1:])
    if predicted is not None:
        attributes["kvsched.predicted_ttft_ms"] = predicted[0]
        attributes["kvsched.predicted_tpot_ms"] = predicted[1]
        attributes["kvsched.prediction_source"] = predicted[2]
    if matched_blocks is not None:
        attributes["kvsched.matched_blocks"] = matched_blocks
    if reason:
        attributes["kvsched.reason"] = reason
    return attributes


def otlp_tracer(config: TracingConfig) -> DecisionTracer:
    """A tracer exporting in batches to the OTLP/gRPC collector of ``config``."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise RuntimeError(
            "tracing.enabled needs the OpenTelemetry SDK and OTLP exporter: pip install 'kvsched[tracing]'"
        ) from exc
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.insecure))
    )
    return DecisionTracer(provider.get_tracer("kvsched"), provider=provider)
