"""The simulated model's tokenizer files: what they promise (Hugging Face layout, 32k ids,
a real tokenizer's scale, generated words that round-trip) and how they were built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.codec.openai import ChatMessage
from scheduler.sim.model_files import FILLER_WORDS, VOCAB_SIZE, build, check_filler
from scheduler.sim.tokenizer import MODEL_DIR, filler_texts, load

REPO = Path(__file__).resolve().parents[1]


def english_prose() -> str:
    """The README's prose lines: no tables, code, commands or inline code."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    prose = [
        line
        for line in lines
        if line
        and not line.startswith(("|", "```", "    ", "#", "kvsched ", "python", "!["))
        and "`" not in line
    ]
    return " ".join(prose)


def test_shipped_files_are_a_hugging_face_tokenizer_of_32k_ids() -> None:
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in MODEL_DIR.iterdir()}
    tokenizer = HFTokenizer.from_dir(MODEL_DIR)
    assert tokenizer.vocab_size == VOCAB_SIZE
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == "<s>"
    assert json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"] == VOCAB_SIZE
    # Completion prompts get <s> (vLLM's add_special_tokens default); chat text gets it from
    # the template, once.
    assert tokenizer.text_token_ids("hello world")[0] == 1
    chat = tokenizer.chat_token_ids([ChatMessage("user", "hello world")])
    assert chat.count(1) == 1 and tokenizer.decode(chat).startswith("<s><|user|>\nhello world<|end|>")


def test_english_prose_tokenises_at_a_real_tokenizers_scale() -> None:
    text = english_prose()
    assert len(text) > 5000
    chars_per_token = len(text) / len(load().encode(text, add_special_tokens=False))
    # Llama's tokenizers: about 4 characters per token on English.
    assert 3.5 <= chars_per_token <= 4.8, chars_per_token
    licence = Path("/usr/share/common-licenses/GPL-3")
    if licence.exists():
        legal = licence.read_text(encoding="utf-8")
        assert 4.0 <= len(legal) / len(load().encode(legal, add_special_tokens=False)) <= 4.8


def test_generated_text_tokenises_back_to_the_generated_ids() -> None:
    tokenizer = load()
    ids = [tokenizer.filler_token_id(i) for i in range(50)]
    text = filler_texts(0, 50)
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids) == text
    # Each streamed chunk alone is one token, as a client counting chunks sees it.
    assert all(len(tokenizer.encode(filler_texts(i, 1), add_special_tokens=False)) == 1 for i in range(17))
    check_filler(tokenizer.hf._tokenizer)


def test_build_is_deterministic_and_refuses_a_vocabulary_without_the_filler_words() -> None:
    corpus = [" ".join(FILLER_WORDS)] * 50 + ["a scheduler routes each request to the pod that holds it"] * 20
    first, second = build(corpus, vocab_size=700), build(corpus, vocab_size=700)
    assert first.to_str() == second.to_str()
    with pytest.raises(ValueError, match="filler word"):
        build(["nothing of the sort here"] * 20, vocab_size=300)
