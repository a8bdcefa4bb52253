"""Outcome counters and the per-decision audit line (logger ``kvsched.audit``, one JSON object).

Besides the decision and what the request measured, a line carries ``logged_at`` (wall-clock
seconds) and ``prompt_blocks`` (the prompt's prefix identity per 512-token block, as the
Mooncake trace format has it), so that a recorded audit log replays as a trace
(``kvsched tune --trace``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from scheduler.adapters.extproc.outcomes import PickOutcome
from scheduler.workloads.mooncake import prompt_block_ids

audit_log = logging.getLogger("kvsched.audit")

# Every way a request can leave the Endpoint Picker; each is counted exactly once per request,
# plus how each routed request ended (kvsched.v1 Report: completed/failed; never reported: unreported).
PICK_OUTCOMES = tuple(outcome.value for outcome in PickOutcome)
RESPONSE_OUTCOMES = ("completed", "upstream_error", "cancelled", "failed", "unreported")


class ExtProcStats:
    """In-process counters, mirrored into Prometheus when a registry is given."""

    def __init__(self, registry: Any | None = None) -> None:
        self.outcomes: Counter[str] = Counter()
        self._counter: Any = None
        self._decision_seconds: Any = None
        self._children: dict[str, Any] = {}
        if registry is not None:
            from prometheus_client import Counter as PromCounter
            from prometheus_client import Histogram

            self._counter = PromCounter(
                "kvsched_picker_requests",
                "Requests handled by the Endpoint Picker, by outcome.",
                ["outcome"],
                registry=registry,
            )
            self._decision_seconds = Histogram(
                "kvsched_picker_decision_seconds",
                "Time from the complete request (end of body) to the routing answer.",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
                registry=registry,
            )
            for outcome in PICK_OUTCOMES + RESPONSE_OUTCOMES:
                self._counter.labels(outcome)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self._counter is not None:
            child = self._children.get(outcome)
            if child is None:
                # labels() takes a lock and builds a key on every call: once per outcome is enough.
                child = self._children[outcome] = self._counter.labels(outcome)
            child.inc()

    def observe_decision(self, seconds: float) -> None:
        if self._decision_seconds is not None:
            self._decision_seconds.observe(seconds)


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
