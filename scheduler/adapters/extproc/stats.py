"""The Endpoint Picker's outcome counters and decision-time histogram, mirrored into Prometheus.

Apart from the audit line (``audit.py``): the decision path counts outcomes, and the audit
line is built from the decision, so the two live in separate modules.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from scheduler.adapters.extproc.outcomes import PickOutcome

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
