"""One routing decision: request body -> token ids -> Scheduler.pick, with the error policy.

Shared by the ext_proc servicer and the kvsched.v1 API. Decision logic stays in the Scheduler;
this only maps its answers (and its failures) onto the Endpoint Picker's outcomes
(``PickOutcome``), one ``RoutingAnswer`` per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, cast

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.headers import RequestHints
from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.flow_gate import FlowGate
from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.adapters.tokenizer import (
    PromptTokenizer,
    TemplateError,
    leading_request_token_ids,
    request_token_ids,
)
from scheduler.adapters.tracing import DecisionTrace, DecisionTracer, decision_attributes
from scheduler.codec.openai import (
    BadRequestBody,
    InferenceRequestBody,
    leading_prompt,
    parse_request_body,
    with_model,
)
from scheduler.core.flowcontrol import Admission, FlowItem
from scheduler.core.lookup import PrefixLookup
from scheduler.core.model_rewrite import ModelRewrites
from scheduler.core.objectives import ResolvedObjective
from scheduler.core.scheduler import Endpoint, PickChoice, PickResult, SchedulingRequest

log = logging.getLogger(__name__)
trace_clock = time.time_ns


class SchedulerPort(Protocol):
    """The Scheduler facade methods the Endpoint Picker calls."""

    def endpoints(self) -> list[Endpoint]: ...

    def choose(self, request: SchedulingRequest, now: float) -> PickChoice: ...

    def record(self, choice: PickChoice) -> PickResult: ...

    def fallback_pick(self, request: SchedulingRequest, now: float | None = None) -> list[str]: ...

    def on_first_token(self, request_id: str, now: float) -> None: ...

    def on_completed(
        self,
        request_id: str,
        now: float,
        *,
        served: str | None = None,
        cached_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> object: ...

    def on_failed(self, request_id: str, now: float) -> None: ...

    def resolve_objective(self, request: SchedulingRequest) -> ResolvedObjective: ...

    def lookup(self, token_ids: Sequence[int], now: float, *, model: str | None = None) -> PrefixLookup: ...

    def prefix_held(self, token_ids: Sequence[int], *, model: str | None = None) -> bool: ...

    def place_whole_prompt(self, request_id: str, token_ids: Sequence[int], now: float) -> bool: ...


@dataclass(slots=True)
class RoutingAnswer:
    """The Endpoint Picker's answer for one request: where it goes, or why it is refused."""

    outcome: PickOutcome
    endpoints: list[str] = field(default_factory=list)
    reason: str = ""
    # A dict, or something with ``.explanation`` (the Scheduler's PickResult) that builds it
    # on first use, so the account of a decision is not built on the picking path.
    explanation_source: Any = field(default_factory=dict)
    request: SchedulingRequest | None = None
    body: InferenceRequestBody | None = None
    error: BaseException | None = None
    # The ``now`` the Scheduler was given (its in-flight clock for this request starts there).
    decided_at: float | None = None
    # The request body to send on instead of the client's (its model name rewritten).
    body_replacement: bytes | None = None
    # A pick whose bookkeeping waits until the answer is on its way (``PickRunner.record``).
    unrecorded: PickChoice | None = None

    @property
    def explanation(self) -> dict[str, Any]:
        source = self.explanation_source
        explanation: dict[str, Any] = source if isinstance(source, dict) else source.explanation
        return explanation

    @property
    def predicted(self) -> tuple[float, float, str] | None:
        """(TTFT ms, TPOT ms, source) the Scheduler predicted for the primary, if it did."""
        predicted: tuple[float, float, str] | None = getattr(self.explanation_source, "predicted", None)
        return predicted

    @property
    def prefill_endpoint(self) -> str | None:
        """The prefill pod's address of a disaggregated pick; None: the destination prefills."""
        prefill: str | None = getattr(self.explanation_source, "prefill_endpoint", None)
        return prefill

    @property
    def routed(self) -> bool:
        return self.outcome.routed

    def endpoint_scores(self, limit: int) -> list[tuple[str, float]]:
        """(address, score) of at most ``limit`` candidates the pipeline scored: the routed
        endpoints first, in their order, then the others best first; none when nothing scored."""
        decision = getattr(self.explanation_source, "decision", None)
        if limit <= 0 or decision is None or decision.candidates is None or not decision.totals:
            return []
        totals = {
            state.address: total
            for state, total in zip(decision.candidates.states, decision.totals, strict=False)
        }
        scores = [(address, round(totals[address], 6)) for address in self.endpoints if address in totals]
        if len(scores) < limit:
            chosen = set(self.endpoints)
            rest = sorted(
                ((total, address) for address, total in totals.items() if address not in chosen), reverse=True
            )
            scores.extend((address, round(total, 6)) for total, address in rest[: limit - len(scores)])
        return scores[:limit]


class PickRunner:
    def __init__(
        self,
        scheduler: SchedulerPort,
        config: ExtProcConfig,
        tokenizer: PromptTokenizer,
        clock: Callable[[], float],
        stats: ExtProcStats,
        flow_gate: FlowGate | None = None,
        tracer: DecisionTracer | None = None,
        model_rewrites: ModelRewrites | None = None,
        seed: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.tokenizer = tokenizer
        self.clock = clock
        self.stats = stats
        self.flow_gate = flow_gate
        # None: no decision is traced, and no stage pays for tracing beyond this test.
        self.tracer = tracer
        self.model_rewrites = model_rewrites if model_rewrites else None
        # Draws for the weighted model split; seeded, so a replayed run splits alike.
        self._rewrite_rng = random.Random(seed)
        self._logged_errors: set[str] = set()
        # Prompts being tokenised whole after their answer, for their placement.
        self._placing: set[asyncio.Task[None]] = set()

    async def decide_body(
        self,
        hints: RequestHints,
        body: bytes | None,
        subset: frozenset[str] | None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        """Decide for an HTTP request; ``body`` None or empty means a request without a body.
        ``record_after_answer``: as for ``pick``; the caller records as soon as it has answered,
        with no await between."""
        trace = self.tracer.begin(hints.trace_headers) if self.tracer is not None else None
        parsed: InferenceRequestBody | None = None
        if body:
            started = STAGE_TIMES.start()
            try:
                parsed = parse_request_body(body, hints.path)
            except BadRequestBody as exc:
                answer = RoutingAnswer(PickOutcome.BAD_REQUEST, reason=str(exc))
                if trace is not None:
                    trace.stage("parse", trace.started_ns)
                    self._finish_trace(trace, answer)
                return answer
            finally:
                STAGE_TIMES.stop("body_parse", started)
            if trace is not None:
                trace.stage("parse", trace.started_ns)
        replacement: bytes | None = None
        if self.model_rewrites is not None and parsed is not None and body:
            target = self.model_rewrites.rewrite(parsed.model, self._rewrite_rng.random())
            if target is not None and target != parsed.model:
                # The body parsed once already: it is a JSON object.
                replacement = with_model(body, target)
                parsed = replace(parsed, model=target)
        answer = await self.decide_parsed(
            hints, parsed, subset, trace=trace, record_after_answer=record_after_answer
        )
        answer.body_replacement = replacement
        return answer

    async def decide_parsed(
        self,
        hints: RequestHints,
        parsed: InferenceRequestBody | None,
        subset: frozenset[str] | None,
        token_ids: Sequence[int] | None = None,
        trace: DecisionTrace | None = None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        """Decide for a body the transport has parsed already; ``token_ids``, when the transport
        read the prompt's ids itself, stand for ``parsed``'s prompt. ``trace``: the decision's
        stages so far, when it is traced (a body the transport parsed starts one here).
        ``record_after_answer``: as for ``decide_body``, unless traced (a trace reports the
        recorded prediction)."""
        if trace is None and self.tracer is not None:
            trace = self.tracer.begin(hints.trace_headers)
        defer = record_after_answer and trace is None
        ids: Sequence[int] = ()
        untokenized = 0
        tokenize_error: Exception | None = None
        if token_ids is not None:
            ids = token_ids
        elif parsed is not None:
            started = STAGE_TIMES.start()
            tokenize_ns = trace_clock() if trace is not None else 0
            try:
                ids, untokenized = await self.leading_token_ids(parsed)
            except TemplateError as exc:
                reason = f"chat template rejected the messages: {exc}"
                answer = RoutingAnswer(PickOutcome.BAD_REQUEST, reason=reason, body=parsed)
                if trace is not None:
                    trace.stage("tokenize", tokenize_ns)
                    self._finish_trace(trace, answer)
                return answer
            except Exception as exc:
                tokenize_error = exc
            finally:
                STAGE_TIMES.stop("tokenize", started)
            if trace is not None and parsed.prompt_token_ids is None:
                trace.stage("tokenize", tokenize_ns)
        request = self._request_for(hints, ids, parsed, subset, untokenized)
        if tokenize_error is not None:
            decision = self.internal(request, tokenize_error)
        else:
            decision = await self.admit_and_pick(request, trace, record_after_answer=defer)
        decision.body = parsed
        if untokenized and decision.routed and parsed is not None and self.config.tokenize_placed_chars:
            self._place_whole_prompt_soon(request.request_id, parsed)
        if trace is not None:
            self._finish_trace(trace, decision)
        return decision

    def _place_whole_prompt_soon(self, request_id: str, parsed: InferenceRequestBody) -> None:
        """The rest of a prompt picked from its leading ids, tokenised once the answer is on
        its way (the task starts after the transport has sent it), for its placement: the
        next request that shares more of the prompt finds where it went, as when the whole
        prompt was tokenised before the pick (up to ``tokenize_placed_chars``). A long prompt
        goes to a worker thread."""
        task = asyncio.ensure_future(self._place_whole_prompt(request_id, parsed))
        self._placing.add(task)
        task.add_done_callback(self._placing.discard)

    async def settle(self) -> None:
        """Wait until every prompt being tokenised for its placement is placed."""
        while self._placing:
            await asyncio.gather(*self._placing)

    async def _place_whole_prompt(self, request_id: str, parsed: InferenceRequestBody) -> None:
        limit = min(self.config.tokenize_placed_chars, self.config.tokenize_max_chars)
        parsed = leading_prompt(parsed, limit)
        try:
            if self._tokenises_off_loop(parsed):
                ids = await asyncio.to_thread(request_token_ids, self.tokenizer, parsed)
            else:
                started = STAGE_TIMES.start()
                ids = request_token_ids(self.tokenizer, parsed)
                STAGE_TIMES.stop("tokenize_rest", started)
            self.scheduler.place_whole_prompt(request_id, ids, self.clock())
        except Exception as exc:
            # The request is routed already; only the next ones' view of it is at stake.
            self._log_error_once("placing the whole prompt", request_id, exc)

    def _finish_trace(self, trace: DecisionTrace, answer: RoutingAnswer) -> None:
        assert self.tracer is not None
        source = answer.explanation_source
        request = answer.request
        trace.attributes = decision_attributes(
            answer.outcome.value,
            answer.endpoints,
            answer.predicted,
            getattr(source, "matched_blocks", None),
            request.prompt_tokens if request is not None else 0,
            answer.reason,
        )
        try:
            self.tracer.finish(trace)
        except Exception as exc:
            # A tracing fault must cost neither the request nor the log's readability.
            self._log_error_once("tracing", request.request_id if request is not None else "", exc)

    async def admit_and_pick(
        self,
        request: SchedulingRequest,
        trace: DecisionTrace | None = None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        """Flow control first (the request may wait while the pool is saturated), then the pick.

        Nothing is awaited between admission and the pick, so the request is in kvsched's
        in-flight count before flow control next judges saturation. A failure inside flow
        control is logged and the request picked anyway: it must never cost the request.
        """
        gate = self.flow_gate
        defer = record_after_answer
        if gate is None or (request.subset is not None and not request.subset):
            return self.pick(request, trace, record_after_answer=defer)
        started = STAGE_TIMES.start()
        waited_ns = trace_clock() if trace is not None else 0
        try:
            admission = self._admit(gate, request)
            if not isinstance(admission, Admission):
                admission = await gate.wait(request.request_id, admission)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log_error_once("flow control", request.request_id, exc)
            return self.pick(request, trace, record_after_answer=defer)
        finally:
            # A request that waited is charged the loop's other work too: rare, and only
            # while the pool is saturated.
            STAGE_TIMES.stop("flow_control", started)
            if trace is not None:
                trace.stage("flow_control", waited_ns)
        return self._admitted(request, admission, trace, record_after_answer=defer)

    def decide_now(
        self,
        hints: RequestHints,
        parsed: InferenceRequestBody | None,
        subset: frozenset[str] | None,
        token_ids: Sequence[int] | None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer | Coroutine[Any, Any, RoutingAnswer]:
        """``decide_parsed`` without a task where nothing has to wait: the transport read the
        token ids, the decision is not traced, and flow control answers at once. Otherwise
        the coroutine to await for the answer.

        A task per request cost the native transport's event loop about 5% of its time
        (py-spy over ``kvsched bench epp``), and put the decision behind whatever else the
        loop had ready.

        ``record_after_answer``: an answer decided here leaves the pick's bookkeeping to
        ``record``, which the transport calls as soon as the answer is on its way and before
        anything else reaches the Scheduler.
        """
        if token_ids is None or self.tracer is not None:
            defer = record_after_answer
            return self.decide_parsed(hints, parsed, subset, token_ids, record_after_answer=defer)
        request = self._request_for(hints, token_ids, parsed, subset)
        gate = self.flow_gate
        defer = record_after_answer
        if gate is None or (request.subset is not None and not request.subset):
            answer = self.pick(request, record_after_answer=defer)
        else:
            started = STAGE_TIMES.start()
            try:
                admission: Admission | asyncio.Future[Admission] | None = self._admit(gate, request)
            except Exception as exc:
                self._log_error_once("flow control", request.request_id, exc)
                admission = None
            finally:
                STAGE_TIMES.stop("flow_control", started)
            if admission is None:
                answer = self.pick(request, record_after_answer=defer)
            elif isinstance(admission, Admission):
                answer = self._admitted(request, admission, None, record_after_answer=defer)
            else:
                return self._wait_then_pick(gate, request, admission, parsed, record_after_answer=defer)
        answer.body = parsed
        return answer

    async def _wait_then_pick(
        self,
        gate: FlowGate,
        request: SchedulingRequest,
        queued: asyncio.Future[Admission],
        parsed: InferenceRequestBody | None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        defer = record_after_answer
        try:
            admission = await gate.wait(request.request_id, queued)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log_error_once("flow control", request.request_id, exc)
            answer = self.pick(request, record_after_answer=defer)
        else:
            answer = self._admitted(request, admission, None, record_after_answer=defer)
        answer.body = parsed
        return answer

    def _admit(self, gate: FlowGate, request: SchedulingRequest) -> Admission | asyncio.Future[Admission]:
        objective = self.scheduler.resolve_objective(request)
        item = FlowItem(
            request.request_id,
            priority=objective.priority,
            fairness_id=request.fairness_id or "",
            slo_ttft_ms=objective.slo_ttft_ms,
        )
        return gate.admit_now(item)

    def _admitted(
        self,
        request: SchedulingRequest,
        admission: Admission,
        trace: DecisionTrace | None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        if admission.rejected:
            outcome = PickOutcome.SHED if admission.http_status == 429 else PickOutcome.QUEUE_TIMEOUT
            return RoutingAnswer(outcome, reason=admission.reason, request=request)
        return self.pick(request, trace, record_after_answer=record_after_answer)

    async def token_ids(self, parsed: InferenceRequestBody) -> Sequence[int]:
        """The prompt's ids, all of them (up to ``tokenize_max_chars``)."""
        ids, _ = await self._tokenize(parsed, None)
        return ids

    async def leading_token_ids(self, parsed: InferenceRequestBody) -> tuple[Sequence[int], int]:
        """The prompt's ids for a pick, and the tokens after them left untokenised: a text
        prompt past ``tokenize_held_prefix_above_chars`` stops where no endpoint holds it."""
        if not self.config.tokenize_held_prefix_above_chars or parsed.prompt_token_ids is not None:
            return await self._tokenize(parsed, None)
        scheduler, model = self.scheduler, parsed.model

        def held(ids: Sequence[int]) -> bool:
            return scheduler.prefix_held(ids, model=model)

        return await self._tokenize(parsed, held)

    async def _tokenize(
        self, parsed: InferenceRequestBody, held: Callable[[Sequence[int]], bool] | None
    ) -> tuple[Sequence[int], int]:
        if parsed.prompt_token_ids is not None:
            return parsed.prompt_token_ids, 0
        # A prefix is all routing needs; an enormous prompt must not cost seconds of CPU and a
        # gigabyte of memory before the model server refuses it.
        parsed = leading_prompt(parsed, self.config.tokenize_max_chars)
        render = getattr(self.tokenizer, "render_token_ids", None)
        if render is not None and (rendered := await render(parsed)) is not None:
            # Worker-render mode: a worker's render endpoint gave the ids.
            return cast(Sequence[int], rendered), 0
        tokenize = partial(
            leading_request_token_ids,
            self.tokenizer,
            parsed,
            held,
            self.config.tokenize_held_prefix_above_chars,
        )
        if self._tokenises_off_loop(parsed):
            # Tokenisers release the GIL; a long prompt must not stall every other stream.
            # ``held`` then reads the index from that thread: each of its reads is one native
            # call under the GIL, and a read that misses a concurrent update only moves where
            # tokenising stops.
            return await asyncio.to_thread(tokenize)
        return tokenize()

    def _tokenises_off_loop(self, parsed: InferenceRequestBody) -> bool:
        """Whether ``parsed``'s prompt is long enough to tokenise on a worker thread (and the
        tokenizer lets go of the GIL, so the thread runs beside the event loop)."""
        size = len(parsed.prompt_text or "") + sum(len(message.content) for message in parsed.messages)
        return size > self.config.tokenize_in_thread_chars and getattr(self.tokenizer, "releases_gil", True)

    def _request_for(
        self,
        hints: RequestHints,
        token_ids: Sequence[int],
        parsed: InferenceRequestBody | None,
        subset: frozenset[str] | None,
        untokenized_tokens: int = 0,
    ) -> SchedulingRequest:
        return self.scheduling_request(
            hints,
            token_ids,
            model=parsed.model if parsed else None,
            max_tokens=parsed.max_tokens if parsed else None,
            subset=subset,
            untokenized_tokens=untokenized_tokens,
        )

    @staticmethod
    def scheduling_request(
        hints: RequestHints,
        token_ids: Sequence[int],
        *,
        model: str | None,
        max_tokens: int | None,
        subset: frozenset[str] | None,
        untokenized_tokens: int = 0,
    ) -> SchedulingRequest:
        return SchedulingRequest(
            request_id=hints.request_id,
            token_ids=token_ids,
            model=model,
            subset=subset,
            objective=hints.objective,
            slo_ttft_ms=hints.slo_ttft_ms,
            slo_tpot_ms=hints.slo_tpot_ms,
            fairness_id=hints.fairness_id,
            max_tokens=max_tokens,
            session_id=hints.session_id,
            untokenized_tokens=untokenized_tokens,
        )

    def pick(
        self,
        request: SchedulingRequest,
        trace: DecisionTrace | None = None,
        *,
        record_after_answer: bool = False,
    ) -> RoutingAnswer:
        """The Scheduler's pick as an answer. ``record_after_answer``: the answer carries the
        pick's bookkeeping (``unrecorded``) for ``record`` to do once it is sent: measured in
        ``kvsched demo``, that bookkeeping was 0.31-0.34 ms at p50 of the 1.1-1.2 ms between
        the end of a request's body and its answer."""
        if request.subset is not None and not request.subset:
            # GIE protocol: an empty subset hint means nothing is eligible -> 503.
            return RoutingAnswer(
                PickOutcome.NO_ENDPOINTS, reason="the gateway's subset hint is empty", request=request
            )
        now = self.clock()
        started = STAGE_TIMES.start()
        scheduler = self.scheduler
        try:
            choice = scheduler.choose(request, now)
            result = choice.result if record_after_answer else scheduler.record(choice)
            if result.status == "ok" and not result.endpoints:
                raise RuntimeError("scheduler answered ok without an endpoint")
        except Exception as exc:
            return self.internal(request, exc, now)
        finally:
            STAGE_TIMES.stop("pick", started)
        if trace is not None and result.stage_ns is not None:
            lookup_ns, score_ns, predict_ns, end_ns = result.stage_ns
            trace.stage("lookup", lookup_ns, score_ns)
            trace.stage("score", score_ns, predict_ns)
            trace.stage("predict", predict_ns, end_ns)
        if result.status == "ok":
            outcome, reason = PickOutcome.ROUTED, result.reason
        elif result.status == "shed":
            outcome, reason = PickOutcome.SHED, result.reason or "shed"
        else:
            outcome, reason = PickOutcome.NO_ENDPOINTS, result.reason or "no endpoint available"
        answer = RoutingAnswer(outcome, list(result.endpoints), reason, result, request, decided_at=now)
        if record_after_answer and choice.unrecorded is not None:
            answer.unrecorded = choice
        return answer

    def record(self, answer: RoutingAnswer) -> None:
        """The bookkeeping of a pick answered before it (``pick(record_after_answer=True)``); the
        answer's prediction is then the recorded one. Idempotent."""
        choice = answer.unrecorded
        if choice is None:
            return
        answer.unrecorded = None
        started = STAGE_TIMES.start()
        try:
            answer.explanation_source = self.scheduler.record(choice)
        except Exception as exc:
            # The request is routed already. Unless the Scheduler still holds the choice (its
            # next pick then records it), it goes on uncounted in flight: its completion finds
            # nothing to release, and a scrape corrects the load.
            request_id = "" if answer.request is None else answer.request.request_id
            self._log_error_once("pick bookkeeping", request_id, exc)
            self.stats.count("internal_error")
        finally:
            STAGE_TIMES.stop("pick_record", started)

    def internal(
        self, request: SchedulingRequest, error: Exception, now: float | None = None
    ) -> RoutingAnswer:
        """Picking raised: fall back or fail the stream, as configured."""
        if now is None:
            now = self.clock()
        self._log_error_once("pick", request.request_id, error)
        description = f"{type(error).__name__}: {error}"
        if self.config.on_internal_error == "grpc_error":
            return RoutingAnswer(PickOutcome.INTERNAL_ERROR, reason=description, request=request, error=error)
        try:
            endpoints = list(self.scheduler.fallback_pick(request, now))
        except Exception as fallback_error:
            self._log_error_once("fallback", request.request_id, fallback_error)
            return RoutingAnswer(
                PickOutcome.INTERNAL_ERROR,
                reason=f"{description}; fallback failed: {type(fallback_error).__name__}: {fallback_error}",
                request=request,
                error=fallback_error,
            )
        if not endpoints:
            return RoutingAnswer(
                PickOutcome.NO_ENDPOINTS,
                reason=f"{description}; no healthy endpoint to fall back to",
                request=request,
            )
        return RoutingAnswer(
            PickOutcome.ROUTED_FALLBACK,
            endpoints,
            f"picking failed ({description}); least-loaded fallback",
            {"fallback": True, "error": description},
            request,
            decided_at=now,
        )

    def _log_error_once(self, stage: str, request_id: str, error: Exception) -> None:
        # Full traceback once per kind of failure; after that the counters tell the rate.
        key = f"{stage}:{type(error).__name__}"
        if key in self._logged_errors:
            log.debug("%s failed again for request %s: %r", stage, request_id, error)
            return
        self._logged_errors.add(key)
        log.error("%s failed for request %s", stage, request_id, exc_info=error)
