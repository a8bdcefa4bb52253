"""The native ext_proc transport: Envoy's ``ExternalProcessor`` stream and ``grpc.health.v1``
served by gRPC C++ (``scheduler._native.extproc``, built from ``kernels/extproc/`` when the
libraries are there), with Python asked once per request.

The native side speaks the protocol the way ``servicer.py`` does (held request headers,
re-chunked body, destination header and ``envoy.lb`` metadata, body modes, subset hints, the
response passed through) and reads the request body with simdjson. Python hears of a request
as events, each one tuple from ``Transport.take()``:

    DECIDE        (kind, stream, headers, body | None, parsed | None, subset | None, age_s,
                   queued_s, too_large)
    FIRST_BYTE    (kind, stream, age_s)
    RESPONSE_END  (kind, stream, status | None, served | None, first_byte, usage_kind, usage_data,
                   age_s)
    CLOSED        (kind, stream, asked, handed_off)  the stream ended before its response did;
                                               handed_off: routed, and its response phase goes
                                               to an observation stream (observed.py)
    OBSERVE       (kind, stream, routed_id | None)  an observation stream's request headers:
                                               FIRST_BYTE and RESPONSE_END follow on it
    HEALTH_CHECK  (kind, call, service)        a readiness Check: answer with health_reply
    UNARY         (kind, call, method, payload) a kvsched.v1 call: answer with unary_reply
    COUNT         (kind, stream, outcome)      a protocol slip counted on the native side

DECIDE, HEALTH_CHECK and UNARY wake the event loop at once (its eventfd, ``fileno()``); the
others wait up to 2 ms for one (``timer_fileno()``), so that a request's observation, first
byte, end and close reach Python in one turn rather than four. ``age_s`` says how long ago a
first byte or an end happened, so the latencies Python accounts for do not move.

``parsed`` is ``(api, model, max_tokens, stream, token_ids, text, messages)`` when the native
parser read the body exactly as ``codec/openai.py`` would (``token_ids`` an ``array('Q')``);
otherwise ``body`` holds the raw bytes and Python parses them. Decisions go through the same
``PickRunner`` as the Python transport; only the I/O differs.

In process, not a companion process: grpcio's extension exports one symbol
(``PyInit_cygrpc``; its gRPC core, abseil and BoringSSL are linked in and hidden), and Python
loads extensions with RTLD_LOCAL, so the C++ library's libgrpc 1.51 and grpcio's core never see
each other's symbols; each runs its own threads. Fork handlers: grpcio's core has them (and logs
that it skips them while its threads are busy, with or without this transport); libgrpc 1.51
registers none unless GRPC_ENABLE_FORK_SUPPORT=1. A fork with both cores serving runs and
exits normally, and the end-to-end tests start Envoy and the simulated pool beside them. A
companion process would add a Unix-socket hop each way per request and a second process to
supervise; the eventfd costs one ``read`` per batch of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

import grpc

from scheduler.adapters.extproc import responses
from scheduler.adapters.extproc.audit import audit_enabled, exchange_record, write_audit
from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner, RoutingAnswer
from scheduler.adapters.extproc.headers import (
    RequestHints,
    hint_headers,
    request_hints,
)
from scheduler.adapters.extproc.health import READINESS_SERVICES
from scheduler.adapters.extproc.observed import ROUTED_HEADER, ForwardedObservation, Observations
from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.extproc.tls import ServerCredentials
from scheduler.adapters.extproc.usage import CaptureKind, Usage, usage_from_capture
from scheduler.codec.openai import ChatMessage, InferenceRequestBody

log = logging.getLogger(__name__)

PICKER_PREFIX = "/kvsched.v1.EndpointPicker/"
# kvsched.v1.EndpointPicker's methods (proto/kvsched/v1/picker.proto) and their request messages.
_PICKER_REQUESTS = {"Pick": "PickRequest", "Report": "Completion", "Lookup": "LookupRequest"}
# A rotated certificate Secret is picked up within this many seconds (gRPC's file watcher).
TLS_REFRESH_S = 5


def load_native() -> Any | None:
    """``scheduler._native.extproc``, or None when this install was built without it."""
    try:
        return importlib.import_module("scheduler._native.extproc")
    except ImportError:
        return None


def native_available() -> bool:
    return load_native() is not None


def native_options(
    config: ExtProcConfig,
    credentials: ServerCredentials,
    *,
    host: str,
    port: int,
    health_host: str,
    health_port: int | None,
) -> dict[str, Any]:
    """The native Transport's options for kvsched's settings (TLS as ServerCredentials made it)."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "health_host": health_host,
        "health_port": -1 if health_port is None else health_port,
        "hint_headers": [*hint_headers(config.session_header), ROUTED_HEADER],
        "max_body_chunk_bytes": config.max_body_chunk_bytes,
        "max_request_body_bytes": config.max_request_body_bytes,
        "max_response_parse_bytes": config.max_response_parse_bytes,
        "max_message_bytes": config.max_message_bytes,
        "passthrough_prefix": PICKER_PREFIX,
        "readiness_services": list(READINESS_SERVICES),
    }
    settings = credentials.settings
    if settings.mode == "self_signed":
        options.update(tls_mode="pem", cert_pem=credentials.certificate_pem, key_pem=credentials.key_pem)
    elif settings.mode == "files":
        options.update(
            tls_mode="files",
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            tls_refresh_s=TLS_REFRESH_S,
        )
    else:
        options["tls_mode"] = "plaintext"
    return options


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _UnaryContext:
    """What EndpointPickerServicer uses of grpc.aio.ServicerContext."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)


class NativeTransport:
    """Serves ext_proc (and kvsched.v1, passed through to ``picker``) with the native module.

    Everything Python does runs on the event loop that called ``start()``, like the Python
    transport's handlers: the Scheduler is only ever touched from that loop.
    """

    def __init__(
        self,
        module: Any,
        runner: PickRunner,
        config: ExtProcConfig,
        stats: ExtProcStats,
        options: dict[str, Any],
        *,
        ready: Callable[[], bool],
        picker: Any | None = None,
        picker_pb2: Any | None = None,
        observations: Observations | None = None,
    ) -> None:
        self._runner = runner
        self.observations = observations if observations is not None else Observations(stats)
        self._config = config
        self._stats = stats
        self._ready = ready
        self._picker = picker
        self._picker_pb2 = picker_pb2
        self._native = module.Transport(options)
        self._kinds = {
            module.DECIDE: self._on_decide,
            module.FIRST_BYTE: self._on_first_byte,
            module.RESPONSE_END: self._on_response_end,
            module.CLOSED: self._on_closed,
            module.HEALTH_CHECK: self._on_health_check,
            module.UNARY: self._on_unary,
            module.COUNT: self._on_count,
            module.OBSERVE: self._on_observe,
        }
        # By stream: requests routed here (under their decision stream, and under their
        # observation stream once it started) and observations forwarded to a peer.
        self._requests: dict[int, _NativeRequest | ForwardedObservation] = {}
        # x-request-id values of requests in progress (servicer.py keeps the same set).
        self.active_ids: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._logged_fault = False
        self.port: int | None = None
        self.health_port: int | None = None

    @property
    def runner(self) -> PickRunner:
        return self._runner

    @property
    def stats(self) -> ExtProcStats:
        return self._stats

    @property
    def config(self) -> ExtProcConfig:
        return self._config

    @property
    def native(self) -> Any:
        return self._native

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        port, health_port = await asyncio.to_thread(self._native.start)
        self.port = port
        self.health_port = None if health_port < 0 else health_port
        self._native.set_ready(self._is_ready())
        self._loop.add_reader(self._native.fileno(), self.drain)
        self._loop.add_reader(self._native.timer_fileno(), self.drain)
        self._refresher = asyncio.create_task(self._refresh_readiness(self._config.health_refresh_s))

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, streams in flight get ``grace`` seconds, then both servers close."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        # The loop keeps answering (decisions, releases) while the servers drain.
        await asyncio.to_thread(self._native.shutdown, 0.0 if grace is None else grace)
        if self._loop is not None:
            self._loop.remove_reader(self._native.fileno())
            self._loop.remove_reader(self._native.timer_fileno())
            self._loop = None
        self.drain()
        for task in list(self._tasks):
            task.cancel()
        for request in list(self._requests.values()):
            if isinstance(request, _NativeRequest):
                request.finish("cancelled")
            else:
                request.observation_ended(self._runner.clock())

    async def _refresh_readiness(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._native.set_ready(self._is_ready())

    def refresh_readiness(self) -> None:
        """Readiness changed: the native health answers follow now, not at the next refresh."""
        self._native.set_ready(self._is_ready())

    def _is_ready(self) -> bool:
        try:
            return bool(self._ready())
        except Exception:
            log.exception("readiness check failed; reporting NOT_SERVING")
            return False

    # --- events -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Everything the native side has for Python (the eventfd's reader callback)."""
        for event in self._native.take():
            try:
                self._kinds[event[0]](event)
            except Exception:
                self._fault(event)

    def _fault(self, event: tuple[Any, ...]) -> None:
        # A fault in this adapter: fail the stream loudly (the gateway's failure mode decides)
        # rather than leave Envoy waiting for an answer; a routed request is released.
        self._stats.count("internal_error")
        if not self._logged_fault:
            self._logged_fault = True
            log.exception("native ext_proc event %r failed", event[:2])
        stream = event[1]
        self._native.abort(stream, "endpoint picker failed on this request")
        request = self._requests.pop(stream, None)
        if isinstance(request, _NativeRequest):
            request.finish("cancelled")
        elif request is not None:
            request.observation_ended(self._runner.clock())

    def forget(self, request: _NativeRequest) -> None:
        self._requests.pop(request.stream, None)
        if request.observed_on is not None:
            self._requests.pop(request.observed_on, None)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_decide(self, event: tuple[Any, ...]) -> None:
        _, stream, headers, body, parsed, subset, age_s, queued_s, too_large = event
        request = _NativeRequest(self, stream)
        self._requests[stream] = request
        # Requests whose observation never came leave the in-flight counts before this pick.
        self.observations.expire(self._runner.clock())
        hints = request.begin(headers, age_s, queued_s)
        if too_large:
            limit = self._config.max_request_body_bytes
            request.refuse(RoutingAnswer(PickOutcome.TOO_LARGE, reason=f"request body exceeds {limit} bytes"))
            return
        subset_set = None if subset is None else frozenset(subset)
        if parsed is None:
            request.task = self.spawn(request.decide(body, subset_set))
            return
        decided_from = request.decided_from()
        inference, token_ids = _inference_body(parsed)
        answer = self._runner.decide_now(hints, inference, subset_set, token_ids, record_after_answer=True)
        if isinstance(answer, RoutingAnswer):
            request.answer(answer, decided_from)
        else:
            request.task = self.spawn(request.answer_when_decided(answer, decided_from))

    def _on_first_byte(self, event: tuple[Any, ...]) -> None:
        _, stream, age_s = event
        request = self._requests.get(stream)
        if request is not None:
            request.first_byte(self._runner.clock() - age_s)

    def _on_response_end(self, event: tuple[Any, ...]) -> None:
        _, stream, status, served, first_byte, usage_kind, usage_data, age_s = event
        request = self._requests.get(stream)
        if request is None:
            return
        now = self._runner.clock() - age_s
        if first_byte:
            request.first_byte(now)
        request.complete_with(now, status, served, usage_from_capture(CaptureKind(usage_kind), usage_data))
        if isinstance(request, ForwardedObservation):
            # No CLOSED follows a completed response.
            del self._requests[stream]

    def _on_closed(self, event: tuple[Any, ...]) -> None:
        _, stream, asked, handed_off = event
        request = self._requests.get(stream)
        if isinstance(request, ForwardedObservation):
            del self._requests[stream]
            request.observation_ended(self._runner.clock())
        elif request is not None and request.observed_on == stream:
            request.observation_ended(self._runner.clock())
        elif request is not None and handed_off and not request.finished:
            # Two-filter layout: the decision stream is done; the observation stream (or the
            # registry's bound) releases the request.
            del self._requests[stream]
        elif request is not None:
            request.finish("cancelled")
        elif not asked:
            # The stream ended before the request was complete: nothing was decided.
            self._stats.count("cancelled_before_decision")
        # Asked and unknown: Python answered (refused, aborted) as the stream went away.

    def _on_observe(self, event: tuple[Any, ...]) -> None:
        _, stream, routed_id = event
        if not routed_id:
            # Not routed by kvsched (the decision filter failed open, or is not configured).
            self._stats.count("observation_unrouted")
            return
        target = self.observations.claim(routed_id)
        if isinstance(target, (_NativeRequest, ForwardedObservation)) and not target.finished:
            target.observed_on = stream
            self._requests[stream] = target

    def _on_health_check(self, event: tuple[Any, ...]) -> None:
        self._native.health_reply(event[1], self._is_ready())

    def _on_count(self, event: tuple[Any, ...]) -> None:
        self._stats.count(event[2])

    def _on_unary(self, event: tuple[Any, ...]) -> None:
        _, call, method, payload = event
        self.spawn(self._unary(call, method, payload))

    async def _unary(self, call: int, method: str, payload: bytes) -> None:
        picker, pb2 = self._picker, self._picker_pb2
        name = method[len(PICKER_PREFIX) :]
        try:
            request_type = _PICKER_REQUESTS.get(name)
            if picker is None or pb2 is None or request_type is None:
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served")
            message = getattr(pb2, request_type).FromString(payload)
            reply = await getattr(picker, name)(message, _UnaryContext())
        except _Abort as abort:
            self._native.unary_reply(call, b"", abort.code.value[0], abort.details)
            return
        except Exception as exc:
            log.exception("kvsched.v1 %s failed", name)
            self._native.unary_reply(call, b"", grpc.StatusCode.INTERNAL.value[0], repr(exc))
            return
        self._native.unary_reply(call, reply.SerializeToString(), 0, "")


class _NativeRequest:
    """One HTTP request on a native ext_proc stream: servicer.py's _Exchange, minus the I/O."""

    def __init__(self, transport: NativeTransport, stream: int) -> None:
        self.transport = transport
        self.stream = stream
        self.task: asyncio.Task[None] | None = None
        self.request_id = ""
        self.hints: RequestHints | None = None
        self.started_at: float | None = None
        self.complete_at: float | None = None
        self.decision: RoutingAnswer | None = None
        self.decision_s: float | None = None
        self.first_byte_at: float | None = None
        self.status: int | None = None
        self.served: str | None = None
        self.usage: Usage | None = None
        self.finished = False
        self.routed_id = ""
        # The observation stream carrying this request's response phase, once it started.
        self.observed_on: int | None = None

    def begin(self, headers: dict[str, str], age_s: float, queued_s: float) -> RequestHints:
        transport = self.transport
        now = transport.runner.clock()
        # The headers' arrival and the request's end, measured natively, on the clock every
        # Scheduler call uses.
        self.started_at = now - age_s
        self.complete_at = now - queued_s
        hints = request_hints(headers, transport.config.session_header)
        if hints.request_id in transport.active_ids:
            # A repeated id must not merge two requests' accounting in the scheduler.
            hints = replace(hints, request_id=f"{hints.request_id}~{self.stream:x}")
        self.hints = hints
        self.request_id = hints.request_id
        transport.active_ids.add(hints.request_id)
        return hints

    def decided_from(self) -> float:
        # From the request's end, as the Python transport measures it: the wait for the event
        # loop to take the request counts.
        return self.transport.runner.clock() if self.complete_at is None else self.complete_at

    async def decide(self, body: bytes | None, subset: frozenset[str] | None) -> None:
        """A body the native parser left to Python."""
        decided_from = self.decided_from()
        assert self.hints is not None
        decision = await self.transport.runner.decide_body(self.hints, body, subset, record_after_answer=True)
        self.answer(decision, decided_from)

    async def answer_when_decided(
        self, deciding: Coroutine[Any, Any, RoutingAnswer], decided_from: float
    ) -> None:
        self.answer(await deciding, decided_from)

    def answer(self, decision: RoutingAnswer, decided_from: float) -> None:
        runner = self.transport.runner
        assert self.hints is not None
        self.decision = decision
        if not decision.routed:
            if decision.outcome is PickOutcome.INTERNAL_ERROR:
                self.transport.stats.count("internal_error")
                self.transport.native.abort(self.stream, f"endpoint picking failed: {decision.reason}")
                self._write_audit("internal_error")
                self._close()
                return
            self.refuse(decision)
            return
        transport = self.transport
        config = transport.config
        observations = transport.observations
        try:
            destination, extra, self.routed_id = observations.address(
                decision, self.hints, destination_list=config.destination_list
            )
            scores = decision.endpoint_scores(config.endpoint_scores)
            transport.native.route(self.stream, destination, extra, scores or None, decision.body_replacement)
            self.decision_s = runner.clock() - decided_from
        finally:
            # The pick's bookkeeping, the answer on its way (on the answer thread); nothing
            # else reaches the Scheduler before it, and it runs even if answering failed.
            runner.record(decision)
        transport.stats.count(decision.outcome)
        observations.await_observation(self.routed_id, self, decision, decided_from)
        transport.stats.observe_decision(self.decision_s)

    def refuse(self, decision: RoutingAnswer) -> None:
        self.decision = decision
        self.transport.stats.count(decision.outcome)
        response = responses.refusal(decision.outcome, decision.reason)
        self.transport.native.respond(self.stream, response.SerializeToString())
        self._write_audit(decision.outcome)
        self._close()

    def first_byte(self, now: float) -> None:
        if self.first_byte_at is not None:
            return
        self.first_byte_at = now
        decision = self.decision
        if decision is not None and decision.routed:
            self.transport.runner.scheduler.on_first_token(self.request_id, now)

    def complete(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        decision = self.decision
        if self.finished or decision is None or not decision.routed:
            return
        self.status, self.usage = status, usage
        if served is not None:
            self.served = served
        scheduler = self.transport.runner.scheduler
        if status is not None and status >= 500:
            # The model server failed it: release the request without learning from it.
            scheduler.on_failed(self.request_id, now)
            outcome = "upstream_error"
        else:
            scheduler.on_completed(
                self.request_id,
                now,
                served=self.served or decision.endpoints[0],
                cached_tokens=usage.cached_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
            )
            outcome = "completed"
        self.transport.stats.count(outcome)
        self._write_audit(outcome, now)
        self._close()
        self._release_capacity()

    def complete_with(self, now: float, status: int | None, served: str | None, usage: Usage | None) -> None:
        self.complete(now, status, served, usage)

    def observation_ended(self, now: float) -> None:
        self.finish("cancelled")

    def expire(self, now: float) -> None:
        self.finish("expired")

    def finish(self, outcome: str) -> None:
        """The stream ended: a routed request without a complete response is released as failed."""
        if self.finished:
            return
        self._close()
        if self.task is not None and not self.task.done():
            # Still deciding (waiting in flow control, tokenising): nobody awaits the answer.
            self.task.cancel()
        decision = self.decision
        if decision is None:
            self.transport.stats.count(f"{outcome}_before_decision")
            return
        if decision.routed:
            now = self.transport.runner.clock()
            self.transport.runner.scheduler.on_failed(self.request_id, now)
            self.transport.stats.count(outcome)
            self._write_audit(outcome, now)
            self._release_capacity()

    def _close(self) -> None:
        self.finished = True
        self.transport.active_ids.discard(self.request_id)
        self.transport.forget(self)
        self.transport.observations.done(self.routed_id)

    def _release_capacity(self) -> None:
        # A request left its endpoint: a waiting one may fit now.
        gate = self.transport.runner.flow_gate
        if gate is not None:
            gate.poke()

    def _write_audit(self, outcome: str, now: float | None = None) -> None:
        if self.decision is None or not audit_enabled():
            return
        write_audit(
            exchange_record(
                self.request_id,
                outcome,
                self.decision,
                now=self.transport.runner.clock() if now is None else now,
                served=self.served,
                decision_s=self.decision_s,
                http_status=self.status,
                started_at=self.started_at,
                first_byte_at=self.first_byte_at,
                usage=self.usage,
            )
        )


def _inference_body(parsed: tuple[Any, ...]) -> tuple[InferenceRequestBody, Sequence[int] | None]:
    """The native parser's tuple as codec/openai.py's record; token ids stay in their array."""
    api, model, max_tokens, stream, token_ids, text, messages = parsed
    chat = tuple(ChatMessage(role, content) for role, content in messages) if messages is not None else ()
    body = InferenceRequestBody(
        api, model=model, prompt_text=text, messages=chat, max_tokens=max_tokens, stream=stream
    )
    return body, token_ids
