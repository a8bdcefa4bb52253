"""Piecewise tokenisation of routed prompts: the same ids as tokenising the prompt whole,
with the real simulated-pool tokenizer (a byte-level BPE) and with tokenizers it must refuse."""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from scheduler.adapters.prompt_chunks import PromptChunks, _entry_bytes, batch_encoder, chunk_bounds
from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.codec.openai import parse_request_body
from scheduler.sim.tokenizer import MODEL_DIR

# Pieces of text the generated prompts are made of: words, numbers, punctuation, whitespace
# runs of every kind, non-Latin scripts, and the model's added tokens.
_ATOMS = [
    "the",
    "Routing",
    "cache",
    "naïve",
    "Привет",
    "東京",
    "😀",
    "it's",
    "we'll",
    "42",
    "3.14",
    "2026-12-06",
    "snake_case",
    "(paren)",
    "...",
    "--",
    ",",
    ".",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\n\n\n",
    " \n",
    "\t",
    "\r\n",
    "<s>",
    "<|user|>",
    "<|end|>",
]


@pytest.fixture(scope="module")
def sim_tokenizer() -> HFTokenizer:
    return HFTokenizer.from_dir(MODEL_DIR)


@functools.cache
def _shared_tokenizer() -> HFTokenizer:
    return HFTokenizer.from_dir(MODEL_DIR)


def _whole(tokenizer: HFTokenizer, text: str, special: bool) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=special)


def test_the_simulated_models_tokenizer_passes_the_check(sim_tokenizer: HFTokenizer) -> None:
    assert sim_tokenizer.pieces.enabled, sim_tokenizer.pieces.disabled_reason


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(_ATOMS), min_size=0, max_size=120),
    st.integers(min_value=1, max_value=40),
    st.booleans(),
)
def test_ids_equal_the_whole_prompts_at_any_cut_sizes(
    parts: list[str], max_chars: int, special: bool
) -> None:
    # Tiny pieces cut at nearly every allowed place; whatever the cut, the ids are the same.
    tokenizer = _shared_tokenizer()
    text = " ".join(parts) if len(parts) % 2 else "".join(parts)
    chunks = tokenizer.pieces
    bounds = list(chunk_bounds(text, min_chars=1, max_chars=max_chars))
    assert bounds == sorted(set(bounds)) and (not text or bounds[-1] == len(text))
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *bounds])]
    joined = [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]
    assert joined == _whole(tokenizer, text, False)
    assert list(chunks.ids(text, add_special_tokens=special)) == _whole(tokenizer, text, special)


def test_repeated_prompts_are_found_in_pieces_and_equal_whole(sim_tokenizer: HFTokenizer) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    system = " ".join(words[i % len(words)] for i in range(900)) + "\n"
    chunks = PromptChunks(sim_tokenizer._tokenizer, max_bytes=1 << 20)
    for n in range(6):
        prompt = system + f"Question {n}: what is {words[n]} after {words[n + 1]}?"
        assert list(chunks.ids(prompt, add_special_tokens=True)) == _whole(sim_tokenizer, prompt, True)
    stats = chunks.stats
    # Everything but the first prompt's system part and each question came from the cache.
    assert stats.chars_hit >= 5 * (len(system) - 1024)
    assert stats.chunk_hits >= 5 * (len(system) // 1024 - 1)


class _CountingTokenizer:
    """A ``tokenizers.Tokenizer`` whose batch calls are counted; ``fast`` False hides
    ``encode_batch_fast``, as a tokenizers release before 0.20 would."""

    def __init__(self, inner: Tokenizer, *, fast: bool) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {"encode_batch": 0, "encode_batch_fast": 0}
        if fast:
            self.encode_batch_fast = functools.partial(self._counted, "encode_batch_fast")

    def _counted(self, name: str, *args: object, **kwargs: object) -> object:
        self.calls[name] += 1
        return getattr(self._inner, name)(*args, **kwargs)

    def encode_batch(self, *args: object, **kwargs: object) -> object:
        return self._counted("encode_batch", *args, **kwargs)

    def encode(self, *args: object, **kwargs: object) -> object:
        return self._inner.encode(*args, **kwargs)

    def get_added_tokens_decoder(self) -> object:
        return self._inner.get_added_tokens_decoder()


@pytest.mark.parametrize("fast", [True, False])
def test_pieces_are_tokenised_with_the_fast_batch_call_where_the_library_has_it(
    sim_tokenizer: HFTokenizer, fast: bool
) -> None:
    """Routing reads ids only, so the batch call without character offsets is the one used
    (for the check's probes too); without it, ``encode_batch``. The ids are the whole text's."""
    counting = _CountingTokenizer(sim_tokenizer._tokenizer, fast=fast)
    assert batch_encoder(counting) == (counting.encode_batch_fast if fast else counting.encode_batch)
    chunks = PromptChunks(counting, max_bytes=1 << 20)
    assert chunks.enabled, chunks.disabled_reason
    prompt = " ".join(f"token{i} naïve Привет\n" for i in range(400))
    assert list(chunks.ids(prompt, add_special_tokens=True)) == _whole(sim_tokenizer, prompt, True)
    used, unused = ("encode_batch_fast", "encode_batch") if fast else ("encode_batch", "encode_batch_fast")
    assert counting.calls[used] > 0 and counting.calls[unused] == 0


def test_the_cache_keeps_to_its_bytes(sim_tokenizer: HFTokenizer) -> None:
    chunks = PromptChunks(sim_tokenizer._tokenizer, max_bytes=20_000)
    for n in range(50):
        text = " ".join(f"word{n}x{i}" for i in range(400))
        assert list(chunks.ids(text, add_special_tokens=False)) == _whole(sim_tokenizer, text, False)
        assert chunks.bytes_used <= chunks.max_bytes
    assert chunks.stats.evictions > 0


def test_routed_text_and_chat_prompts_match_the_whole_prompts(sim_tokenizer: HFTokenizer) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly.\nAlways cite the source document."},
        {"role": "user", "content": "What does the cache hold?\nAnswer in one line."},
    ]
    for _ in range(2):  # the second time from the pieces
        chat = parse_request_body(
            b'{"model": "m", "messages": ' + _json(messages) + b"}", "/v1/chat/completions"
        )
        assert list(sim_tokenizer.token_ids(chat)) == sim_tokenizer.chat_token_ids(chat.messages)
        text = parse_request_body(b'{"model": "m", "prompt": "Once upon a time\\nthere was a router"}')
        assert list(sim_tokenizer.token_ids(text)) == sim_tokenizer.text_token_ids(text.prompt_text or "")


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _trained(pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    corpus = ["the quick brown fox jumps over the lazy dog", "routing prompts to the cache"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return tokenizer


def test_a_tokenizer_that_adds_a_space_to_each_piece_is_tokenised_whole() -> None:
    # SentencePiece's Metaspace puts "▁" before the start of the text: cut text would get one
    # at every cut.
    tokenizer = _trained(pre_tokenizers.Metaspace(prepend_scheme="always"))
    chunks = PromptChunks(tokenizer, max_bytes=1 << 20)
    assert not chunks.enabled and "changes its ids" in (chunks.disabled_reason or "")
    text = "the quick brown fox " * 200
    assert list(chunks.ids(text, add_special_tokens=False)) == tokenizer.encode(text).ids


def test_added_tokens_that_strip_whitespace_switch_it_off() -> None:
    tokenizer = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    chunks = PromptChunks(tokenizer, max_bytes=1 << 20)
    assert not chunks.enabled and "<mask>" in (chunks.disabled_reason or "")


def test_zero_bytes_turns_it_off(tmp_path: Path) -> None:
    tokenizer = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    chunks = PromptChunks(tokenizer, max_bytes=0)
    assert not chunks.enabled
    assert list(chunks.ids("the lazy dog", add_special_tokens=False)) == tokenizer.encode("the lazy dog").ids


def test_threads_share_the_cache_and_its_accounting_holds(sim_tokenizer: HFTokenizer) -> None:
    # Long prompts are tokenised on worker threads; a small cache makes them evict each other.
    chunks = PromptChunks(sim_tokenizer._tokenizer, max_bytes=60_000)
    texts = [" ".join(f"w{(n * 7 + i) % 97}" for i in range(600)) for n in range(40)]
    expected = [_whole(sim_tokenizer, text, True) for text in texts]

    def work(offset: int) -> bool:
        return all(
            list(chunks.ids(texts[(offset + k) % len(texts)], add_special_tokens=True))
            == expected[(offset + k) % len(texts)]
            for k in range(3 * len(texts))
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))
    assert chunks.bytes_used == sum(_entry_bytes(k, v) for k, v in chunks._pieces.items()) <= chunks.max_bytes
    assert chunks.stats.evictions > 0


def test_a_prompt_tokenised_whole_lets_other_threads_run(sim_tokenizer: HFTokenizer) -> None:
    """A long prompt is tokenised on a worker thread so the event loop keeps serving; that
    holds only if the tokenizer call lets go of the GIL (tokenizers' ``encode`` keeps it for
    the whole call, ``encode_batch`` does not). One call on a tokenizer the piece cache cannot
    cut: held, this thread would make no progress at all until it returns."""
    text = " ".join(f"w{i}x{i * 7}" for i in range(40_000))
    chunks = PromptChunks(sim_tokenizer._tokenizer, max_bytes=0)
    assert not chunks.enabled

    def spin(until: threading.Event) -> int:
        count = 0
        while not until.is_set():
            count += 1
        return count

    alone = threading.Event()
    threading.Timer(0.05, alone.set).start()
    started = time.perf_counter()
    base_count = spin(alone)
    base_s = time.perf_counter() - started
    done = threading.Event()
    worker = threading.Thread(target=lambda: (chunks.ids(text, add_special_tokens=False), done.set()))
    started = time.perf_counter()  # before start(): a worker holding the GIL may finish inside it
    worker.start()
    count = spin(done)
    elapsed = time.perf_counter() - started
    worker.join()
    # Sharing the machine with the worker (one core or two), this loop keeps a good share of
    # its pace; with the GIL held it would get none of the call's time.
    assert count / elapsed > 0.2 * base_count / base_s
