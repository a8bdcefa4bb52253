"""``kvsched.v1.EndpointPicker``: Pick / Report for gateways that do not speak ext_proc, and
Lookup, the read-only question of what every endpoint holds of a prompt."""

from __future__ import annotations

import importlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import grpc

from scheduler.adapters.extproc.audit import (
    audit_enabled,
    milliseconds,
    primary_summary,
    prompt_blocks,
    write_audit,
)
from scheduler.adapters.extproc.decide import PickRunner, RoutingAnswer
from scheduler.adapters.extproc.headers import RequestHints, request_hints
from scheduler.adapters.extproc.lookup import BadLookup, PromptLookup
from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.tokenizer import TemplateError
from scheduler.codec.openai import BadRequestBody, ChatMessage, InferenceRequestBody, parse_request_body
from scheduler.core.lookup import PrefixLookup

log = logging.getLogger(__name__)


def load_picker_protos() -> tuple[Any, Any] | None:
    """The generated kvsched.v1 modules, or None when the package was built without them."""
    # Imported by name: the generated modules are untyped and excluded from type checking.
    try:
        picker_pb2 = importlib.import_module("scheduler._proto.kvsched.v1.picker_pb2")
        picker_pb2_grpc = importlib.import_module("scheduler._proto.kvsched.v1.picker_pb2_grpc")
    except ImportError:
        return None
    return picker_pb2, picker_pb2_grpc


class EndpointPickerServicer:
    def __init__(self, runner: PickRunner, stats: ExtProcStats, max_pending: int, pb2: Any) -> None:
        self._runner = runner
        self._stats = stats
        self._max_pending = max_pending
        self._pb2 = pb2
        self._lookups = PromptLookup(runner.scheduler, runner)
        # request_id -> (time picked, decision) until Report; bounded, oldest released first.
        self._pending: OrderedDict[str, tuple[float, RoutingAnswer]] = OrderedDict()
        self._statuses = {
            "routed": pb2.PickResponse.OK,
            "routed_fallback": pb2.PickResponse.OK,
            "no_endpoints": pb2.PickResponse.NO_ENDPOINTS,
            "shed": pb2.PickResponse.SHED,
            # Waited out in flow control: the gateway answers 503, as for no endpoint.
            "queue_timeout": pb2.PickResponse.NO_ENDPOINTS,
            "bad_request": pb2.PickResponse.BAD_REQUEST,
        }

    async def Pick(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        headers = {key.lower(): value for key, value in request.headers.items()}
        if request.request_id:
            headers["x-request-id"] = request.request_id
        hints = request_hints(headers, self._runner.config.session_header)
        if hints.request_id in self._pending:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {hints.request_id} was picked and not reported yet"
            )
        subset = frozenset(request.subset.endpoints) if request.HasField("subset") else None
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        model = request.model or None
        prompt = request.WhichOneof("prompt")
        if prompt == "openai_body":
            hints = replace(hints, path=request.openai_body.path or None)
            decision = await self._runner.decide_body(hints, request.openai_body.body, subset)
        else:
            decision = await self._pick_prompt(request, prompt, hints, model, max_tokens, subset)
        if decision.outcome == "internal_error":
            self._stats.count("internal_error")
            await context.abort(grpc.StatusCode.INTERNAL, f"endpoint picking failed: {decision.reason}")
        self._stats.count(decision.outcome)
        if decision.routed:
            self._remember(hints.request_id, decision)
        else:
            _audit(hints.request_id, decision, decision.outcome)
        return self._pb2.PickResponse(
            status=self._statuses[decision.outcome],
            endpoints=decision.endpoints,
            reason=decision.reason,
            explanation_json=json.dumps(decision.explanation, default=str),
            request_id=hints.request_id,
        )

    async def _pick_prompt(
        self,
        request: Any,
        prompt: str | None,
        hints: RequestHints,
        model: str | None,
        max_tokens: int | None,
        subset: frozenset[str] | None,
    ) -> RoutingAnswer:
        token_ids: Sequence[int] = ()
        untokenized = 0
        error: Exception | None = None
        try:
            if prompt == "token_ids":
                token_ids = list(request.token_ids.ids)
            elif prompt == "prompt_text":
                body = InferenceRequestBody("completions", model=model, prompt_text=request.prompt_text)
                token_ids, untokenized = await self._runner.leading_token_ids(body)
        except TemplateError as exc:
            return RoutingAnswer(PickOutcome.BAD_REQUEST, reason=str(exc))
        except Exception as exc:
            error = exc
        scheduling = self._runner.scheduling_request(
            hints,
            token_ids,
            model=model,
            max_tokens=max_tokens,
            subset=subset,
            untokenized_tokens=untokenized,
        )
        if error is not None:
            return self._runner.internal(scheduling, error)
        return await self._runner.admit_and_pick(scheduling)

    async def Lookup(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            body = _lookup_body(request)
            found = await self._lookups.lookup(body)
        except (BadLookup, BadRequestBody) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            log.exception("kvsched.v1 Lookup failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"lookup failed: {type(exc).__name__}: {exc}")
        return _lookup_response(self._pb2, found)

    def _remember(self, request_id: str, decision: RoutingAnswer) -> None:
        picked_at = decision.decided_at if decision.decided_at is not None else self._runner.clock()
        self._pending[request_id] = (picked_at, decision)
        while len(self._pending) > self._max_pending:
            stale_id, (_, stale) = self._pending.popitem(last=False)
            # Never reported: release it so the endpoint's load does not stay inflated.
            self._runner.scheduler.on_failed(stale_id, self._runner.clock())
            self._stats.count("unreported")
            _audit(stale_id, stale, "unreported")

    async def Report(self, completion: Any, context: grpc.aio.ServicerContext) -> Any:
        entry = self._pending.pop(completion.request_id, None)
        if entry is None:
            return self._pb2.ReportAck(known=False)
        picked_at, decision = entry
        scheduler = self._runner.scheduler
        ttft_ms = completion.ttft_ms if completion.HasField("ttft_ms") else None
        e2e_ms = completion.e2e_ms if completion.HasField("e2e_ms") else None
        now = picked_at + e2e_ms / 1000.0 if e2e_ms is not None else self._runner.clock()
        if completion.failed:
            scheduler.on_failed(completion.request_id, now)
            outcome = "failed"
        else:
            if ttft_ms is not None:
                scheduler.on_first_token(completion.request_id, picked_at + ttft_ms / 1000.0)
            cached = completion.cached_tokens if completion.HasField("cached_tokens") else None
            generated = completion.completion_tokens if completion.HasField("completion_tokens") else None
            scheduler.on_completed(
                completion.request_id,
                now,
                served=completion.served or decision.endpoints[0],
                cached_tokens=cached,
                completion_tokens=generated,
            )
            outcome = "completed"
        self._stats.count(outcome)
        _audit(
            completion.request_id,
            decision,
            outcome,
            served=completion.served or None,
            ttft_ms=ttft_ms,
            e2e_ms=milliseconds(now - picked_at),
            cached_tokens=completion.cached_tokens if completion.HasField("cached_tokens") else None,
            completion_tokens=completion.completion_tokens
            if completion.HasField("completion_tokens")
            else None,
        )
        return self._pb2.ReportAck(known=True)

    async def release_all(self) -> None:
        """At shutdown: picks that will never be reported are released."""
        now = self._runner.clock()
        while self._pending:
            request_id, _ = self._pending.popitem(last=False)
            self._runner.scheduler.on_failed(request_id, now)


def _lookup_body(request: Any) -> InferenceRequestBody:
    model = request.model or None
    prompt = request.WhichOneof("prompt")
    if prompt == "token_ids":
        return InferenceRequestBody("completions", model, prompt_token_ids=list(request.token_ids.ids))
    if prompt == "prompt_text":
        return InferenceRequestBody("completions", model, prompt_text=request.prompt_text)
    if prompt == "messages":
        messages = tuple(ChatMessage(m.role, m.content) for m in request.messages.messages)
        return InferenceRequestBody("chat", model, messages=messages)
    if prompt == "openai_body":
        body = parse_request_body(request.openai_body.body, request.openai_body.path or None)
        return body if model is None else replace(body, model=model)
    raise BadLookup("the request names no prompt (token_ids, prompt_text, messages or openai_body)")


def _lookup_response(pb2: Any, found: PrefixLookup) -> Any:
    return pb2.LookupResponse(
        model=found.model or "",
        prompt_tokens=found.prompt_tokens,
        prompt_blocks=found.prompt_blocks,
        keys_compared=found.keys_compared,
        block_size=found.block_size,
        hash_mode=found.hash_mode,
        endpoints=[
            pb2.EndpointPrefix(
                name=endpoint.name,
                address=endpoint.address,
                healthy=endpoint.healthy,
                source=endpoint.source,
                matched_blocks=endpoint.matched_blocks,
                ranks=[
                    pb2.RankPrefix(
                        rank=rank.rank,
                        worker=rank.worker,
                        matched_blocks=rank.matched_blocks,
                        gpu_blocks=rank.gpu_blocks,
                        cpu_blocks=rank.cpu_blocks,
                        storage_blocks=rank.storage_blocks,
                        keys_compared=rank.keys_compared,
                    )
                    for rank in endpoint.ranks
                ],
            )
            for endpoint in found.endpoints
        ],
    )


def _audit(request_id: str, decision: RoutingAnswer, outcome: str, **observed: Any) -> None:
    if not audit_enabled():
        return
    request = decision.request
    write_audit(
        {
            "request_id": request_id,
            "outcome": outcome,
            "decision": decision.outcome,
            "endpoint": decision.endpoints[0] if decision.endpoints else None,
            "fallbacks": decision.endpoints[1:],
            "reason": decision.reason or None,
            "prompt_tokens": len(request.token_ids) if request is not None else None,
            "prompt_blocks": prompt_blocks(request),
            **primary_summary(decision.explanation),
            "explanation": decision.explanation,
            **observed,
        }
    )
