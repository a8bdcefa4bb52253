"""What the gateway tells kvsched about a request: headers and ext_proc metadata."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.adapters.extproc.config import (
    DESTINATION_NAMESPACE,
    SERVED_KEY,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)

log = logging.getLogger(__name__)

# Current llm-d names first; the older GIE names are still sent by existing clients.
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
SLO_TPOT_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
FAIRNESS_HEADER = "x-llm-d-fairness-id"
REQUEST_ID_HEADER = "x-request-id"
# W3C Trace Context: a traced decision joins the caller's trace.
TRACE_HEADERS = ("traceparent", "tracestate")
# The session header's default name (ExtProcConfig.session_header).
SESSION_HEADER = "x-session-id"
# Where llm-d's routing sidecar on a decode pod finds the prefill pod ("ip:port") of a
# disaggregated request (llm-d/llm-d-inference-scheduler pkg/common/common.go,
# PrefillPodHeader, shared by its scheduler and its routing sidecar).
PREFILL_HEADER = "x-prefiller-host-port"
# Every request header request_hints() reads: a transport that filters headers keeps these.
HINT_HEADERS = (
    REQUEST_ID_HEADER,
    ":path",
    *OBJECTIVE_HEADERS,
    *SLO_TTFT_HEADERS,
    *SLO_TPOT_HEADERS,
    FAIRNESS_HEADER,
    *TRACE_HEADERS,
    PREFILL_HEADER,
)

_warned_headers: set[str] = set()


def header_dict(headers: Any) -> dict[str, str]:
    """An Envoy HeaderMap as lower-case name -> value.

    Envoy fills ``raw_value`` (bytes) in ext_proc requests; ``value`` is the older string field.
    Repeated names are joined with commas, as HTTP allows.
    """
    result: dict[str, str] = {}
    for header in headers.headers:
        raw = header.raw_value
        value = raw.decode("utf-8", "replace") if raw else header.value
        key = header.key.lower()
        if key in result:
            result[key] = f"{result[key]},{value}"
        else:
            result[key] = value
    return result


@dataclass(frozen=True, slots=True)
class RequestHints:
    request_id: str
    generated_id: bool
    path: str | None
    objective: str | None
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    fairness_id: str | None
    # traceparent / tracestate as sent, when the request carries them.
    trace_headers: Mapping[str, str] | None = None
    session_id: str | None = None
    # The client sent a prefill pod of its own: the answer overwrites it, as llm-d's prefill
    # header handler clears it, so no client chooses where its prompt is computed.
    prefill_header_sent: bool = False


def hint_headers(session_header: str = SESSION_HEADER) -> tuple[str, ...]:
    """Every request header ``request_hints`` reads, the configured session header included."""
    return HINT_HEADERS if session_header in HINT_HEADERS else (*HINT_HEADERS, session_header)


def request_hints(headers: Mapping[str, str], session_header: str = SESSION_HEADER) -> RequestHints:
    request_id = headers.get(REQUEST_ID_HEADER, "").strip()
    generated = not request_id
    if generated:
        request_id = uuid.uuid4().hex
    return RequestHints(
        request_id=request_id,
        generated_id=generated,
        path=headers.get(":path"),
        objective=_first(headers, OBJECTIVE_HEADERS),
        slo_ttft_ms=_milliseconds(headers, SLO_TTFT_HEADERS),
        slo_tpot_ms=_milliseconds(headers, SLO_TPOT_HEADERS),
        fairness_id=headers.get(FAIRNESS_HEADER) or None,
        trace_headers=(
            {name: headers[name] for name in TRACE_HEADERS if name in headers}
            if "traceparent" in headers
            else None
        ),
        session_id=headers.get(session_header, "").strip() or None,
        prefill_header_sent=PREFILL_HEADER in headers,
    )


def routing_headers(hints: RequestHints, prefill_endpoint: str | None) -> list[tuple[str, str]]:
    """Headers a routed request gets besides its destination, in both ext_proc transports:
    the request id kvsched made up, and the prefill pod of a disaggregated pick (an empty
    value, which the sidecar reads as none, when the client sent one and kvsched picked none)."""
    extra = [(REQUEST_ID_HEADER, hints.request_id)] if hints.generated_id else []
    if prefill_endpoint is not None:
        extra.append((PREFILL_HEADER, prefill_endpoint))
    elif hints.prefill_header_sent:
        extra.append((PREFILL_HEADER, ""))
    return extra


def _first(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def _milliseconds(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = headers.get(name, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            return value
        # A bad SLO is ignored rather than refused: the request is still served, just without it.
        if name not in _warned_headers:
            _warned_headers.add(name)
            log.warning("ignoring header %s=%r: not a positive number of milliseconds", name, raw[:64])
    return None


def subset_hint(metadata: Any) -> frozenset[str] | None:
    """The gateway's subset hint (a list, or a comma string), or None when absent."""
    if SUBSET_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    return frozenset(_addresses(fields[SUBSET_KEY]))


def served_endpoint(metadata: Any) -> str | None:
    """The endpoint the gateway reports as having served the request, if it reports one."""
    if DESTINATION_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[DESTINATION_NAMESPACE].fields
    if SERVED_KEY not in fields:
        return None
    addresses = _addresses(fields[SERVED_KEY])
    return addresses[0] if addresses else None


def _addresses(value: Any) -> list[str]:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [
            item.string_value for item in value.list_value.values if item.WhichOneof("kind") == "string_value"
        ]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        items = []
    return [item.strip() for item in items if item.strip()]
