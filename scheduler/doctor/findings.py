"""What ``kvsched doctor`` found: one finding per check, per endpoint and for the pool, in words.

A finding is ``ok``, ``warn`` (precise routing works, but something will hurt: no replay socket,
a skewed clock), ``fail`` (precise cache-aware routing cannot work for that endpoint until it is
fixed) or ``skip`` (a check that could not run because an earlier one failed). Every warn and
fail says what to change (``fix``). The report renders as text for people and as JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


class Check(Enum):
    """Every check, in the order a report lists them."""

    ENDPOINTS = "endpoints"
    REACHABLE = "reachable"
    METRICS = "metrics"
    PREFIX_CACHING = "prefix_caching"
    KV_CONNECT = "kv_connect"
    KV_EVENTS = "kv_events"
    KV_TOPIC = "kv_topic"
    BLOCK_SIZE = "block_size"
    HASH = "hash"
    PREFIX_MATCH = "prefix_match"
    SEQUENCE = "sequence"
    CLOCK = "clock"
    REPLAY = "replay"
    TOKENIZER = "tokenizer"


_ORDER = {check: position for position, check in enumerate(Check)}


@dataclass(slots=True)
class Finding:
    check: Check
    status: Status
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "check": self.check.value,
            "status": self.status.value,
            "message": self.message,
        }
        if self.fix:
            out["fix"] = self.fix
        if self.details:
            out["details"] = self.details
        return out


@dataclass(slots=True)
class EndpointReport:
    name: str
    address: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: Check, status: Status, message: str, fix: str = "", **details: Any) -> Finding:
        finding = Finding(check, status, message, fix, dict(details))
        self.findings.append(finding)
        return finding

    def status_of(self, check: Check) -> Status | None:
        return next((f.status for f in self.findings if f.check is check), None)

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.status is Status.FAIL]

    @property
    def warned(self) -> list[Finding]:
        return [f for f in self.findings if f.status is Status.WARN]

    def ordered(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: _ORDER[f.check])

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "ok": not self.failed,
            "checks": [f.as_dict() for f in self.ordered()],
        }


@dataclass(slots=True)
class DoctorReport:
    source: str  # where the endpoints came from
    settings: dict[str, Any]  # the index, topic and tokenizer settings checked against
    pool: EndpointReport = field(default_factory=lambda: EndpointReport("pool", ""))
    endpoints: list[EndpointReport] = field(default_factory=list)

    def _all(self) -> Iterable[EndpointReport]:
        return [self.pool, *self.endpoints]

    @property
    def failures(self) -> int:
        return sum(len(r.failed) for r in self._all())

    @property
    def warnings(self) -> int:
        return sum(len(r.warned) for r in self._all())

    def ok(self, *, strict: bool = False) -> bool:
        return self.failures == 0 and (not strict or self.warnings == 0)

    def verdict(self) -> str:
        broken = [r.name for r in self.endpoints if r.failed]
        causes = sorted({f.check.value for r in self._all() for f in r.failed})
        if self.failures == 0:
            warned = f"; {self.warnings} warning(s) to look at" if self.warnings else ""
            return f"precise cache-aware routing can work on all {len(self.endpoints)} endpoint(s){warned}"
        where = f"{len(broken)} of {len(self.endpoints)} endpoint(s)" if broken else "the pool"
        return (
            f"precise cache-aware routing cannot work on {where}: {self.failures} problem(s) "
            f"({', '.join(causes)}); fix the FAIL lines above"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.failures == 0,
            "verdict": self.verdict(),
            "failures": self.failures,
            "warnings": self.warnings,
            "source": self.source,
            "settings": self.settings,
            "pool": [f.as_dict() for f in self.pool.ordered()],
            "endpoints": [r.as_dict() for r in self.endpoints],
        }

    def render(self) -> str:
        settings = ", ".join(f"{key} {value}" for key, value in self.settings.items())
        lines = [f"kvsched doctor: {len(self.endpoints)} endpoint(s) from {self.source}; {settings}", ""]
        for report in [*self.endpoints, self.pool]:
            if not report.findings:
                continue
            lines.append(
                report.name
                if report.name == report.address or not report.address
                else f"{report.name} ({report.address})"
            )
            for finding in report.ordered():
                label = finding.status.value.upper() if finding.status is not Status.OK else "ok"
                lines.append(f"  {label:<5} {finding.check.value:<15} {finding.message}")
                if finding.fix:
                    lines.append(f"  {'':<5} {'':<15} fix: {finding.fix}")
            lines.append("")
        lines.append(self.verdict())
        return "\n".join(lines)
