"""Prompt -> token ids, so that requests can be matched against the KV blocks workers report.

Three tokenisers:

* ``HFTokenizer``: the model's own ``tokenizer.json`` (HF ``tokenizers``) and, for chat requests,
  the chat template from ``tokenizer_config.json`` rendered with jinja2 in a sandbox, the way
  HF ``apply_chat_template`` and vLLM do (``trim_blocks``/``lstrip_blocks``,
  ``add_generation_prompt=True``, ``bos_token``/``eos_token`` from the config). Completion prompts
  get the tokenizer's special tokens (vLLM's ``add_special_tokens=True`` default for
  ``/v1/completions``); rendered chat text does not (the template already holds them).
  These ids equal the ids vLLM puts into its ``BlockStored`` events, so precise prefix matching
  works against real workers. ``HFTokenizer.from_dir`` loads a Hugging Face model directory;
  the simulated pool's own directory (``scheduler/sim/model``, printed by ``kvsched sim``) is
  one, so text and chat prompts match the simulated workers' blocks exactly as token ids do.
* ``WorkerRenderTokenizer`` (``render_tokenizer.py``): asks a worker's render endpoint, for
  pools whose tokenizer kvsched cannot load.
* ``ByteTokenizer``: a deterministic byte-level stand-in used when nothing else is available.
  Its ids are UTF-8 bytes, which no real model produces: prefix matching with them works only
  in approximate mode (kvsched remembers what it routed itself), never against KV events of
  text prompts; the start-up probe (``tokenizer_probe.py``) says so when it happens.

Which one ``kvsched serve`` uses is ``tokenizer_mode`` (``tokenizer_probe.TokenizerService``).

Token-id prompts (``"prompt": [1, 2, 3]``) never need a tokeniser.
Nothing is downloaded unless ``hub_model`` is configured (then ``huggingface_hub`` fetches the two
files once, into its usual cache).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

from scheduler.adapters.prompt_chunks import PromptChunks, batch_encoder
from scheduler.codec.openai import ChatMessage, InferenceRequestBody

log = logging.getLogger(__name__)

# Routed prompts' pieces and their ids kept for the next prompt that repeats them
# (``prompt_chunks.py``): 64 MiB holds ~1,600 distinct 20 KB prompts' worth of pieces.
DEFAULT_PIECE_CACHE_BYTES = 64 * 1024 * 1024


class PromptTokenizer(Protocol):
    """Turns a parsed request into the prompt's token ids (chat already templated)."""

    def token_ids(self, body: InferenceRequestBody) -> Sequence[int]: ...

    def text_token_ids(self, text: str) -> list[int]: ...


def request_token_ids(tokenizer: PromptTokenizer, body: InferenceRequestBody) -> Sequence[int]:
    """The prompt's ids: given ids pass through untouched; text goes through the tokenizer."""
    if body.prompt_token_ids is not None:
        return body.prompt_token_ids
    if not body.has_prompt:
        return []
    return tokenizer.token_ids(body)


def leading_request_token_ids(
    tokenizer: PromptTokenizer,
    body: InferenceRequestBody,
    held: Callable[[Sequence[int]], bool] | None,
    whole_chars: int = 0,
) -> tuple[Sequence[int], int]:
    """The prompt's ids as far as ``held`` says the pool holds them, and an estimate of the
    tokens after them (``PromptChunks.leading_ids``). Without ``held``, or with a tokenizer
    that cannot stop early, the whole prompt."""
    if held is None or body.prompt_token_ids is not None or not body.has_prompt:
        return request_token_ids(tokenizer, body), 0
    leading = getattr(tokenizer, "leading_token_ids", None)
    if leading is None:
        return tokenizer.token_ids(body), 0
    ids, left = leading(body, held, whole_chars)
    return cast("Sequence[int]", ids), int(left)


class ByteTokenizer:
    """UTF-8 bytes as token ids; chat rendered with a fixed, documented layout."""

    # Pure Python that holds the GIL: a worker thread would only add a hand-off.
    releases_gil = False

    def token_ids(self, body: InferenceRequestBody) -> Sequence[int]:
        if body.prompt_token_ids is not None:
            return body.prompt_token_ids
        if body.api == "chat":
            return list(render_plain_chat(body.messages, body.tools).encode("utf-8"))
        return self.text_token_ids(body.prompt_text or "")

    def text_token_ids(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def render_plain_chat(messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()) -> str:
    """A stable chat layout for models without a template: one ``<|role|>`` block per turn,
    after a ``<|tools|>`` block with the tools as JSON when there are any."""
    parts = [f"<|tools|>\n{_tojson(list(tools))}\n"] if tools else []
    parts.extend(f"<|{message.role}|>\n{message.content}\n" for message in messages)
    parts.append("<|assistant|>\n")
    return "".join(parts)


class ChatTemplate:
    """A HF chat template rendered in jinja2's immutable sandbox."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Same environment options as transformers' chat template renderer, so whitespace
        # (and therefore the token ids) comes out identical.
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = _strftime_now
        self._template = environment.from_string(source)
        self._special_tokens = special_tokens

    def render(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] = (),
    ) -> str:
        return self._template.render(
            messages=[{"role": message.role, "content": message.content} for message in messages],
            add_generation_prompt=add_generation_prompt,
            # transformers' apply_chat_template passes tools=None when there are none.
            tools=list(tools) if tools else None,
            **self._special_tokens,
        )


class TemplateError(ValueError):
    """A chat template called raise_exception (e.g. roles out of order)."""


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


# Below this many characters tokenised, a prompt's untokenised rest is estimated at the ratio of
# ids to characters over every prompt so far rather than its own.
OWN_RATIO_MIN_CHARS = 4096


class HFTokenizer:
    """The model's tokenizer.json plus the chat template of its tokenizer_config.json."""

    # Routed prompts go through tokenizers' batch calls (prompt_chunks.batch_encoder), which
    # let go of the GIL (its encode does not), so long prompts tokenise on a worker thread
    # beside the event loop.
    releases_gil = True

    def __init__(
        self,
        tokenizer_json: str | Path,
        tokenizer_config: str | Path | None = None,
        *,
        piece_cache_bytes: int = DEFAULT_PIECE_CACHE_BYTES,
    ) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # Routing needs the whole prompt: a padding or truncation setting saved in the file must
        # not shorten or lengthen it.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._encode_batch = batch_encoder(self._tokenizer)
        self._piece_cache_bytes = piece_cache_bytes
        self._pieces: PromptChunks | None = None
        self.chat_template: ChatTemplate | None = None
        if tokenizer_config is not None:
            config = json.loads(Path(tokenizer_config).read_text(encoding="utf-8"))
            self.chat_template = _chat_template_from_config(config)
        if self.chat_template is None:
            log.warning(
                "tokenizer %s has no chat template; chat prompts use kvsched's plain layout and "
                "will not match the ids the model server stores",
                tokenizer_json,
            )

    @classmethod
    def from_dir(
        cls, directory: str | Path, *, piece_cache_bytes: int = DEFAULT_PIECE_CACHE_BYTES
    ) -> HFTokenizer:
        """A Hugging Face model directory: ``tokenizer.json`` and, when present, ``tokenizer_config.json``."""
        path = Path(directory)
        tokenizer_json = path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        config = path / "tokenizer_config.json"
        return cls(tokenizer_json, config if config.is_file() else None, piece_cache_bytes=piece_cache_bytes)

    @classmethod
    def from_hub(cls, model: str, revision: str | None = None) -> HFTokenizer:
        """Fetch tokenizer.json and tokenizer_config.json of ``model`` (needs huggingface_hub)."""
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError("fetching a tokenizer by name needs the huggingface_hub package") from exc
        tokenizer_json = hf_hub_download(model, "tokenizer.json", revision=revision)
        tokenizer_config = hf_hub_download(model, "tokenizer_config.json", revision=revision)
        return cls(tokenizer_json, tokenizer_config)

    def token_ids(self, body: InferenceRequestBody) -> Sequence[int]:
        """A routed prompt's ids, from the pieces seen in earlier prompts where the tokenizer allows."""
        if body.prompt_token_ids is not None:
            return body.prompt_token_ids
        text, special = self._routed_text(body)
        return self.pieces.ids(text, add_special_tokens=special)

    def leading_token_ids(
        self, body: InferenceRequestBody, held: Callable[[Sequence[int]], bool], whole_chars: int = 0
    ) -> tuple[Sequence[int], int]:
        """As ``token_ids`` for a text longer than ``whole_chars``, but only as far as ``held``
        says the pool holds the prompt (``PromptChunks.leading_ids``); the tokens after that
        estimated at the ratio of tokens to characters so far."""
        if body.prompt_token_ids is not None:
            return body.prompt_token_ids, 0
        text, special = self._routed_text(body)
        ids, left = self.pieces.leading_ids(
            text, add_special_tokens=special, held=held, whole_chars=whole_chars
        )
        if not left:
            return ids, 0
        done = len(text) - left
        ratio = len(ids) / done if done else 1.0
        pooled = self.pieces.tokens_per_char
        if done < OWN_RATIO_MIN_CHARS and pooled is not None:
            # A few pieces (a chat template's header among them) say less about the rest than
            # every prompt so far: 48 KB chat prompts estimated from their first ~400 characters
            # were 3-9% off, from the pooled ratio 1-2%.
            ratio = pooled
        return ids, max(1, round(left * ratio))

    def _routed_text(self, body: InferenceRequestBody) -> tuple[str, bool]:
        """The text a routed prompt is tokenised from, and whether special tokens are added
        (a completion's ``<s>``; a chat template writes its own)."""
        if body.api == "chat":
            return self.render_chat(body.messages, True, body.tools), False
        return body.prompt_text or "", True

    @property
    def pieces(self) -> PromptChunks:
        """The piece cache of routed prompts (built at first use: its check tokenises probes)."""
        if self._pieces is None:
            self._pieces = PromptChunks(self._tokenizer, max_bytes=self._piece_cache_bytes)
        return self._pieces

    def render_chat(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, tools: Sequence[dict[str, Any]]
    ) -> str:
        if self.chat_template is None:
            return render_plain_chat(messages, tools)
        return self.chat_template.render(messages, add_generation_prompt, tools)

    def chat_token_ids(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] = (),
    ) -> list[int]:
        """The rendered conversation's ids (the template holds the special tokens)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)

    def text_token_ids(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # The batch call of one: the ids without the offsets, and the GIL let go meanwhile
        # (the simulated workers and the benchmarks' clients tokenise every text prompt here).
        ids: list[int] = self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of ``ids`` (vLLM's ``token_strs``)."""
        return [self._tokenizer.id_to_token(token) or "" for token in ids]

    def vocabulary(self) -> dict[str, int]:
        """Vocabulary entry -> id (with the added tokens)."""
        vocab: dict[str, int] = self._tokenizer.get_vocab(with_added_tokens=True)
        return vocab

    @property
    def vocab_size(self) -> int:
        size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        return size


def _chat_template_from_config(config: dict[str, Any]) -> ChatTemplate | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        # Newer configs carry named templates: [{"name": "default", "template": "..."}, ...].
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str):
        return None
    special: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            # AddedToken serialised as {"content": "<s>", "lstrip": false, ...}.
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return ChatTemplate(template, special)


def make_tokenizer(
    tokenizer_json: str | Path | None = None,
    tokenizer_config: str | Path | None = None,
    hub_model: str | None = None,
    tokenizer_dir: str | Path | None = None,
    *,
    piece_cache_bytes: int = DEFAULT_PIECE_CACHE_BYTES,
) -> PromptTokenizer:
    """The configured tokenizer; the byte-level stand-in when none is configured."""
    if tokenizer_dir is not None:
        return HFTokenizer.from_dir(tokenizer_dir, piece_cache_bytes=piece_cache_bytes)
    if tokenizer_json is not None:
        return HFTokenizer(tokenizer_json, tokenizer_config, piece_cache_bytes=piece_cache_bytes)
    if hub_model:
        return HFTokenizer.from_hub(hub_model)
    return ByteTokenizer()


class SwitchableTokenizer:
    """The tokenizer in force, replaceable while serving (``auto`` mode settles on one once the
    pool has answered). A worker-render tokenizer is asked through ``render_token_ids``."""

    def __init__(self, current: PromptTokenizer, description: str) -> None:
        self.current = current
        self.description = description

    def replace(self, tokenizer: PromptTokenizer, description: str) -> None:
        self.current, self.description = tokenizer, description

    @property
    def releases_gil(self) -> bool:
        return bool(getattr(self.current, "releases_gil", True))

    def token_ids(self, body: InferenceRequestBody) -> Sequence[int]:
        return self.current.token_ids(body)

    def text_token_ids(self, text: str) -> list[int]:
        return self.current.text_token_ids(text)

    def leading_token_ids(
        self, body: InferenceRequestBody, held: Callable[[Sequence[int]], bool], whole_chars: int = 0
    ) -> tuple[Sequence[int], int]:
        return leading_request_token_ids(self.current, body, held, whole_chars)

    async def render_token_ids(self, body: InferenceRequestBody) -> list[int] | None:
        """The ids from a worker when the tokenizer in force renders remotely, else None."""
        render = getattr(self.current, "render_token_ids", None)
        if render is None:
            return None
        ids: list[int] = await render(body)
        return ids
