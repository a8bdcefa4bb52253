"""One routing decision: request body -> token ids -> Scheduler.pick, with the error policy.

Shared by the ext_proc servicer and the kvsched.v1 API. Decision logic stays in the Scheduler;
this only maps its answers (and its failures) onto the Endpoint Picker's outcomes
(``PickOutcome``), one ``RoutingAnswer`` per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.headers import RequestHints
from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.flow_gate import FlowGate
from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.adapters.tokenizer import PromptTokenizer, TemplateError, request_token_ids
from scheduler.codec.openai import BadRequestBody, InferenceRequestBody, parse_request_body
from scheduler.core.flowcontrol import FlowItem
from scheduler.core.lookup import PrefixLookup
from scheduler.core.objectives import ResolvedObjective
from scheduler.core.scheduler import Endpoint, PickResult, SchedulingRequest

log = logging.getLogger(__name__)


class SchedulerPort(Protocol):
    """The Scheduler facade methods the Endpoint Picker calls."""

    def endpoints(self) -> list[Endpoint]: ...

    def pick(self, request: SchedulingRequest, now: float) -> PickResult: ...

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
    def routed(self) -> bool:
        return self.outcome.routed


class PickRunner:
    def __init__(
        self,
        scheduler: SchedulerPort,
        config: ExtProcConfig,
        tokenizer: PromptTokenizer,
        clock: Callable[[], float],
        stats: ExtProcStats,
        flow_gate: FlowGate | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.tokenizer = tokenizer
        self.clock = clock
        self.stats = stats
        self.flow_gate = flow_gate
        self._logged_errors: set[str] = set()

    async def decide_body(
        self, hints: RequestHints, body: bytes | None, subset: frozenset[str] | None
    ) -> RoutingAnswer:
        """Decide for an HTTP request; ``body`` None or empty means a request without a body."""
        parsed: InferenceRequestBody | None = None
        if body:
            started = STAGE_TIMES.start()
            try:
                parsed = parse_request_body(body, hints.path)
            except BadRequestBody as exc:
                return RoutingAnswer(PickOutcome.BAD_REQUEST, reason=str(exc))
            finally:
                STAGE_TIMES.stop("body_parse", started)
        return await self.decide_parsed(hints, parsed, subset)

    async def decide_parsed(
        self,
        hints: RequestHints,
        parsed: InferenceRequestBody | None,
        subset: frozenset[str] | None,
        token_ids: Sequence[int] | None = None,
    ) -> RoutingAnswer:
        """Decide for a body the transport has parsed already; ``token_ids``, when the transport
        read the prompt's ids itself, stand for ``parsed``'s prompt."""
        ids: Sequence[int] = ()
        tokenize_error: Exception | None = None
        if token_ids is not None:
            ids = token_ids
        elif parsed is not None:
            started = STAGE_TIMES.start()
            try:
                ids = await self.token_ids(parsed)
            except TemplateError as exc:
                reason = f"chat template rejected the messages: {exc}"
                return RoutingAnswer(PickOutcome.BAD_REQUEST, reason=reason, body=parsed)
            except Exception as exc:
                tokenize_error = exc
            finally:
                STAGE_TIMES.stop("tokenize", started)
        request = self.scheduling_request(
            hints,
            ids,
            model=parsed.model if parsed else None,
            max_tokens=parsed.max_tokens if parsed else None,
            subset=subset,
        )
        if tokenize_error is not None:
            decision = self.internal(request, tokenize_error)
        else:
            decision = await self.admit_and_pick(request)
        decision.body = parsed
        return decision

    async def admit_and_pick(self, request: SchedulingRequest) -> RoutingAnswer:
        """Flow control first (the request may wait while the pool is saturated), then the pick.

        Nothing is awaited between admission and the pick, so the request is in kvsched's
        in-flight count before flow control next judges saturation. A failure inside flow
        control is logged and the request picked anyway: it must never cost the request.
        """
        gate = self.flow_gate
        if gate is None or (request.subset is not None and not request.subset):
            return self.pick(request)
        started = STAGE_TIMES.start()
        try:
            objective = self.scheduler.resolve_objective(request)
            item = FlowItem(
                request.request_id,
                priority=objective.priority,
                fairness_id=request.fairness_id or "",
                slo_ttft_ms=objective.slo_ttft_ms,
            )
            admission = await gate.acquire(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log_error_once("flow control", request.request_id, exc)
            return self.pick(request)
        finally:
            # A request that waited is charged the loop's other work too: rare, and only
            # while the pool is saturated.
            STAGE_TIMES.stop("flow_control", started)
        if admission.rejected:
            outcome = PickOutcome.SHED if admission.http_status == 429 else PickOutcome.QUEUE_TIMEOUT
            return RoutingAnswer(outcome, reason=admission.reason, request=request)
        return self.pick(request)

    async def token_ids(self, parsed: InferenceRequestBody) -> Sequence[int]:
        if parsed.prompt_token_ids is not None:
            return parsed.prompt_token_ids
        render = getattr(self.tokenizer, "render_token_ids", None)
        if render is not None and (rendered := await render(parsed)) is not None:
            # Worker-render mode: a worker's render endpoint gave the ids.
            return cast(Sequence[int], rendered)
        size = len(parsed.prompt_text or "") + sum(len(message.content) for message in parsed.messages)
        if size > self.config.tokenize_in_thread_chars and getattr(self.tokenizer, "releases_gil", True):
            # Tokenisers release the GIL; a long prompt must not stall every other stream.
            return await asyncio.to_thread(request_token_ids, self.tokenizer, parsed)
        return request_token_ids(self.tokenizer, parsed)

    @staticmethod
    def scheduling_request(
        hints: RequestHints,
        token_ids: Sequence[int],
        *,
        model: str | None,
        max_tokens: int | None,
        subset: frozenset[str] | None,
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
        )

    def pick(self, request: SchedulingRequest) -> RoutingAnswer:
        if request.subset is not None and not request.subset:
            # GIE protocol: an empty subset hint means nothing is eligible -> 503.
            return RoutingAnswer(
                PickOutcome.NO_ENDPOINTS, reason="the gateway's subset hint is empty", request=request
            )
        now = self.clock()
        started = STAGE_TIMES.start()
        try:
            result = self.scheduler.pick(request, now)
            if result.status == "ok" and not result.endpoints:
                raise RuntimeError("scheduler answered ok without an endpoint")
        except Exception as exc:
            return self.internal(request, exc, now)
        finally:
            STAGE_TIMES.stop("pick", started)
        if result.status == "ok":
            outcome, reason = PickOutcome.ROUTED, result.reason
        elif result.status == "shed":
            outcome, reason = PickOutcome.SHED, result.reason or "shed"
        else:
            outcome, reason = PickOutcome.NO_ENDPOINTS, result.reason or "no endpoint available"
        return RoutingAnswer(outcome, list(result.endpoints), reason, result, request, decided_at=now)

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
