"""Mooncake trace replay (Moonshot AI's Kimi traces, FAST'25; Apache-2.0).

Each JSONL line: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
(one id per 512-token block; equal ids mean an identical whole prefix). Each hash id
becomes a deterministic block of token ids (a function of the id alone), so equal ids
give equal prefixes. ``block_tokens`` scales the 512-token blocks down (16 keeps the
exact prefix structure at 1/32 of the tokens); the workload's ``token_scale`` records the
factor so the latency model and the reports can scale back. The last block is partial
when ``input_length`` says so, scaled in proportion.

Token ``j`` of the block for id ``h`` is ``splitmix64(h * 512 + j)`` folded into
``1..VOCAB-1`` (id 0 is left out: some tokenizers reserve it), so a block scaled down to
``n`` tokens is the first ``n`` tokens of the full one.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.core import blockhash_ref
from scheduler.workloads.model import Workload, WorkloadRequest

MOONCAKE_BLOCK_TOKENS = 512
# The command-line option of ``load_mooncake(arrival_step_ms=...)``, for every command that
# replays a trace.
ARRIVAL_STEP_HELP = (
    "trace: it records arrival times in steps of this many ms (the Mooncake conversation trace: "
    "3000); spread each step's requests over it (seeded, in recorded order) instead of sending them "
    "at one instant"
)
VOCAB = 32_000
log = logging.getLogger(__name__)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Steele, Lea & Flood's SplitMix64 finaliser: consecutive inputs give unrelated outputs.
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def block_token_matrix(hash_ids: np.ndarray, block_tokens: int) -> np.ndarray:
    """Row ``i``: the ``block_tokens`` token ids standing for trace block ``hash_ids[i]``."""
    ids = np.asarray(hash_ids, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        positions = ids * np.uint64(MOONCAKE_BLOCK_TOKENS) + np.arange(block_tokens, dtype=np.uint64)
    mixed = _splitmix64(positions)
    return (mixed % np.uint64(VOCAB - 1) + np.uint64(1)).astype(np.int64)


def _hash_module() -> Any:
    try:
        return importlib.import_module("scheduler._native.blockhash")
    except ImportError:
        return blockhash_ref


_HASHING = _hash_module()
# Root of the chains prompt_block_ids draws: any fixed value works, ids only compare with ids.
_PROMPT_ROOT = blockhash_ref.own_root_key(0x6D6F6F6E63616B65)  # "mooncake"


def prompt_block_ids(tokens: Sequence[int], block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
    """A prompt's prefix identity in the trace format: one id per block of ``block_tokens``
    tokens, the trailing partial block included, each a chained key (kvsched's own block key)
    standing for the whole prefix up to the end of its block; equal ids, equal prefixes. What
    kvsched's audit lines record, so that a recorded run replays as a Mooncake-shaped trace."""
    ids: list[int] = list(_HASHING.own_block_keys(tokens, block_tokens, _PROMPT_ROOT))
    tail = len(tokens) % block_tokens
    if tail:
        parent = ids[-1] if ids else _PROMPT_ROOT
        ids.extend(_HASHING.own_block_keys(tokens[len(tokens) - tail :], tail, parent))
    return ids


def block_tokens_for(hash_id: int, block_tokens: int) -> list[int]:
    row: list[int] = block_token_matrix(np.array([hash_id]), block_tokens)[0].tolist()
    return row


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _parse(line: str) -> tuple[float, int, int, tuple[int, ...]]:
    row = json.loads(line)
    hash_ids = tuple(int(h) for h in row["hash_ids"])
    input_length = int(row["input_length"])
    output_length = int(row["output_length"])
    timestamp_ms = float(row["timestamp"])
    if not hash_ids or min(hash_ids) < 0:
        raise ValueError("hash_ids must be a non-empty list of non-negative ids")
    if input_length < 1 or output_length < 0 or not math.isfinite(timestamp_ms):
        raise ValueError("input_length must be positive, output_length non-negative, timestamp finite")
    return timestamp_ms, input_length, output_length, hash_ids


def _read_rows(path: Path, limit: int | None) -> tuple[list[_Row], int]:
    rows: list[_Row] = []
    skipped = 0
    with open(path, encoding="utf-8") as trace:
        for number, line in enumerate(trace, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(_Row(number, *_parse(line)))
            except (ValueError, KeyError, TypeError, OverflowError) as exc:
                if not skipped:
                    log.warning(
                        "%s:%d: skipping a line that is not a Mooncake request: %s", path, number, exc
                    )
                skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)
    return rows, skipped


def prompt_length(input_length: int, blocks: int, block_tokens: int) -> int:
    """Tokens of a prompt of ``input_length`` real tokens over ``blocks`` trace blocks, scaled:
    every block but the last is full, the last keeps its share of a block (at least one token)."""
    tail = min(max(input_length - MOONCAKE_BLOCK_TOKENS * (blocks - 1), 1), MOONCAKE_BLOCK_TOKENS)
    return (blocks - 1) * block_tokens + max(1, math.ceil(tail * block_tokens / MOONCAKE_BLOCK_TOKENS))


def load_mooncake(
    path: str | Path,
    *,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    limit: int | None = None,
    time_scale: float = 1.0,
    arrival_step_ms: float | None = None,
    seed: int = 0,
) -> Workload:
    """The first ``limit`` requests of a Mooncake JSONL trace, arrivals multiplied by ``time_scale``.

    ``arrival_step_ms``: the trace records arrival times in steps of this many ms, so requests
    with one timestamp arrived somewhere in the step after it; each step's requests are spread
    over it at seeded uniform times, in their recorded order. The conversation trace is such a
    trace: its 12,031 requests share 1,180 timestamps 3,000 ms apart (2,997 at the least), up
    to 28 on one, and replayed as recorded each step's requests arrive at one instant, a burst
    that no gateway sees. None: as recorded.

    Malformed lines are skipped, counted in ``meta["skipped_lines"]`` and logged once.
    Full 512-token blocks cost memory: 16 is the practical choice for whole traces.
    """
    if not 1 <= block_tokens <= MOONCAKE_BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be in 1..{MOONCAKE_BLOCK_TOKENS}")
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    if arrival_step_ms is not None and not (math.isfinite(arrival_step_ms) and arrival_step_ms > 0):
        raise ValueError("arrival_step_ms must be a positive number of milliseconds")
    path = Path(path)
    scale = MOONCAKE_BLOCK_TOKENS / block_tokens
    rows, skipped = _read_rows(path, limit)
    unique = sorted({h for row in rows for h in row.hash_ids})
    # One vectorised pass makes every distinct block; requests then share its token list.
    matrix: list[list[int]] = block_token_matrix(np.array(unique, dtype=np.uint64), block_tokens).tolist()
    blocks = dict(zip(unique, matrix, strict=True))
    arrivals_ms = _spread_steps(rows, arrival_step_ms, seed) if arrival_step_ms else None
    requests: list[WorkloadRequest] = []
    for at, row in enumerate(rows):
        length = prompt_length(row.input_length, len(row.hash_ids), block_tokens)
        tokens = list(chain.from_iterable(blocks[h] for h in row.hash_ids))
        del tokens[length:]
        requests.append(
            WorkloadRequest(
                request_id=f"mooncake-{row.line - 1}",
                arrival_s=(row.timestamp_ms if arrivals_ms is None else arrivals_ms[at])
                / 1000.0
                * time_scale,
                prompt_token_ids=tokens,
                max_tokens=max(1, math.ceil(row.output_length / scale)),
                block_ids=row.hash_ids,
            )
        )
    requests.sort(key=lambda r: r.arrival_s)
    return Workload(
        name=path.stem,
        requests=requests,
        token_scale=scale,
        block_tokens=block_tokens,
        meta={
            "source": str(path),
            "skipped_lines": skipped,
            "trace_block_tokens": MOONCAKE_BLOCK_TOKENS,
            "arrival_step_ms": arrival_step_ms,
        },
    )


def _spread_steps(rows: Sequence[_Row], step_ms: float, seed: int) -> list[float]:
    """Per row, an arrival time within the step after its timestamp: the step's rows at
    sorted seeded uniform offsets, in file order."""
    rng = np.random.default_rng(seed)
    by_stamp: dict[float, list[int]] = {}
    for at, row in enumerate(rows):
        by_stamp.setdefault(row.timestamp_ms, []).append(at)
    arrivals = [0.0] * len(rows)
    for stamp in sorted(by_stamp):
        members = by_stamp[stamp]
        offsets = np.sort(rng.uniform(0.0, step_ms, len(members)))
        for at, offset in zip(members, offsets.tolist(), strict=True):
            arrivals[at] = stamp + offset
    return arrivals
