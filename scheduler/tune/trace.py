"""What ``kvsched tune`` replays: a Mooncake trace or kvsched's own audit log, split by time.

An audit log (``audit_log: true``; logger ``kvsched.audit``) has one JSON object per routed
request, written when the request ends, optionally behind a logging prefix. A line becomes one
trace request: its arrival is ``logged_at`` (or the prefix's timestamp) less ``e2e_ms``, its
sizes are ``prompt_tokens`` and ``completion_tokens``, and its prefix identity is
``prompt_blocks`` (one chained id per 512-token block, the Mooncake format's ``hash_ids``).
Lines written before kvsched recorded ``prompt_blocks`` replay with unshared prefixes, which is
said once, since cache-aware weights cannot be tuned on them.

The split is by time: the held-out part is the trace's last ``holdout`` share of its span, so
a policy is judged on requests that came after everything it was tuned on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.workloads.model import Workload, WorkloadRequest
from scheduler.workloads.mooncake import (
    MOONCAKE_BLOCK_TOKENS,
    block_token_matrix,
    load_mooncake,
    prompt_length,
)

log = logging.getLogger(__name__)

# The CLI's logging prefix (scheduler/cli.py): "%(asctime)s %(levelname)s %(name)s: ".
_ASCTIME = "%Y-%m-%d %H:%M:%S,%f"
# Prefix ids of audit lines without prompt_blocks: far above any id a trace or a hash uses.
_UNSHARED_BASE = 1 << 62


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message says why."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request in the Mooncake trace's terms."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _first_object(path: Path) -> dict[str, Any] | None:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            brace = line.find("{")
            if brace < 0:
                continue
            try:
                value = json.loads(line[brace:])
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def trace_kind(path: str | Path) -> str:
    """ "mooncake" or "audit", from the first JSON object in the file."""
    first = _first_object(Path(path))
    if first is None:
        raise TraceError(f"{path}: no JSON object found (expected a Mooncake trace or a kvsched audit log)")
    if "hash_ids" in first:
        return "mooncake"
    if "request_id" in first and "decision" in first:
        return "audit"
    raise TraceError(f"{path}: neither a Mooncake trace (hash_ids) nor a kvsched audit log (decision)")


def _logged_at(line: str, record: dict[str, Any]) -> float | None:
    value = record.get("logged_at")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    try:
        return datetime.strptime(line[:23], _ASCTIME).timestamp()
    except ValueError:
        return None


def _audit_records(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            brace = line.find("{")
            if brace < 0:
                continue
            try:
                record = json.loads(line[brace:])
            except ValueError:
                continue
            if isinstance(record, dict) and "decision" in record:
                yield number, line, record


def audit_rows(path: str | Path) -> list[TraceRow]:
    """Trace rows of an audit log's requests that reached the scheduler with a prompt."""
    path = Path(path)
    rows: list[TraceRow] = []
    unusable = unshared = 0
    ids: dict[int, int] = {}  # the audit's 64-bit chained ids -> small dense ids
    for number, line, record in _audit_records(path):
        prompt = record.get("prompt_tokens")
        at = _logged_at(line, record)
        if not isinstance(prompt, int) or prompt < 1 or at is None:
            unusable += 1
            continue
        e2e_ms = record.get("e2e_ms")
        arrival = at - (float(e2e_ms) / 1000.0 if isinstance(e2e_ms, int | float) else 0.0)
        blocks = record.get("prompt_blocks")
        if isinstance(blocks, list) and blocks and all(isinstance(b, int) for b in blocks):
            hash_ids = tuple(ids.setdefault(block, len(ids)) for block in blocks)
        else:
            unshared += 1
            count = max(1, math.ceil(prompt / MOONCAKE_BLOCK_TOKENS))
            hash_ids = tuple(_UNSHARED_BASE + number * 4096 + i for i in range(count))
        completion = record.get("completion_tokens")
        output = completion if isinstance(completion, int) and completion > 0 else 1
        rows.append(TraceRow(arrival * 1000.0, prompt, output, hash_ids))
    if not rows:
        raise TraceError(f"{path}: no audit line with prompt_tokens and a time")
    if unusable:
        log.warning("%s: skipped %d audit line(s) without a prompt or a time", path, unusable)
    if unshared:
        log.warning(
            "%s: %d of %d audit lines carry no prompt_blocks (written by an older kvsched): their "
            "prefixes replay as unshared, so cache affinity cannot be tuned on them",
            path,
            unshared,
            len(rows),
        )
    start = min(row.timestamp_ms for row in rows)
    return sorted(
        (TraceRow(r.timestamp_ms - start, r.input_length, r.output_length, r.hash_ids) for r in rows),
        key=lambda r: r.timestamp_ms,
    )


def rows_workload(rows: Sequence[TraceRow], *, name: str, block_tokens: int) -> Workload:
    """Requests from trace rows, built as ``load_mooncake`` builds them (same tokens per id)."""
    scale = MOONCAKE_BLOCK_TOKENS / block_tokens
    unique = sorted({h for row in rows for h in row.hash_ids})
    matrix: list[list[int]] = block_token_matrix(np.array(unique, dtype=np.uint64), block_tokens).tolist()
    blocks = dict(zip(unique, matrix, strict=True))
    requests = []
    for number, row in enumerate(rows):
        tokens = list(chain.from_iterable(blocks[h] for h in row.hash_ids))
        del tokens[prompt_length(row.input_length, len(row.hash_ids), block_tokens) :]
        requests.append(
            WorkloadRequest(
                request_id=f"{name}-{number}",
                arrival_s=row.timestamp_ms / 1000.0,
                prompt_token_ids=tokens,
                max_tokens=max(1, math.ceil(row.output_length / scale)),
                block_ids=row.hash_ids,
            )
        )
    return Workload(name, requests, token_scale=scale, block_tokens=block_tokens, meta={"source": name})


def load_trace(path: str | Path, *, block_tokens: int = 16) -> Workload:
    """A Mooncake JSONL trace or a kvsched audit log, as a workload (trace blocks scaled to
    ``block_tokens`` tokens, as ``kvsched replay --trace`` does)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    if trace_kind(path) == "mooncake":
        return load_mooncake(path, block_tokens=block_tokens)
    workload = rows_workload(audit_rows(path), name=path.stem, block_tokens=block_tokens)
    workload.meta["source"] = str(path)
    workload.meta["kind"] = "audit"
    return workload


@dataclass(frozen=True, slots=True)
class Window:
    """Requests arriving in [start_s, end_s) are scored; those ``warmup_s`` before start are
    replayed first (unscored), so the window does not start on empty caches."""

    start_s: float
    end_s: float
    warmup_s: float = 0.0

    def replayed(self, requests: Sequence[WorkloadRequest]) -> list[WorkloadRequest]:
        first = self.start_s - self.warmup_s
        return [r for r in requests if first <= r.arrival_s < self.end_s]

    def scored(self, request: WorkloadRequest) -> bool:
        return self.start_s <= request.arrival_s < self.end_s

    def as_dict(self) -> dict[str, float]:
        return {"start_s": self.start_s, "end_s": self.end_s, "warmup_s": self.warmup_s}


@dataclass(frozen=True, slots=True)
class Split:
    tune: Window
    holdout: Window

    def holdout_windows(self, parts: int) -> list[Window]:
        """The held-out window cut into ``parts`` consecutive windows (each with the warm-up),
        so that one comparison is repeated on parts of the trace with their own load."""
        if parts < 1:
            raise ValueError("parts must be at least 1")
        if parts == 1:
            return [self.holdout]
        held = self.holdout
        step = (held.end_s - held.start_s) / parts
        edges = [held.start_s + i * step for i in range(parts)] + [held.end_s]
        return [Window(a, b, held.warmup_s) for a, b in itertools.pairwise(edges)]


def split_by_time(workload: Workload, *, holdout: float, tune_s: float | None, warmup_s: float) -> Split:
    """The tuning window (the trace's start, at most ``tune_s`` long, before the held-out part)
    and the held-out window (the last ``holdout`` share of the span, after ``warmup_s``)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError("holdout must be between 0 and 1")
    if not workload.requests:
        raise TraceError(f"{workload.name}: no requests")
    first = min(r.arrival_s for r in workload.requests)
    last = max(r.arrival_s for r in workload.requests)
    at = first + (1.0 - holdout) * (last - first)
    tune_end = at if tune_s is None else min(at, first + tune_s)
    # The held-out window is closed at the end: nextafter keeps the last request in it.
    return Split(Window(first, tune_end), Window(at, math.nextafter(last, math.inf), warmup_s))
