"""ext_proc ProcessingResponse messages for the GIE Endpoint Picker protocol.

Fields of ``envoy.service.ext_proc.v3`` (xds-protos, envoy/service/ext_proc/v3/external_processor.proto):
ProcessingResponse{request_headers|request_body|request_trailers|response_headers|response_body|
response_trailers|immediate_response, dynamic_metadata: Struct}; HeadersResponse/BodyResponse
{response: CommonResponse{header_mutation, body_mutation, clear_route_cache}};
BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}} (the one mutation
allowed in FULL_DUPLEX_STREAMED mode); ImmediateResponse{status: HttpStatus, headers, body, details}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from scheduler.adapters.extproc.config import (
    DESTINATION_HEADER,
    DESTINATION_NAMESPACE,
    DROPPED_REASON_HEADER,
    SCORES_KEY,
)
from scheduler.adapters.extproc.outcomes import PickOutcome

# envoy.service.ext_proc.v3.ProcessingResponse; the generated classes carry no type information.
ProcessingResponse: TypeAlias = Any

# Replace a client-sent value instead of appending to it: a request must not pick its own pod.
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy rejects a mutation whose value holds control characters (and fails the request);
    # reasons are free text, so they are flattened to one line.
    clean = _CONTROL_CHARACTERS.sub(" ", value)
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=clean.encode()), append_action=_OVERWRITE
    )


def route_headers_response(
    destination: str,
    content_length: int | None,
    extra_headers: Sequence[tuple[str, str]] = (),
    scores: Sequence[tuple[str, float]] = (),
) -> ProcessingResponse:
    """Request-headers answer that routes: header and ``envoy.lb`` metadata carry the same value;
    ``scores``, when given, go beside them as the proposed ``x-gateway-destination-endpoint-scores``."""
    headers = [_set_header(DESTINATION_HEADER, destination)]
    if content_length is not None:
        headers.append(_set_header("content-length", str(content_length)))
    headers.extend(_set_header(key, value) for key, value in extra_headers)
    metadata = struct_pb2.Struct()
    namespace = metadata.fields[DESTINATION_NAMESPACE].struct_value
    namespace.fields[DESTINATION_HEADER].string_value = destination
    if scores:
        scored = namespace.fields[SCORES_KEY].struct_value
        for address, score in scores:
            scored.fields[address].number_value = score
    return ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(
                header_mutation=ext_proc.HeaderMutation(set_headers=headers), clear_route_cache=True
            )
        ),
        dynamic_metadata=metadata,
    )


def request_body_responses(
    body: bytes, chunk_bytes: int, end_of_stream: bool
) -> Iterator[ProcessingResponse]:
    """The held request body handed back as streamed_response chunks, in order."""
    if not body:
        yield _request_body_chunk(b"", end_of_stream)
        return
    last = len(body)
    for start in range(0, last, chunk_bytes):
        stop = min(start + chunk_bytes, last)
        yield _request_body_chunk(body[start:stop], end_of_stream and stop == last)


def _request_body_chunk(chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
    return ext_proc.ProcessingResponse(
        request_body=ext_proc.BodyResponse(
            response=ext_proc.CommonResponse(
                body_mutation=ext_proc.BodyMutation(
                    streamed_response=ext_proc.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
                )
            )
        )
    )


def response_body_passthrough(chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
    """A response body chunk returned unchanged (FULL_DUPLEX_STREAMED needs every chunk echoed)."""
    return ext_proc.ProcessingResponse(
        response_body=ext_proc.BodyResponse(
            response=ext_proc.CommonResponse(
                body_mutation=ext_proc.BodyMutation(
                    streamed_response=ext_proc.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
                )
            )
        )
    )


def request_body_continue() -> ProcessingResponse:
    return ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse())


def response_body_continue() -> ProcessingResponse:
    return ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())


def response_headers_continue() -> ProcessingResponse:
    return ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse())


def request_trailers_continue() -> ProcessingResponse:
    return ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse())


def response_trailers_continue() -> ProcessingResponse:
    return ext_proc.ProcessingResponse(response_trailers=ext_proc.TrailersResponse())


def immediate_response(
    status: int, message: str, error_type: str, headers: Sequence[tuple[str, str]] = ()
) -> ProcessingResponse:
    """A local reply from the gateway, with an OpenAI-style JSON error body."""
    body = json.dumps({"error": {"message": message, "type": error_type, "code": status}}).encode()
    mutation = ext_proc.HeaderMutation(
        set_headers=[_set_header("content-type", "application/json")]
        + [_set_header(key, value) for key, value in headers]
    )
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=mutation,
            body=body,
            # Shown as %RESPONSE_CODE_DETAILS% in Envoy access logs; must hold no whitespace.
            details=f"kvsched_{error_type}",
        )
    )


def refusal(outcome: PickOutcome, reason: str) -> ProcessingResponse:
    """The immediate response refusing a request with ``outcome`` (one with an HTTP status)."""
    status = outcome.http_status
    if status is None:
        raise ValueError(f"{outcome} is not a refusal")
    # Flow control's refusals say why in the GIE's header (429 shed / queue full, 503 waited out).
    dropped = outcome in (PickOutcome.SHED, PickOutcome.QUEUE_TIMEOUT)
    headers = [(DROPPED_REASON_HEADER, reason)] if dropped else []
    return immediate_response(status, reason, outcome, headers)
