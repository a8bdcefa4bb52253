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
from scheduler.adapters.prompt_chunks import PromptChunks, chunk_bounds
from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.bench.text_prompt_bench import idle_scheduler
from scheduler.codec.openai import InferenceRequestBody
from scheduler.core.scheduler import Endpoint, EndpointMetrics, Scheduler, SchedulingRequest
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


def test_leading_ids_stop_at_the_first_new_piece_the_pool_does_not_hold(tokenizer: HFTokenizer) -> None:
    chunks = PromptChunks(tokenizer._tokenizer, max_bytes=1 << 24)
    text = document(1, 40_000)
    whole = tokenizer.encode(text, add_special_tokens=True)
    asked: list[int] = []

    def held(ids: object) -> bool:
        asked.append(len(ids))  # type: ignore[arg-type]
        return len(asked) < 4

    ids, left = chunks.leading_ids(text, add_special_tokens=True, held=held)
    # Asked before the first piece (nothing to judge yet), then before new pieces at growing
    # distances; the fourth answer stops it, where the ids end.
    assert len(asked) == 4 and asked == sorted(asked) and asked[-1] == len(ids)
    assert list(ids) == whole[: len(ids)] and len(ids) < len(whole) // 8
    assert left > 0 and len(text) - left < 2_000 and chunks.stats.chars_left == left
    # The same text again, nothing held: the pieces kept last time are taken without asking,
    # and the first new one is where it stops.
    asked.clear()
    again, left_again = chunks.leading_ids(
        text, add_special_tokens=True, held=lambda ids: held(ids) and False
    )
    assert len(asked) == 1 and list(again) == list(ids) and left_again == left
    # Held to the end, or no longer than whole_chars: the whole prompt, nothing left.
    all_ids, none_left = chunks.leading_ids(text, add_special_tokens=True, held=lambda ids: True)
    assert list(all_ids) == whole and none_left == 0
    asked.clear()
    short = document(4, 6_000)
    short_ids, short_left = chunks.leading_ids(short, add_special_tokens=True, held=held, whole_chars=6_500)
    assert (
        not asked and short_left == 0 and list(short_ids) == tokenizer.encode(short, add_special_tokens=True)
    )
    assert list(chunks.ids(text, add_special_tokens=True)) == whole


def test_a_held_prompt_is_asked_about_a_few_dozen_times_not_once_a_piece(tokenizer: HFTokenizer) -> None:
    chunks = PromptChunks(tokenizer._tokenizer, max_bytes=1 << 24)
    text = document(5, 400_000)
    asked: list[int] = []

    def held(ids: object) -> bool:
        asked.append(len(ids))  # type: ignore[arg-type]
        return True

    ids, left = chunks.leading_ids(text, add_special_tokens=False, held=held)
    assert left == 0 and list(ids) == tokenizer.encode(text, add_special_tokens=False)
    pieces = len(list(chunk_bounds(text)))
    assert pieces > 700 and len(asked) < 40


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
    config = ExtProcConfig(tokenize_held_prefix_above_chars=8192, tokenize_placed_chars=200_000)
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
    # Tokenised through the held document and a little past it, no further; the ids are the
    # whole prompt's first ones, and the rest is estimated within 10% of its true length.
    tokenized = len(request.token_ids)
    assert len(shared_ids) < tokenized < len(shared_ids) + 4096
    assert list(request.token_ids) == whole[:tokenized]
    assert request.untokenized_tokens > 0
    assert abs(request.prompt_tokens - len(whole)) < 0.1 * len(whole)
    assert answer.explanation_source.matched_blocks == len(keys)

    # After the answer the rest is tokenised (on a worker thread: it is long) and placed.
    assert not scheduler.prefix_held(whole)
    await runner.settle()
    assert scheduler.prefix_held(whole)

    # By default a short prompt nobody holds is picked for from its first pieces; the rest
    # follows on the loop once the answer is out, and the next request sees it all placed.
    default_scheduler = _scheduler()
    default = PickRunner(
        default_scheduler, ExtProcConfig(), tokenizer, clock=lambda: 1.0, stats=ExtProcStats()
    )
    short = document(6, 6_000)
    short_ids = tokenizer.encode(short, add_special_tokens=True)
    answer = await default.decide_parsed(hints, InferenceRequestBody("completions", prompt_text=short), None)
    assert answer.request is not None and answer.request.untokenized_tokens > 0
    assert len(answer.request.token_ids) < len(short_ids) // 2
    assert list(answer.request.token_ids) == short_ids[: len(answer.request.token_ids)]
    assert abs(answer.request.prompt_tokens - len(short_ids)) < 0.1 * len(short_ids)
    assert not default_scheduler.prefix_held(short_ids)
    await default.settle()
    assert default_scheduler.prefix_held(short_ids)
    follower = await default.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=short + " and one more question"), None
    )
    assert follower.endpoints == answer.endpoints
    assert follower.explanation_source.matched_blocks >= len(short_ids) // 16 - 1
    # A long prompt's placement covers its first tokenize_placed_chars (32 Ki) characters.
    novel_ids = tokenizer.encode(novel, add_special_tokens=True)
    answer = await default.decide_parsed(hints, InferenceRequestBody("completions", prompt_text=novel), None)
    await default.settle()
    placed = tokenizer.encode(novel[:30_000], add_special_tokens=True)
    assert default_scheduler.prefix_held(placed) and not default_scheduler.prefix_held(novel_ids)
    # Short enough, it is tokenised whole.
    answer = await default.decide_parsed(
        hints, InferenceRequestBody("completions", prompt_text=short[:2000]), None
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


@pytest.mark.parametrize("kv_events", ["tcp://x:5557", None])
def test_a_request_picked_from_leading_ids_is_placed_whole_afterwards(kv_events: str | None) -> None:
    """Speculative placement (endpoints with KV events) and approximate mode (without): the
    placement made at the pick covers the leading ids, ``place_whole_prompt`` the rest."""
    scheduler = Scheduler()
    names = [f"10.0.1.{i}:8000" for i in range(3)]
    scheduler.set_endpoints([Endpoint(n, n, kv_events=kv_events) for n in names], now=0.0)
    for name in names:
        scheduler.update_metrics(name, EndpointMetrics(0, 0, 0.1), now=0.0)
    whole = list(range(1, 16 * 12 + 1))
    leading = whole[: 16 * 3]
    result = scheduler.pick(SchedulingRequest("r1", leading, untokenized_tokens=16 * 9), now=1.0)
    endpoint = result.endpoints[0]
    assert scheduler.prefix_held(leading) and not scheduler.prefix_held(whole)
    assert not scheduler.place_whole_prompt("unknown", whole, 1.1)
    assert scheduler.place_whole_prompt("r1", whole, 1.1)
    assert scheduler.prefix_held(whole)
    follower = scheduler.pick(SchedulingRequest("r2", [*whole, 7, 8, 9]), now=1.2)
    assert follower.endpoints[0] == endpoint and follower.matched_blocks >= 12 - 1
    # Once the request is over there is nothing to place.
    scheduler.on_completed("r1", 2.0)
    assert not scheduler.place_whole_prompt("r1", whole, 2.1)


async def test_a_failure_placing_the_rest_costs_the_routed_request_nothing(
    tokenizer: HFTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingPlacement(Scheduler):
        def place_whole_prompt(self, request_id: str, token_ids: object, now: float) -> bool:
            raise RuntimeError("placement store unavailable")

    scheduler = FailingPlacement()
    names = [f"10.0.2.{i}:8000" for i in range(2)]
    scheduler.set_endpoints([Endpoint(n, n, kv_events="tcp://x:5557") for n in names], now=0.0)
    for name in names:
        scheduler.update_metrics(name, EndpointMetrics(0, 0, 0.1), now=0.0)
    runner = PickRunner(scheduler, ExtProcConfig(), tokenizer, clock=lambda: 1.0, stats=ExtProcStats())
    hints = request_hints({":path": "/v1/completions"})
    for n in range(2):
        answer = await runner.decide_parsed(
            hints, InferenceRequestBody("completions", prompt_text=document(7 + n, 6_000)), None
        )
        assert answer.routed and answer.request is not None and answer.request.untokenized_tokens > 0
        await runner.settle()
    # Logged once with its context, not once per request.
    failures = [r for r in caplog.records if "placing the whole prompt" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
