"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one HTTP request per stream.

Message order, as the GIE Endpoint Picker protocol uses ext_proc with FULL_DUPLEX_STREAMED bodies
(see shared PROTOCOLS.md §2 and the Envoy ext_proc filter docs):

request path   request_headers [request_body ... end_of_stream] [request_trailers]
               The headers answer is held until the body is complete (routing needs the prompt);
               then: HeadersResponse (route header, envoy.lb metadata, Content-Length,
               clear_route_cache), the body as streamed_response chunks, the trailers answer.
               A headers-only request (end_of_stream on the headers) is answered at once.
response path  response_headers, response_body chunks (echoed unchanged), [response_trailers]
               Time of the first body byte -> on_first_token; usage at the end -> on_completed.
A refused request gets an ImmediateResponse and the stream ends.

Two-filter layout (``observed.py``): the decision stream says ``response_body_mode: NONE`` in its
protocol_config and ends after the request phase; its routed request stays in flight. The
response phase comes on an observation stream (``observability_mode`` set on every message:
request_headers naming the routed request in ``x-kvsched-routed``, response_headers,
response_body chunks, [response_trailers]); nothing is answered on it, and the response is
accounted exactly as on the decision stream.

Envoy >= 1.33 states its body modes in the first message (``protocol_config``). When the request
body is not FULL_DUPLEX_STREAMED (NONE for a headers-only set-up, STREAMED, BUFFERED) the headers
are answered at once, routing without the prompt, and body messages get a plain continue, so a
gateway configured differently is served (without prefix affinity) instead of stalled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from scheduler.adapters.extproc import responses
from scheduler.adapters.extproc.audit import audit_enabled, exchange_record, write_audit
from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner, RoutingAnswer
from scheduler.adapters.extproc.headers import (
    RequestHints,
    header_dict,
    request_hints,
    served_endpoint,
    subset_hint,
)
from scheduler.adapters.extproc.observed import ROUTED_HEADER, Observations, ObservedRequest
from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.extproc.usage import ResponseUsageReader, Usage
from scheduler.adapters.stage_times import STAGE_TIMES

log = logging.getLogger(__name__)

_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_NO_BODY = processing_mode_pb2.ProcessingMode.NONE


class ExternalProcessorServicer(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        runner: PickRunner,
        config: ExtProcConfig,
        stats: ExtProcStats,
        observations: Observations | None = None,
    ) -> None:
        self._runner = runner
        self._config = config
        self._stats = stats
        self._observations = observations if observations is not None else Observations(stats)
        # x-request-id values of streams in progress: a repeated id must not merge two requests'
        # accounting in the scheduler.
        self._active_ids: set[str] = set()
        self._logged_fault = False

    async def Process(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        exchange = _Exchange(self._runner, self._config, self._stats, self._active_ids, self._observations)
        observation: _Observation | None = None
        try:
            async for message in request_iterator:
                if observation is not None or message.observability_mode:
                    # Copies of an HTTP stream's messages that Envoy sends without awaiting an
                    # answer: nothing is written back.
                    if observation is None:
                        observation = _Observation(self._observations, self._stats, self._clock, self._config)
                    observation.handle(message)
                    continue
                try:
                    answers = await exchange.handle(message)
                except Exception:
                    # A fault in this adapter: fail the stream loudly (the gateway's failure mode
                    # decides) rather than leave Envoy waiting for an answer.
                    self._stats.count("internal_error")
                    if not self._logged_fault:
                        self._logged_fault = True
                        log.exception("ext_proc stream failed on a %s message", message.WhichOneof("request"))
                    await context.abort(grpc.StatusCode.INTERNAL, "endpoint picker failed on this request")
                for response in answers:
                    yield response
                if exchange.aborted is not None:
                    await context.abort(grpc.StatusCode.INTERNAL, exchange.aborted)
                if exchange.closed:
                    return
        finally:
            if observation is not None:
                observation.end()
            else:
                # Reached on every exit; a routed request whose response did not finish (gateway
                # reset, client gone, upstream failure) is released here, unless its response
                # phase goes to an observation stream.
                exchange.stream_ended()

    def _clock(self) -> float:
        return self._runner.clock()


class _Observation:
    """An observation stream: the response phase of a request routed on another stream, here
    (the routing exchange reads it as its own) or on a peer (read here, forwarded)."""

    def __init__(
        self,
        observations: Observations,
        stats: ExtProcStats,
        clock: Callable[[], float],
        config: ExtProcConfig,
    ) -> None:
        self._observations = observations
        self._stats = stats
        self._clock = clock
        self._config = config
        self._started = False
        self._exchange: _Exchange | None = None
        self._forward: ObservedRequest | None = None
        # A forwarded response, as _Exchange reads one.
        self._status: int | None = None
        self._served: str | None = None
        self._reader: ResponseUsageReader | None = None
        self._first_byte = False
        self._ended = False

    def handle(self, message: Any) -> None:
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            if self._started:
                self._stats.count("unexpected_message")
                return
            self._started = True
            routed_id = header_dict(message.request_headers.headers).get(ROUTED_HEADER)
            if not routed_id:
                # Not routed by kvsched (the decision filter failed open, or is not configured).
                self._stats.count("observation_unrouted")
                return
            target = self._observations.claim(routed_id)
            if isinstance(target, _Exchange):
                self._exchange = target
            else:
                self._forward = target
            return
        exchange = self._exchange
        if exchange is not None:
            if exchange.finished:
                return
            if message.HasField("metadata_context"):
                exchange.read_metadata(message.metadata_context)
            if kind == "response_headers":
                exchange.response_headers(message.response_headers)
            elif kind == "response_body":
                exchange.response_body(message.response_body)
            elif kind == "response_trailers":
                exchange.complete()
        elif self._forward is not None and not self._ended:
            self._read_forwarded(kind, message)

    def _read_forwarded(self, kind: str | None, message: Any) -> None:
        assert self._forward is not None
        if message.HasField("metadata_context"):
            self._served = served_endpoint(message.metadata_context) or self._served
        if kind == "response_headers":
            values = header_dict(message.response_headers.headers)
            try:
                self._status = int(values.get(":status", "200"))
            except ValueError:
                self._status = None
            self._reader = ResponseUsageReader(
                values.get("content-type"), self._config.max_response_parse_bytes
            )
            if message.response_headers.end_of_stream:
                self._end_forwarded()
        elif kind == "response_body":
            chunk = message.response_body.body
            if chunk:
                if not self._first_byte:
                    self._first_byte = True
                    self._forward.first_byte(self._clock())
                if self._reader is None:
                    self._reader = ResponseUsageReader(None, self._config.max_response_parse_bytes)
                self._reader.feed(chunk)
            if message.response_body.end_of_stream:
                self._end_forwarded()
        elif kind == "response_trailers":
            self._end_forwarded()

    def _end_forwarded(self) -> None:
        assert self._forward is not None
        self._ended = True
        usage = self._reader.usage() if self._reader is not None else None
        self._forward.complete_with(self._clock(), self._status, self._served, usage)

    def end(self) -> None:
        now = self._clock()
        if self._exchange is not None:
            self._exchange.observation_ended(now)
        elif self._forward is not None and not self._ended:
            self._forward.observation_ended(now)


class _Exchange:
    """The state of one HTTP request/response pair on one ext_proc stream."""

    def __init__(
        self,
        runner: PickRunner,
        config: ExtProcConfig,
        stats: ExtProcStats,
        active_ids: set[str],
        observations: Observations,
    ) -> None:
        self._runner = runner
        self._config = config
        self._stats = stats
        self._active_ids = active_ids
        self._observations = observations
        self._routed_id = ""
        # The decision stream says its response phase is not sent on it (two-filter layout).
        self._response_elsewhere = False
        self._response_here = False
        self._clock: Callable[[], float] = runner.clock
        self._scheduler = runner.scheduler
        self.closed = False
        self.aborted: str | None = None
        self._hints: RequestHints | None = None
        self._request_id = ""
        self._subset: frozenset[str] | None = None
        self._started_at: float | None = None
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._body_messages = 0
        self._decision: RoutingAnswer | None = None
        self._decision_s: float | None = None
        self._status: int | None = None
        self._served: str | None = None
        self._first_byte_at: float | None = None
        self._usage_reader: ResponseUsageReader | None = None
        self._usage: Usage | None = None
        self._finished = False
        # Without a protocol_config (older Envoy) the GIE set-up is assumed.
        self._duplex_request = True
        self._duplex_response = True

    async def handle(self, message: Any) -> list[Any]:
        kind = message.WhichOneof("request")
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self._duplex_request = config.request_body_mode == _FULL_DUPLEX
            self._duplex_response = config.response_body_mode == _FULL_DUPLEX
            self._response_elsewhere = config.response_body_mode == _NO_BODY
        if message.HasField("metadata_context"):
            self.read_metadata(message.metadata_context)
        if kind == "request_headers":
            return await self._request_headers(message.request_headers)
        if kind == "request_body":
            return await self._request_body(message.request_body)
        if kind == "request_trailers":
            answers = [] if self._decision is not None else await self._decide(end_of_stream=False)
            if not self.closed:
                answers.append(responses.request_trailers_continue())
            return answers
        if kind == "response_headers":
            self._response_here = True
            started = STAGE_TIMES.start()
            answers = self.response_headers(message.response_headers)
            STAGE_TIMES.stop("response_path", started)
            return answers
        if kind == "response_body":
            self._response_here = True
            started = STAGE_TIMES.start()
            answers = self.response_body(message.response_body)
            STAGE_TIMES.stop("response_path", started)
            return answers
        if kind == "response_trailers":
            self._response_here = True
            self.complete()
            return [responses.response_trailers_continue()]
        self._stats.count("unexpected_message")
        return []

    @property
    def finished(self) -> bool:
        return self._finished

    def read_metadata(self, metadata: Any) -> None:
        if self._decision is None:
            subset = subset_hint(metadata)
            if subset is not None:
                self._subset = subset
        else:
            served = served_endpoint(metadata)
            if served is not None:
                self._served = served

    async def _request_headers(self, headers: Any) -> list[Any]:
        self._started_at = self._clock()
        started = STAGE_TIMES.start()
        hints = request_hints(header_dict(headers.headers), self._config.session_header)
        STAGE_TIMES.stop("request_headers", started)
        if hints.request_id in self._active_ids:
            hints = replace(hints, request_id=f"{hints.request_id}~{id(self):x}")
        self._hints = hints
        self._request_id = hints.request_id
        self._active_ids.add(hints.request_id)
        if headers.end_of_stream or not self._duplex_request:
            return await self._decide(end_of_stream=True)
        return []

    async def _request_body(self, body: Any) -> list[Any]:
        if self._decision is not None:
            if self._duplex_request:
                # Body after the end of the body (or after a refusal): a protocol slip, counted.
                self._stats.count("unexpected_message")
                return []
            # Outside FULL_DUPLEX_STREAMED the decision was made on the headers: let the body through.
            return [responses.request_body_continue()]
        self._body_messages += 1
        chunk = body.body
        if chunk:
            self._body_size += len(chunk)
            if self._body_size > self._config.max_request_body_bytes:
                self._chunks.clear()
                return self._refuse(
                    RoutingAnswer(
                        PickOutcome.TOO_LARGE,
                        reason=f"request body exceeds {self._config.max_request_body_bytes} bytes",
                    )
                )
            self._chunks.append(chunk)
        if body.end_of_stream:
            return await self._decide(end_of_stream=True)
        return []

    async def _decide(self, *, end_of_stream: bool) -> list[Any]:
        if self._hints is None:
            # Body before headers breaks the protocol; still decide (with a generated id).
            self._hints = request_hints({})
            self._request_id = self._hints.request_id
            self._active_ids.add(self._request_id)
            self._started_at = self._clock()
        body = b"".join(self._chunks) if self._chunks else b""
        self._chunks = []
        decided_from = self._clock()
        # Requests whose observation never came leave the in-flight counts before this pick.
        self._observations.expire(decided_from)
        decision = await self._runner.decide_body(self._hints, body, self._subset)
        self._decision = decision
        if not decision.routed:
            if decision.outcome is PickOutcome.INTERNAL_ERROR:
                self._stats.count("internal_error")
                self.aborted = f"endpoint picking failed: {decision.reason}"
                self.closed = True
                self._write_audit("internal_error")
                self._finished = True
                return []
            return self._refuse(decision)
        self._stats.count(decision.outcome)
        started = STAGE_TIMES.start()
        destination, extra, self._routed_id = self._observations.announce(
            self, decision, self._hints, decided_from, destination_list=self._config.destination_list
        )
        has_body = self._body_messages > 0 and self._duplex_request
        if has_body and decision.body_replacement is not None:
            body = decision.body_replacement
        scores = decision.endpoint_scores(self._config.endpoint_scores)
        answers = [
            responses.route_headers_response(destination, len(body) if has_body else None, extra, scores)
        ]
        if has_body:
            answers.extend(
                responses.request_body_responses(body, self._config.max_body_chunk_bytes, end_of_stream)
            )
        STAGE_TIMES.stop("reply_build", started)
        self._decision_s = self._clock() - decided_from
        self._stats.observe_decision(self._decision_s)
        return answers

    def _refuse(self, decision: RoutingAnswer) -> list[Any]:
        self._decision = decision
        self._stats.count(decision.outcome)
        self.closed = True
        self._write_audit(decision.outcome)
        self._finished = True
        return [responses.refusal(decision.outcome, decision.reason)]

    def response_headers(self, headers: Any) -> list[Any]:
        values = header_dict(headers.headers)
        try:
            self._status = int(values.get(":status", "200"))
        except ValueError:
            self._status = None
        self._usage_reader = ResponseUsageReader(
            values.get("content-type"), self._config.max_response_parse_bytes
        )
        answers = [responses.response_headers_continue()]
        if headers.end_of_stream:
            self.complete()
        return answers

    def response_body(self, body: Any) -> list[Any]:
        chunk = body.body
        if chunk:
            if self._first_byte_at is None:
                self._first_byte_at = self._clock()
                if self._decision is not None and self._decision.routed:
                    self._scheduler.on_first_token(self._request_id, self._first_byte_at)
            if self._usage_reader is None:
                self._usage_reader = ResponseUsageReader(None, self._config.max_response_parse_bytes)
            self._usage_reader.feed(chunk)
        if self._duplex_response:
            answer = responses.response_body_passthrough(chunk, body.end_of_stream)
        else:
            answer = responses.response_body_continue()
        if body.end_of_stream:
            self.complete()
        return [answer]

    def first_byte(self, now: float) -> None:
        """A peer saw the response's first body byte (its observation stream landed there)."""
        if self._first_byte_at is None:
            self._first_byte_at = now
            if self._decision is not None and self._decision.routed:
                self._scheduler.on_first_token(self._request_id, now)

    def complete_with(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        """A peer saw the response end."""
        if self._finished:
            return
        self._status = status
        if served is not None:
            self._served = served
        self._complete(now, usage)

    def complete(self) -> None:
        if self._finished:
            return
        self._complete(self._clock(), self._usage_reader.usage() if self._usage_reader is not None else None)

    def _complete(self, now: float, usage: Usage | None) -> None:
        if self._finished or self._decision is None or not self._decision.routed:
            return
        self._usage = usage
        served = self._served or self._decision.endpoints[0]
        if self._status is not None and self._status >= 500:
            # The model server failed it: release the request without learning from it.
            self._scheduler.on_failed(self._request_id, now)
            outcome = "upstream_error"
        else:
            self._scheduler.on_completed(
                self._request_id,
                now,
                served=served,
                cached_tokens=self._usage.cached_tokens if self._usage else None,
                completion_tokens=self._usage.completion_tokens if self._usage else None,
            )
            outcome = "completed"
        self._stats.count(outcome)
        self._write_audit(outcome, now)
        self._finished = True
        self._observations.done(self._routed_id)
        self._active_ids.discard(self._request_id)
        self._release_capacity()

    def _release_capacity(self) -> None:
        # A request left its endpoint: a waiting one may fit now.
        gate = self._runner.flow_gate
        if gate is not None:
            gate.poke()

    def stream_ended(self) -> None:
        """End of the decision stream: release the request unless its response phase is observed
        on another stream (then the observation's end, or the registry's bound, releases it)."""
        routed = self._decision is not None and self._decision.routed
        if routed and not self._finished and self._response_elsewhere and not self._response_here:
            return
        self.finish("cancelled")

    def observation_ended(self, now: float) -> None:
        self.finish("cancelled")

    def expire(self, now: float) -> None:
        self.finish("expired")

    def finish(self, outcome: str) -> None:
        """A routed request without a complete response is released as failed."""
        if self._request_id:
            self._active_ids.discard(self._request_id)
        if self._finished:
            return
        self._finished = True
        self._observations.done(self._routed_id)
        if self._decision is None:
            # The stream ended before the request was complete: nothing was decided.
            self._stats.count(f"{outcome}_before_decision")
            return
        if self._decision.routed:
            now = self._clock()
            self._scheduler.on_failed(self._request_id, now)
            self._stats.count(outcome)
            self._write_audit(outcome, now)
            self._release_capacity()

    def _write_audit(self, outcome: str, now: float | None = None) -> None:
        decision = self._decision
        if decision is None or not audit_enabled():
            return
        write_audit(
            exchange_record(
                self._request_id,
                outcome,
                decision,
                now=self._clock() if now is None else now,
                served=self._served,
                decision_s=self._decision_s,
                http_status=self._status,
                started_at=self._started_at,
                first_byte_at=self._first_byte_at,
                usage=self._usage,
            )
        )
