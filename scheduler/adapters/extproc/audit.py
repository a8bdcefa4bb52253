"""The per-decision audit line (logger ``kvsched.audit``, one JSON object per request).

Besides the decision and what the request measured, a line carries ``logged_at`` (wall-clock
seconds) and ``prompt_blocks`` (the prompt's prefix identity per 512-token block, as the
Mooncake trace format has it), so that a recorded audit log replays as a trace
(``kvsched tune --trace``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from scheduler.workloads.mooncake import prompt_block_ids

if TYPE_CHECKING:
    from scheduler.adapters.extproc.decide import RoutingAnswer
    from scheduler.adapters.extproc.usage import Usage


audit_log = logging.getLogger("kvsched.audit")


def audit_enabled() -> bool:
    """Whether audit lines are written: callers skip building a record (and the decision's
    explanation, which the Scheduler builds only when read) when they are not."""
    return audit_log.isEnabledFor(logging.INFO)


def write_audit(record: dict[str, Any]) -> None:
    if audit_log.isEnabledFor(logging.INFO):
        record.setdefault("logged_at", round(time.time(), 3))
        audit_log.info(json.dumps(record, separators=(",", ":"), default=str))


class _Prompted(Protocol):
    @property
    def token_ids(self) -> Sequence[int]: ...


def prompt_blocks(request: _Prompted | None) -> list[int] | None:
    """The prompt's prefix identity for the audit line (None: no prompt was read)."""
    return None if request is None else prompt_block_ids(request.token_ids)


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def primary_summary(explanation: dict[str, Any]) -> dict[str, Any]:
    """The primary's matched blocks and per-scorer values, from the pipeline's explanation.

    The explanation lists endpoint names under "endpoints" (primary first) and per-candidate
    details under "candidates"; baselines and the fallback path carry less, hence the guards.
    """
    names = explanation.get("endpoints")
    candidates = explanation.get("candidates")
    if isinstance(names, list) and names and isinstance(candidates, dict):
        primary = candidates.get(names[0])
        if isinstance(primary, dict):
            return {"matched_blocks": primary.get("matched_blocks"), "scores": primary.get("scores")}
    return {"matched_blocks": explanation.get("matched_blocks"), "scores": None}


def exchange_record(
    request_id: str,
    outcome: str,
    decision: RoutingAnswer,
    *,
    now: float,
    served: str | None,
    decision_s: float | None,
    http_status: int | None,
    started_at: float | None,
    first_byte_at: float | None,
    usage: Usage | None,
) -> dict[str, Any]:
    """The audit line of one ext_proc request/response pair, whichever transport carried it."""
    explanation = decision.explanation
    request = decision.request
    e2e = None if started_at is None else now - started_at
    ttft = None if first_byte_at is None or started_at is None else first_byte_at - started_at
    predicted = decision.predicted
    return {
        "request_id": request_id,
        "outcome": outcome,
        "decision": decision.outcome,
        "endpoint": decision.endpoints[0] if decision.endpoints else None,
        "fallbacks": decision.endpoints[1:],
        "served": served,
        "reason": decision.reason or None,
        "model": decision.body.model if decision.body else None,
        "prompt_tokens": request.prompt_tokens if request is not None else None,
        "prompt_blocks": prompt_blocks(request),
        **primary_summary(explanation),
        "explanation": explanation,
        "decision_ms": milliseconds(decision_s),
        "http_status": http_status,
        "predicted_ttft_ms": round(predicted[0], 3) if predicted else None,
        "predicted_tpot_ms": round(predicted[1], 3) if predicted else None,
        "prediction_source": predicted[2] if predicted else None,
        "ttft_ms": milliseconds(ttft),
        "e2e_ms": milliseconds(e2e),
        "cached_tokens": usage.cached_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }
