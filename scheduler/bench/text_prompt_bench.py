"""A decision's cost for long text prompts: tokenised whole against only as far as the pool
holds them (``extproc.tokenize_held_prefix_above_chars``), in the same run.

The decision is ``PickRunner.decide_parsed`` (the path both ext_proc transports take after
the body is parsed) with the simulated pool's tokenizer (a byte-level BPE of 32,000 ids) and a
Scheduler of 8 endpoints. Prompts are the chat prompts of ``kvsched bench epp --prompt-bytes``:
distinct from their first word, so nothing of them is held, or, "half held", the same prompts
with their first half indexed on one endpoint. CPU is the process's (the tokenizer's threads
included); the baseline is the same decisions with every prompt tokenised whole."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner
from scheduler.adapters.extproc.headers import request_hints
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.codec.openai import InferenceRequestBody, parse_request_body
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler
from scheduler.sim.tokenizer import MODEL_DIR

PROMPT_BYTES = (32_000, 64_000, 220_000)


def idle_scheduler(endpoints: int) -> Scheduler:
    """``endpoints`` idle endpoints that publish KV events, each scraped once."""
    scheduler = Scheduler()
    names = [f"10.0.0.{i}:8000" for i in range(endpoints)]
    scheduler.set_endpoints([Endpoint(n, n, kv_events="tcp://x:5557") for n in names], now=0.0)
    for name in names:
        scheduler.update_metrics(name, EndpointMetrics(0, 0, 0.1), now=0.0)
    return scheduler


async def _decisions(
    parsed: list[InferenceRequestBody], *, held_above: int, half_held: bool, endpoints: int
) -> dict[str, float]:
    tokenizer = HFTokenizer.from_dir(MODEL_DIR)
    scheduler = idle_scheduler(endpoints)
    if half_held:
        # What the pool would report after serving each prompt's first half once.
        holder = "10.0.0.0:8000"
        for body in parsed:
            ids = tokenizer.token_ids(body)
            keys = [int(key) for key in scheduler.index.request_keys(ids[: len(ids) // 2])]
            scheduler.index.record_routed(holder, keys)
        tokenizer = HFTokenizer.from_dir(MODEL_DIR)  # no pieces kept from the set-up
    config = ExtProcConfig(tokenize_held_prefix_above_chars=held_above)
    runner = PickRunner(scheduler, config, tokenizer, clock=lambda: 1.0, stats=ExtProcStats())
    cpu, after, tokenized, estimated, error = [], [], [], [], []
    for body in parsed:
        hints = request_hints({":path": "/v1/chat/completions"})
        started = time.process_time()
        answer = await runner.decide_parsed(hints, body, None)
        cpu.append(time.process_time() - started)
        # The rest of a prompt picked from its leading ids is tokenised after the answer, for
        # its placement: off the request's path, not off the CPU.
        started = time.process_time()
        await runner.settle()
        after.append(time.process_time() - started)
        request = answer.request
        assert request is not None and answer.routed, answer.reason
        scheduler.on_completed(request.request_id, now=1.0)
        tokenized.append(len(request.token_ids))
        estimated.append(request.prompt_tokens)
    if held_above:
        whole = HFTokenizer.from_dir(MODEL_DIR)
        lengths = [len(whole.token_ids(body)) for body in parsed]
        error = [abs(e - n) / n for e, n in zip(estimated, lengths, strict=True)]
    return {
        "decision_cpu_ms": 1000.0 * float(np.median(cpu)),
        "after_answer_cpu_ms": 1000.0 * float(np.median(after)),
        "tokenized_tokens": float(np.median(tokenized)),
        "prompt_tokens": float(np.median(estimated)),
        "length_error": max(error) if error else 0.0,
    }


def measure_text_decisions(
    *, prompt_bytes: tuple[int, ...] = PROMPT_BYTES, prompts: int = 12, endpoints: int = 8, seed: int = 0
) -> list[dict[str, Any]]:
    from scheduler.bench.epp_bench import request_bodies

    default_above = ExtProcConfig().tokenize_held_prefix_above_chars
    rows = []
    for size in prompt_bytes:
        path, bodies = request_bodies("m", random.Random(seed), prompts, prompt_tokens=0, prompt_bytes=size)
        parsed = [parse_request_body(body, path) for body in bodies]
        for half_held in (False, True):
            whole = asyncio.run(_decisions(parsed, held_above=0, half_held=half_held, endpoints=endpoints))
            held = asyncio.run(
                _decisions(parsed, held_above=default_above, half_held=half_held, endpoints=endpoints)
            )
            rows.append(
                {
                    "prompt_bytes": size,
                    "held": "half" if half_held else "none",
                    "whole": whole,
                    "held_prefix": held,
                    "cpu_ratio": held["decision_cpu_ms"] / whole["decision_cpu_ms"],
                }
            )
    return rows


def format_text_decisions(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Text prompts: a decision's CPU (median ms), tokenised whole against only as far as the pool "
        f"holds them (prompts longer than {ExtProcConfig().tokenize_held_prefix_above_chars:,} characters; "
        "the rest tokenised after the answer, for the placement):",
        f"{'prompt bytes':>13} {'held':>5} {'whole ms':>9} {'held-prefix ms':>15} {'ratio':>6} "
        f"{'after answer ms':>16} {'tokens whole':>13} {'tokenised':>10} {'length error':>13}",
    ]
    for r in rows:
        whole, held = r["whole"], r["held_prefix"]
        lines.append(
            f"{r['prompt_bytes']:>13,} {r['held']:>5} {whole['decision_cpu_ms']:>9.1f} "
            f"{held['decision_cpu_ms']:>15.1f} {r['cpu_ratio']:>5.2f}x {held['after_answer_cpu_ms']:>16.1f} "
            f"{whole['tokenized_tokens']:>13,.0f} "
            f"{held['tokenized_tokens']:>10,.0f} {100 * held['length_error']:>12.1f}%"
        )
    return "\n".join(lines)
