"""Prompt tokenisation: a real tokenizer.json trained here, chat templates, the byte fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.decide import PickRunner
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TemplateError,
    make_tokenizer,
    render_plain_chat,
    request_token_ids,
)
from scheduler.codec.openai import ChatMessage, InferenceRequestBody, leading_prompt

SENTENCES = [
    "the cache keeps the prefix of every prompt",
    "a scheduler routes each request to the pod that holds its prefix",
    "user assistant system hello world",
]

# A Llama-2 style template: bos, role markers, and a generation prompt at the end.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}"
    "[{{ message['role'] }}] {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json", directory / "tokenizer_config.json"


def test_completion_text_gets_the_special_tokens(tokenizer_files: tuple[Path, Path]) -> None:
    tok_json, tok_config = tokenizer_files
    tokenizer = HFTokenizer(tok_json, tok_config)
    reference = Tokenizer.from_file(str(tok_json))
    body = InferenceRequestBody("completions", prompt_text="the cache keeps the prefix")
    ids = tokenizer.token_ids(body)
    assert list(ids) == reference.encode("the cache keeps the prefix").ids
    assert ids[0] == reference.token_to_id("<s>")
    assert reference.token_to_id("[UNK]") not in ids


def test_chat_is_rendered_with_the_template_then_tokenised(tokenizer_files: tuple[Path, Path]) -> None:
    tok_json, tok_config = tokenizer_files
    tokenizer = HFTokenizer(tok_json, tok_config)
    assert tokenizer.chat_template is not None
    messages = (ChatMessage("system", "hello world"), ChatMessage("user", "the cache"))
    rendered = tokenizer.chat_template.render(messages)
    assert rendered == "<s>[system] hello world\n[user] the cache\n[assistant]"
    reference = Tokenizer.from_file(str(tok_json))
    ids = list(tokenizer.token_ids(InferenceRequestBody("chat", messages=messages)))
    # The template already holds bos: encoding must not add a second one.
    assert ids == reference.encode(rendered, add_special_tokens=False).ids
    assert ids.count(reference.token_to_id("<s>")) == 1


def test_template_exceptions_surface_as_template_errors(tokenizer_files: tuple[Path, Path]) -> None:
    tokenizer = HFTokenizer(*tokenizer_files)
    with pytest.raises(TemplateError, match="tool turns"):
        tokenizer.token_ids(InferenceRequestBody("chat", messages=(ChatMessage("tool", "x"),)))


def test_template_sandbox_blocks_attribute_escapes(
    tmp_path: Path, tokenizer_files: tuple[Path, Path]
) -> None:
    from jinja2.exceptions import SecurityError

    config = {"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = HFTokenizer(tokenizer_files[0], tmp_path / "tokenizer_config.json")
    with pytest.raises(SecurityError):
        tokenizer.token_ids(InferenceRequestBody("chat", messages=(ChatMessage("user", "x"),)))


def test_named_templates_and_missing_template(tmp_path: Path, tokenizer_files: tuple[Path, Path]) -> None:
    named = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "named.json").write_text(json.dumps(named))
    tokenizer = HFTokenizer(tokenizer_files[0], tmp_path / "named.json")
    assert tokenizer.chat_template is not None
    assert tokenizer.chat_template.render([ChatMessage("user", "x")]) == "D"
    bare = HFTokenizer(tokenizer_files[0])
    messages = (ChatMessage("user", "hello world"),)
    expected = Tokenizer.from_file(str(tokenizer_files[0])).encode(
        render_plain_chat(messages), add_special_tokens=False
    )
    assert list(bare.token_ids(InferenceRequestBody("chat", messages=messages))) == expected.ids


def test_token_id_prompts_bypass_the_tokenizer(tokenizer_files: tuple[Path, Path]) -> None:
    ids = [9, 8, 7]
    body = InferenceRequestBody("completions", prompt_token_ids=ids)
    assert request_token_ids(HFTokenizer(*tokenizer_files), body) is ids
    assert request_token_ids(ByteTokenizer(), body) is ids
    assert request_token_ids(ByteTokenizer(), InferenceRequestBody("other")) == []


def test_byte_fallback_is_deterministic_utf8() -> None:
    tokenizer = make_tokenizer()
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.token_ids(InferenceRequestBody("completions", prompt_text="hé")) == [104, 195, 169]
    chat = InferenceRequestBody("chat", messages=(ChatMessage("user", "hi"),))
    assert tokenizer.token_ids(chat) == list(b"<|user|>\nhi\n<|assistant|>\n")


# -- enormous prompts --------------------------------------------------------------------


def test_leading_prompt_keeps_the_first_characters_of_text_and_messages() -> None:
    text = InferenceRequestBody("completions", prompt_text="abcdefghij")
    assert leading_prompt(text, 4).prompt_text == "abcd"
    assert leading_prompt(text, 10) is text
    chat = InferenceRequestBody(
        "chat",
        messages=(ChatMessage("system", "12345"), ChatMessage("user", "67890"), ChatMessage("user", "x")),
    )
    assert leading_prompt(chat, 7).messages == (ChatMessage("system", "12345"), ChatMessage("user", "67"))
    ids = InferenceRequestBody("completions", prompt_token_ids=list(range(10_000)))
    assert leading_prompt(ids, 1) is ids


class RecordingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def text_token_ids(self, text: str) -> list[int]:
        self.seen.append(len(text))
        return super().text_token_ids(text)


async def test_routing_tokenises_at_most_tokenize_max_chars_of_a_prompt() -> None:
    """A 10 MB text prompt cost 50 s of tokenising and 1.3 GB of memory before this limit."""
    tokenizer = RecordingTokenizer()
    config = ExtProcConfig(tokenize_max_chars=4096)
    runner = PickRunner(None, config, tokenizer, clock=lambda: 0.0, stats=ExtProcStats())  # type: ignore[arg-type]
    body = InferenceRequestBody("completions", prompt_text="cache " * 100_000)
    ids = await runner.token_ids(body)
    assert tokenizer.seen == [4096] and len(ids) == 4096
    assert body.prompt_text is not None and len(body.prompt_text) == 600_000  # the request is whole
