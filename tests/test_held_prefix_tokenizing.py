"""A long text prompt is tokenised for a pick only as far as some endpoint holds it.

Real parts: the simulated model's byte-level BPE (the files `kvsched sim` serves), the piece
cache, a Scheduler with the native index, and the PickRunner both ext_proc transports decide
through.
"""

from __future__ import annotations

import random

import pytest

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner
from scheduler.adapters.extproc.headers import request_hints
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.prompt_chunks import PromptChunks
from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.bench.text_prompt_bench import idle_scheduler
from scheduler.codec.openai import InferenceRequestBody
from scheduler.core.scheduler import Scheduler, SchedulingRequest
from scheduler.sim.tokenizer import MODEL_DIR

WORDS = ("cache", "prefix", "route", "token", "block", "worker", "gateway", "prompt", "answer", "engine")


def document(seed: int, chars: int) -> str:
    """Prose lines of distinct words: every line of one document differs from another's."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < chars:
        line = f"Doc{seed} part{len(lines)} " + " ".join(rng.choice(WORDS) for _ in range(14))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


@pytest.fixture()
def tokenizer() -> HFTokenizer:
    return HFTokenizer.from_dir(MODEL_DIR)


def test_leading_ids_stop_at_the_first_window_the_pool_does_not_hold(tokenizer: HFTokenizer) -> None:
    chunks = PromptChunks(tokenizer._tokenizer, max_bytes=1 << 24)
    text = document(1, 40_000)
    whole = tokenizer.encode(text, add_special_tokens=True)
    asked: list[int] = []

    def held(ids: object) -> bool:
        asked.append(len(ids))  # type: ignore[arg-type]
        return len(asked) < 2

    ids, left = chunks.leading_ids(text, add_special_tokens=True, held=held, window_chars=8192)
    assert len(asked) == 2 and asked[0] < asked[1] == len(ids)
    # Exactly the whole prompt's first ids, and only about two windows of it.
    assert list(ids) == whole[: len(ids)] and len(ids) < len(whole) // 2
    assert 0 < left < len(text) - 16_000 and chunks.stats.chars_left == left
    # Held to the end: the whole prompt, nothing left; without ``held`` the same.
    all_ids, none_left = chunks.leading_ids(text, add_special_tokens=True, held=lambda ids: True)
    assert list(all_ids) == whole and none_left == 0
    assert list(chunks.ids(text, add_special_tokens=True)) == whole


def _scheduler(endpoints: int = 4) -> Scheduler:
    return idle_scheduler(endpoints)


def test_prefix_held_follows_the_index_and_the_speculative_placements() -> None:
    scheduler = _scheduler()
    prompt = list(range(1, 16 * 8 + 1))  # eight full blocks
    other = list(range(1000, 1000 + 16 * 8))
    assert scheduler.prefix_held([1, 2, 3])  # no full block: nothing to judge
    assert not scheduler.prefix_held(prompt)
    keys = [int(key) for key in scheduler.index.request_keys(prompt)]
    scheduler.index.record_routed("10.0.0.2:8000", keys[:5])
    assert scheduler.prefix_held(prompt[: 16 * 5]) and not scheduler.prefix_held(prompt)
    # A pick places the whole prompt on its endpoint until the events report it.
    result = scheduler.pick(SchedulingRequest("r", prompt), now=1.0)
    assert result.endpoints[0] == "10.0.0.2:8000"
    assert scheduler.prefix_held(prompt) and not scheduler.prefix_held(prompt + other)


async def test_a_pick_tokenises_a_long_prompt_only_as_far_as_an_endpoint_holds_it(
    tokenizer: HFTokenizer,
) -> None:
    scheduler = _scheduler()
    config = ExtProcConfig(tokenize_held_prefix_above_chars=8192)
    runner = PickRunner(scheduler, config, tokenizer, clock=lambda: 1.0, stats=ExtProcStats())
    shared, novel = document(2, 40_000), document(3, 60_000)
    whole = tokenizer.encode(shared + novel, add_special_tokens=True)
    shared_ids = tokenizer.encode(shared, add_special_tokens=True)
    # One endpoint holds the shared document, as its KV events would say.
    holder = "10.0.0.3:8000"
    keys = [int(key) for key in scheduler.index.request_keys(shared_ids)]
    scheduler.index.record_routed(holder, keys)

    hints = request_hints({":path": "/v1/completions"})
    answer = await runner.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=shared + novel), None
    )
    request = answer.request
    assert answer.routed and answer.endpoints[0] == holder and request is not None
    # Tokenised through the held document and one window past it, no further; the ids are the
    # whole prompt's first ones, and the rest is estimated within 10% of its true length.
    tokenized = len(request.token_ids)
    assert len(shared_ids) < tokenized < len(shared_ids) + 4096
    assert list(request.token_ids) == whole[:tokenized]
    assert request.untokenized_tokens > 0
    assert abs(request.prompt_tokens - len(whole)) < 0.1 * len(whole)
    assert answer.explanation_source.matched_blocks == len(keys)

    # By default the first 32 Ki characters are tokenised whole; switched off, all of it.
    default = PickRunner(_scheduler(), ExtProcConfig(), tokenizer, clock=lambda: 1.0, stats=ExtProcStats())
    answer = await default.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=shared + novel), None
    )
    assert answer.request is not None and answer.request.untokenized_tokens > 0
    assert list(answer.request.token_ids) == whole[: len(answer.request.token_ids)]
    assert len(tokenizer.encode((shared + novel)[:32768], add_special_tokens=True)) <= len(
        answer.request.token_ids
    )
    answer = await default.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=novel[:30_000]), None
    )
    assert answer.request is not None and answer.request.untokenized_tokens == 0
    whole_runner = PickRunner(
        _scheduler(),
        ExtProcConfig(tokenize_held_prefix_above_chars=0),
        tokenizer,
        clock=lambda: 1.0,
        stats=ExtProcStats(),
    )
    answer = await whole_runner.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=shared + novel), None
    )
    assert answer.request is not None and list(answer.request.token_ids) == whole
    assert answer.request.untokenized_tokens == 0
