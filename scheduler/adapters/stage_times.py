"""CPU time per stage of the live path, for ``kvsched bench epp``'s breakdown.

Off by default: then ``start`` returns 0 and ``stop`` returns at once, an attribute read each.
On, each stage costs two ``time.thread_time_ns`` calls (~0.3 us each: a clock_gettime of the
calling thread's CPU clock). Thread CPU time rather than wall time, so that on a shared
machine a stage is not charged for the time the OS ran another process in its middle.

One process-wide ``STAGE_TIMES``: the stages are spread over the ext_proc servicer, the pick,
the scraper and the KV-event ingest, which share nothing else, and all run on one event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_thread_ns = time.thread_time_ns


@dataclass(slots=True)
class StageTimes:
    enabled: bool = False
    # stage -> [calls, nanoseconds]
    totals: dict[str, list[int]] = field(default_factory=dict)

    def start(self) -> int:
        """A token for ``stop``; 0 while disabled."""
        return _thread_ns() if self.enabled else 0

    def stop(self, stage: str, started: int) -> None:
        """Charge the CPU time since ``start`` to ``stage``."""
        if not started:
            return
        elapsed = _thread_ns() - started
        entry = self.totals.get(stage)
        if entry is None:
            self.totals[stage] = [1, elapsed]
        else:
            entry[0] += 1
            entry[1] += elapsed

    def add(self, stage: str, nanoseconds: int, calls: int = 1) -> None:
        """Charge time measured elsewhere (another thread or process) to ``stage``."""
        if not self.enabled:
            return
        entry = self.totals.setdefault(stage, [0, 0])
        entry[0] += calls
        entry[1] += nanoseconds

    def reset(self) -> None:
        self.totals.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per stage: calls and CPU milliseconds in total."""
        return {
            stage: {"calls": calls, "cpu_ms": nanoseconds / 1e6}
            for stage, (calls, nanoseconds) in sorted(self.totals.items())
        }


STAGE_TIMES = StageTimes()
