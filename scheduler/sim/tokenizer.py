"""The simulated model's tokenizer, chat template and generated text.

One tokenizer for the simulated pool and for kvsched: the Hugging Face files in
``scheduler/sim/model/`` (a byte-level BPE of 32,000 ids with a chat template; how they were
made is in ``model_files.py``), loaded through the same ``HFTokenizer`` that ``kvsched serve``
uses, so a text or chat prompt becomes the same ids in a simulated worker's KV events and in
kvsched's lookups. ``kvsched sim`` prints the directory; clients (benchmarks,
``transformers.AutoTokenizer``) can load it offline.

* text -> ids: the BPE; completion prompts get ``<s>`` in front unless the request says
  ``add_special_tokens: false`` (vLLM's default and switch);
* chat: the template renders the messages (text parts of a list content joined with
  newlines, as vLLM flattens them for a string template), then the BPE without special tokens;
* generated text: output token ``i`` of every request is ``FILLER_WORDS[i % 16]``, one token
  each (the first without a leading space), so an answer re-sent as an assistant message,
  or appended to a completion prompt, tokenises back to exactly the ids the engine generated
  and cached, and a client that counts the streamed text's tokens counts what ``usage`` says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from scheduler.adapters.tokenizer import HFTokenizer
from scheduler.codec.openai import ChatMessage
from scheduler.codec.plain_ints import plain_ints
from scheduler.sim.model_files import FILLER_WORDS

MODEL_DIR = Path(__file__).resolve().with_name("model")


class PromptError(ValueError):
    """The request body does not describe a prompt this server understands."""


def filler_text(index: int) -> str:
    """Text of the ``index``-th generated token, with the separating space before it."""
    word = FILLER_WORDS[index % len(FILLER_WORDS)]
    return word if index == 0 else " " + word


def filler_texts(start: int, count: int) -> str:
    return "".join(filler_text(i) for i in range(start, start + count))


class SimTokenizer:
    """The simulated model's tokenizer files, as a vLLM server would use them."""

    def __init__(self, directory: str | Path = MODEL_DIR) -> None:
        self.directory = Path(directory).resolve()
        self.hf = HFTokenizer.from_dir(self.directory)
        self.vocab_size = self.hf.vocab_size
        # Indices 0 and 16 are the same word, without and with the leading space.
        self._filler_ids = tuple(self._single_id(filler_text(i)) for i in range(len(FILLER_WORDS) + 1))

    def _single_id(self, text: str) -> int:
        ids = self.hf.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{self.directory}: generated word {text!r} is not one token")
        return ids[0]

    def filler_token_id(self, index: int) -> int:
        """Id of the ``index``-th generated token of any request."""
        if index == 0:
            return self._filler_ids[0]
        position = index % len(FILLER_WORDS)
        return self._filler_ids[position or len(FILLER_WORDS)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self.hf.token_strings(ids)

    def chat_ids(
        self, messages: object, add_generation_prompt: bool = True, tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        return self.hf.chat_token_ids(chat_messages(messages), add_generation_prompt, tools)

    def completion_prompts(self, prompt: object, add_special_tokens: bool = True) -> list[list[int]]:
        """OpenAI ``prompt``: text, token ids, or a list of either; one token list per prompt."""
        if isinstance(prompt, str):
            return [self.encode(prompt, add_special_tokens)]
        if isinstance(prompt, list) and prompt:
            if plain_ints(prompt):
                return [self._in_vocabulary(prompt)]
            prompts: list[list[int]] = []
            for item in prompt:
                if isinstance(item, str):
                    prompts.append(self.encode(item, add_special_tokens))
                elif isinstance(item, list) and item:
                    prompts.append(self.token_list(item))
                else:
                    raise PromptError("each prompt must be text or a non-empty list of token ids")
            return prompts
        raise PromptError("prompt must be text, a list of token ids, or a non-empty list of those")

    def token_list(self, value: Sequence[Any]) -> list[int]:
        if not value:
            return []
        if plain_ints(value):
            return self._in_vocabulary(value)
        raise PromptError(f"token ids must be ints in [0, {self.vocab_size})")

    def _in_vocabulary(self, ids: Sequence[int]) -> list[int]:
        # Types (plain_ints) and range checked in C: 2,600 ids of a token-id prompt
        # took 0.67 ms to check one by one in Python, half of what a simulated worker spent
        # between a request's arrival and its engine's queue.
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise PromptError(f"token ids must be ints in [0, {self.vocab_size})")
        return ids if isinstance(ids, list) else list(ids)


def chat_messages(messages: object) -> list[ChatMessage]:
    """OpenAI messages -> (role, text): a list content's text parts joined with newlines
    (vLLM's flattening for string templates); other part types carry no text."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    out: list[ChatMessage] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise PromptError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise PromptError("each message needs a string role")
        out.append(ChatMessage(role, _content_text(message.get("content"))))
    return out


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, Mapping)]
        return "\n".join(text for text in texts if isinstance(text, str))
    raise PromptError(f"message content must be a string or a list of parts, got {type(content).__name__}")


@lru_cache(maxsize=8)
def load(directory: str | None = None) -> SimTokenizer:
    """The tokenizer of ``directory`` (default: the shipped model files), loaded once."""
    return SimTokenizer(MODEL_DIR if directory is None else directory)


def filler_token_id(index: int) -> int:
    """Id of the ``index``-th generated token with the shipped tokenizer (the engine's default)."""
    return load().filler_token_id(index)
