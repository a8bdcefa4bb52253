"""The simulated model's tokeniser, chat template and generated text.

Deterministic and dependency-free, so that a prompt sent twice (or a conversation sent
again with its previous answer) maps to the same token ids and therefore hits the
prefix cache like a real model would:

* text -> tokens: split on whitespace; each word is one token whose id is
  ``256 + (first 8 bytes of BLAKE2b(word) mod (VOCAB_SIZE - 256))``; ids below 256 are
  special tokens;
* chat template: per message ``<role> words... <end>``, then ``<assistant>`` as the
  generation prompt. A message's content is a string or a list of ``{"type": "text",
  "text": ...}`` parts (other part types carry no text and are skipped);
* generated text: output token ``i`` of every request is the word
  ``FILLER_WORDS[i % len(FILLER_WORDS)]``, so an answer re-sent as an assistant message
  tokenises back to exactly the ids the engine generated and cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

VOCAB_SIZE = 32_000
FIRST_WORD_ID = 256
END_OF_TURN = 2
ROLE_TOKENS = {"system": 3, "user": 4, "assistant": 5, "tool": 6, "developer": 7}
OTHER_ROLE = 8

FILLER_WORDS = (
    "the",
    "model",
    "answers",
    "with",
    "plain",
    "filler",
    "words",
    "so",
    "that",
    "every",
    "token",
    "is",
    "predictable",
    "and",
    "cacheable",
    "again",
)


@lru_cache(maxsize=65_536)
def word_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return FIRST_WORD_ID + int.from_bytes(digest, "big") % (VOCAB_SIZE - FIRST_WORD_ID)


def encode(text: str) -> list[int]:
    return [word_id(word) for word in text.split()]


_FILLER_IDS = tuple(word_id(w) for w in FILLER_WORDS)


def filler_token_id(index: int) -> int:
    """Id of the ``index``-th generated token of any request."""
    return _FILLER_IDS[index % len(_FILLER_IDS)]


def filler_text(index: int) -> str:
    """Text of the ``index``-th generated token, with the separating space before it."""
    word = FILLER_WORDS[index % len(FILLER_WORDS)]
    return word if index == 0 else " " + word


def filler_texts(start: int, count: int) -> str:
    return "".join(filler_text(i) for i in range(start, start + count))


class PromptError(ValueError):
    """The request body does not describe a prompt this server understands."""


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    raise PromptError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def apply_chat_template(messages: object, add_generation_prompt: bool = True) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    tokens: list[int] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise PromptError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise PromptError("each message needs a string role")
        tokens.append(ROLE_TOKENS.get(role, OTHER_ROLE))
        tokens.extend(encode(_content_text(message.get("content"))))
        tokens.append(END_OF_TURN)
    if add_generation_prompt:
        tokens.append(ROLE_TOKENS["assistant"])
    return tokens


def _token_list(value: Sequence[Any]) -> list[int]:
    out: list[int] = []
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < VOCAB_SIZE:
            raise PromptError(f"token ids must be ints in [0, {VOCAB_SIZE})")
        out.append(token)
    return out


def completion_prompts(prompt: object) -> list[list[int]]:
    """OpenAI ``prompt``: text, token ids, or a list of either; one token list per prompt."""
    if isinstance(prompt, str):
        return [encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [_token_list(prompt)]
        prompts: list[list[int]] = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(encode(item))
            elif isinstance(item, list) and item:
                prompts.append(_token_list(item))
            else:
                raise PromptError("each prompt must be text or a non-empty list of token ids")
        return prompts
    raise PromptError("prompt must be text, a list of token ids, or a non-empty list of those")
