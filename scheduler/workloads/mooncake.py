"""Mooncake trace replay (Moonshot AI's Kimi traces, FAST'25; Apache-2.0).

Each JSONL line: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
(one id per 512-token block; equal ids mean an identical whole prefix). Each hash id
becomes a deterministic block of token ids (seeded by the id), so equal ids give equal
prefixes. ``block_tokens`` scales the 512-token blocks down (16 keeps the exact prefix
structure at 1/32 of the tokens); the workload's ``token_scale`` records the factor so
the latency model and the reports can scale back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from scheduler.workloads.model import Workload, WorkloadRequest

MOONCAKE_BLOCK_TOKENS = 512
VOCAB = 32_000


def block_tokens_for(hash_id: int, block_tokens: int) -> list[int]:
    rng = np.random.default_rng(hash_id + 1)
    tokens: list[int] = rng.integers(1, VOCAB, size=block_tokens).tolist()
    return tokens


def load_mooncake(path: str | Path, *, block_tokens: int = 16, limit: int | None = None) -> Workload:
    if not 1 <= block_tokens <= MOONCAKE_BLOCK_TOKENS:
        raise ValueError(f"block_tokens must be in 1..{MOONCAKE_BLOCK_TOKENS}")
    scale = MOONCAKE_BLOCK_TOKENS / block_tokens
    blocks: dict[int, list[int]] = {}
    requests: list[WorkloadRequest] = []
    with open(path, encoding="utf-8") as trace:
        for number, line in enumerate(trace):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                hash_ids = [int(h) for h in row["hash_ids"]]
                input_length = int(row["input_length"])
                output_length = int(row["output_length"])
                timestamp_ms = float(row["timestamp"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number + 1}: not a Mooncake trace line: {exc}") from exc
            tokens: list[int] = []
            for hash_id in hash_ids:
                block = blocks.get(hash_id)
                if block is None:
                    block = blocks[hash_id] = block_tokens_for(hash_id, block_tokens)
                tokens.extend(block)
            # The last block may be partial: input_length, scaled, says where it ends.
            length = min(len(tokens), max(1, math.ceil(input_length / scale)))
            requests.append(
                WorkloadRequest(
                    request_id=f"mooncake-{number}",
                    arrival_s=timestamp_ms / 1000.0,
                    prompt_token_ids=tokens[:length],
                    max_tokens=max(1, math.ceil(output_length / scale)),
                )
            )
    return Workload(
        name=Path(path).stem,
        requests=requests,
        token_scale=scale,
        block_tokens=block_tokens,
        meta={"source": str(path)},
    )
