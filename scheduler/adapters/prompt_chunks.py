"""Tokenising a prompt piece by piece, each piece's ids kept for the next prompt that has it.

Prompts routed to one pool repeat themselves: a tenant's system prompt, the documents of a RAG
corpus, the earlier turns of a conversation. Tokenising a 20 KB text prompt costs 9-11 ms of
CPU with the `tokenizers` library (a 2,626-token RAG prompt on a 2-core machine; 5.8 of 8.2 ms
of a 2,600-word prompt in the ByteLevel pre-tokenizer's regex), while the pieces seen before
cost a dictionary lookup.

Cutting text and tokenising the pieces gives the whole text's ids only where the cut is a
boundary the tokenizer itself never merges across. In the byte-level BPE family (GPT-2, Llama
3, Qwen 2, Mistral's Tekken, the simulated pool's model) the pre-tokenizer splits text into
pieces that BPE never merges across, and no piece holds a space after its first character
unless it is all whitespace; so a space, or a newline, between a non-space and a letter always
starts a new piece. Those are the only cuts made. Whether
a tokenizer really behaves so is checked, not assumed: ``PromptChunks`` tokenises a set of
probe texts whole and cut at every such place and switches itself off on any difference
(SentencePiece's Metaspace, for one, adds a space to each piece's start). Added tokens that
hold whitespace or strip it around them would also be cut apart: their presence switches it
off too.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

# A newline between a non-space and a letter ends one piece; the letter starts the next. After
# a run of newlines it would not: "\n\n\n" before a letter is two pieces, "\n\n" and "\n", but
# one at the end of a cut (GPT-2's "\s+(?!\S)"). Found with str.find, not a regex: a pattern
# that starts with a lookbehind is tried at every character (0.45 ms for 20 KB of text
# without newlines, the time of tokenising 1.3 KB).
# A space between a non-space and a letter starts a piece (" word").
_WORD_START = re.compile(r"(?<=\S) (?=[^\W\d_])")

# Pieces end at the first line start at least this far into them: a piece per short line
# would make the lookups cost more than they save (a dict lookup and a slice, ~0.3 us, against
# ~2 us to tokenise 64 characters).
MIN_CHUNK_CHARS = 256
# A stretch without line starts longer than this is cut at word starts about every half of it,
# so that a long paragraph is not one piece that any difference invalidates. Measured over 600
# prompts of each `kvsched bench peers` workload (single-line text): cutting about every 1,024,
# 512 and 256 characters found 0.76-0.84, 0.81-0.86 and 0.84-0.87 of the characters cached,
# and the CPU per prompt was lowest at 512 (rag_tenants, chat, agentic); smaller pieces mean
# more entries and lookups for little more found.
MAX_CHUNK_CHARS = 1024

# A prompt tokenised only as far as the pool holds it (``PromptChunks.leading_ids``) is asked
# about only while at least this many characters are left: tokenising them costs ~0.3-0.6 ms
# where none is cached (the simulated pool's BPE, ~3 us a word on a 2-core machine), a
# question ~10-40 us, and stopping earlier saves less than a question is worth.
HELD_CHECK_MIN_REST_CHARS = 1024

# Texts the check tokenises whole and cut at every allowed place: prose, code, numbers,
# contractions, runs of spaces and newlines, tabs, non-Latin scripts and emoji.
_PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we'll leave at 13:00;\n"
    "don't   wait,  they've gone.\nNew line\n\n\nafter blanks\n \n indented line\n\ttabbed word",
    "def route(request):\n    if request.prompt is None:\n        return pick(pool)  # fallback\n"
    "    return best(pool, key=lambda w: w.score)\nclass Router:\n    pass\n",
    "Numbers 1234567 and 3.14159, dates 2026-12-06, ids A1B2 C3D4; ALL CAPS WORDS; mixedCase"
    "Words and snake_case_words. Ünïcödé wörds, naïve café, Привет мир, 東京 tokyo, émoji 😀 ok",
    "  leading spaces, trailing spaces   \nline\r\nwindows line\rcarriage return word\n- list item\n"
    "* another item\n1. numbered item\n> quoted text\n```\ncode fence\n```\n<html> tag </html>",
)

# Bytes an entry costs beyond its text and ids: the dict slot, the key and the id array's
# object headers (measured with sys.getsizeof on CPython 3.11: ~64 + ~49 + ~64).
_ENTRY_OVERHEAD_BYTES = 180


class BatchTokenizer(Protocol):
    """What is used of ``tokenizers.Tokenizer``."""

    def encode(
        self,
        sequence: Any,
        pair: Any | None = ...,
        is_pretokenized: bool = ...,
        add_special_tokens: bool = ...,
    ) -> Any: ...

    def encode_batch(
        self, input: Sequence[Any], is_pretokenized: bool = ..., add_special_tokens: bool = ...
    ) -> Any: ...

    def get_added_tokens_decoder(self) -> Any: ...


def batch_encoder(tokenizer: BatchTokenizer) -> Callable[..., Any]:
    """The tokenizer's batch call that routing uses: ``encode_batch_fast`` where the library
    has it (tokenizers 0.20 and later), the same ids without the character offsets of each
    token, which routing never reads; ``encode_batch`` otherwise. Both let go of the GIL.
    Measured on the simulated pool's tokenizer: 1,400 tokens of prose 2.98 -> 2.54 ms, 400
    tokens 1.09 -> 0.77 ms, 120 tokens 0.34 -> 0.27 ms of CPU."""
    fast: Callable[..., Any] | None = getattr(tokenizer, "encode_batch_fast", None)
    return fast if fast is not None else tokenizer.encode_batch


def chunk_bounds(
    text: str, min_chars: int = MIN_CHUNK_CHARS, max_chars: int = MAX_CHUNK_CHARS
) -> Iterator[int]:
    """The end offsets of the pieces ``text`` is cut into (the last one is ``len(text)``)."""
    start = 0
    size = len(text)
    newline = text.find("\n", min_chars - 1)
    while newline != -1:
        end = newline + 1
        if _line_cut(text, newline):
            yield from _word_cuts(text, start, end, max_chars)
            start = end
            newline = text.find("\n", start + min_chars - 1)
        else:
            newline = text.find("\n", end)
    if start < size:
        yield from _word_cuts(text, start, size, max_chars)


def _line_cut(text: str, newline: int) -> bool:
    """May ``text`` be cut after the newline at ``newline``?"""
    return 0 < newline < len(text) - 1 and not text[newline - 1].isspace() and text[newline + 1].isalpha()


def _word_cuts(text: str, start: int, end: int, max_chars: int) -> Iterator[int]:
    # A stretch longer than max_chars is cut at the first word start past each half of it.
    step = max(1, max_chars // 2)
    while end - start > max_chars:
        match = _WORD_START.search(text, start + step, end)
        if match is None:
            break
        yield match.start()
        start = match.start()
    yield end


@dataclass(slots=True)
class ChunkStats:
    prompts: int = 0
    chunks: int = 0
    chunk_hits: int = 0
    chars: int = 0
    chars_hit: int = 0
    # Ids of those characters (``chars``), for the ratio a prompt's untokenised rest is estimated at.
    tokens: int = 0
    # Characters of routed prompts left untokenised past what the pool holds (``leading_ids``).
    chars_left: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompts": self.prompts,
            "chunks": self.chunks,
            "chunk_hits": self.chunk_hits,
            "chars": self.chars,
            "chars_hit": self.chars_hit,
            "tokens": self.tokens,
            "chars_left": self.chars_left,
            "evictions": self.evictions,
        }


class PromptChunks:
    """A prompt's ids from its pieces' ids, the pieces kept in an LRU of ``max_bytes``."""

    def __init__(self, tokenizer: BatchTokenizer, *, max_bytes: int) -> None:
        self._tokenizer = tokenizer
        self._encode_batch = batch_encoder(tokenizer)
        self.max_bytes = max_bytes
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.stats = ChunkStats()
        self.disabled_reason = self._check() if max_bytes > 0 else "the piece cache is off (0 bytes)"
        if self.disabled_reason is not None and max_bytes > 0:
            log.warning("prompts are tokenised whole: %s", self.disabled_reason)
        self._special_prefix, self._special_suffix = self._special_ids()

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def ids(self, text: str, *, add_special_tokens: bool) -> Sequence[int]:
        """``text``'s ids, as ``tokenizer.encode(text, add_special_tokens)`` gives them."""
        return self.leading_ids(text, add_special_tokens=add_special_tokens)[0]

    def leading_ids(
        self,
        text: str,
        *,
        add_special_tokens: bool,
        held: Callable[[Sequence[int]], bool] | None = None,
        whole_chars: int = 0,
        min_rest_chars: int = HELD_CHECK_MIN_REST_CHARS,
    ) -> tuple[Sequence[int], int]:
        """The ids of ``text``'s first characters and how many characters are left.

        Without ``held``, or for a text of at most ``whole_chars`` characters, all of it (0
        left). Otherwise the pieces are taken in order, and before tokenising one the cache
        does not have, while at least ``min_rest_chars`` characters remain, ``held(ids so
        far)`` says whether the pool still holds everything so far; once it does not, the
        rest is left: the ids given are exactly the whole text's first ids (the cuts are the
        tokenizer's own), and no later id can change a prefix match. Pieces the cache has
        cost a lookup, so they are never a reason to ask. The questions are spaced out as the
        text grows (each after at least a quarter as many characters as came before the last
        one), so that a long prompt held throughout costs a few dozen of them, not one a piece.
        A tokenizer that cannot be cut is used whole.
        """
        if not self.enabled:
            # A batch call, not encode: only the batch calls let go of the GIL (tokenizers 0.23),
            # and a long prompt is tokenised on a worker thread beside the event loop.
            encoded = self._encode_batch([text], add_special_tokens=add_special_tokens)
            whole: list[int] = encoded[0].ids
            return whole, 0
        ids = array("Q", self._special_prefix) if add_special_tokens else array("Q")
        bounds = list(chunk_bounds(text))
        with self._lock:
            self.stats.prompts += 1
        if held is None or len(text) <= whole_chars:
            if bounds:
                self._extend(ids, text, 0, bounds)
        else:
            left = self._extend_while_held(ids, text, bounds, held, min_rest_chars)
            if left:
                with self._lock:
                    self.stats.chars_left += left
                return ids, left
        if add_special_tokens and self._special_suffix:
            ids.extend(self._special_suffix)
        return ids, 0

    def _extend_while_held(
        self,
        ids: array[int],
        text: str,
        bounds: list[int],
        held: Callable[[Sequence[int]], bool],
        min_rest_chars: int,
    ) -> int:
        """Append ``text``'s pieces' ids while the pool holds them (``leading_ids``); returns
        the characters left untokenised."""
        size = len(text)
        start = 0
        next_ask = 0  # where the pool may be asked about again
        run: list[int] = []  # consecutive pieces not yet appended
        for end in bounds:
            if start >= next_ask and size - start >= min_rest_chars and not self._cached(text[start:end]):
                if run:
                    self._extend(ids, text, run[0], run[1:])
                    run = []
                if not held(ids):
                    return size - start
                next_ask = start + start // 4
            if not run:
                run.append(start)
            run.append(end)
            start = end
        if run:
            self._extend(ids, text, run[0], run[1:])
        return 0

    def _cached(self, piece: str) -> bool:
        with self._lock:
            return piece in self._pieces

    def _extend(self, ids: array[int], text: str, start: int, bounds: list[int]) -> None:
        """Append the ids of ``text[start:bounds[-1]]``, cut at ``bounds``."""
        pieces = self._pieces
        stats = self.stats
        missing: list[tuple[int, str]] = []  # (position in ``parts``, text)
        parts: list[array[int] | None] = []
        # Long prompts are tokenised on worker threads (``PickRunner.token_ids``): the LRU's
        # lookups and moves, and its evictions, must not interleave.
        with self._lock:
            stats.chars += bounds[-1] - start
            for end in bounds:
                piece = text[start:end]
                start = end
                known = pieces.get(piece)
                if known is None:
                    missing.append((len(parts), piece))
                    parts.append(None)
                    continue
                pieces.move_to_end(piece)
                stats.chunk_hits += 1
                stats.chars_hit += len(piece)
                parts.append(known)
            stats.chunks += len(parts)
        if missing:
            # A batch of one per piece: the batch call lets go of the GIL (``encode`` keeps
            # it), and one piece per call keeps the library's worker threads out, which cost
            # more CPU than they saved time here (bench peers' prompts in arrival order, all
            # new pieces in one batch against one per call: rag 1.57 -> 1.33, agentic 1.94 ->
            # 1.63, rag_tenants 1.77 -> 1.57 ms of CPU a prompt, the same wall time), while a
            # router's cores have other requests to serve.
            encode = self._encode_batch
            encoded = [encode([piece], add_special_tokens=False)[0] for _, piece in missing]
            with self._lock:
                for (slot, piece), encoding in zip(missing, encoded, strict=True):
                    piece_ids = array("Q", encoding.ids)
                    parts[slot] = piece_ids
                    self._keep(piece, piece_ids)
        before = len(ids)
        for part in parts:
            assert part is not None
            ids.extend(part)
        with self._lock:
            stats.tokens += len(ids) - before

    def _keep(self, piece: str, piece_ids: array[int]) -> None:
        cost = _entry_bytes(piece, piece_ids)
        if cost > self.max_bytes or piece in self._pieces:  # another thread kept it meanwhile
            return
        self._pieces[piece] = piece_ids
        self.bytes_used += cost
        while self.bytes_used > self.max_bytes:
            old, old_ids = self._pieces.popitem(last=False)
            self.bytes_used -= _entry_bytes(old, old_ids)
            self.stats.evictions += 1

    @property
    def tokens_per_char(self) -> float | None:
        """Ids per character over every prompt tokenised here so far; None before the first."""
        stats = self.stats
        return stats.tokens / stats.chars if stats.chars else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "pieces": len(self._pieces),
            "bytes": self.bytes_used,
            "max_bytes": self.max_bytes,
            **self.stats.as_dict(),
        }

    # --- what the tokenizer must satisfy --------------------------------------------------

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts around a text (a BOS, an EOS) when asked to."""
        bare: list[int] = self._tokenizer.encode("a", add_special_tokens=False).ids
        full: list[int] = self._tokenizer.encode("a", add_special_tokens=True).ids
        for offset in range(len(full) - len(bare) + 1):
            if full[offset : offset + len(bare)] == bare:
                return full[:offset], full[offset + len(bare) :]
        self.disabled_reason = self.disabled_reason or "special tokens are not put around the text"
        return [], []

    def _check(self) -> str | None:
        for token in self._added_tokens():
            content = getattr(token, "content", "")
            strips = getattr(token, "lstrip", False) or getattr(token, "rstrip", False)
            if strips or any(ch.isspace() for ch in content):
                return f"added token {content!r} holds or strips whitespace"
        added = [getattr(token, "content", "") for token in self._added_tokens()][:8]
        probes = [*_PROBES, " ".join(added) + " " + _PROBES[0] + "\n" + "\n".join(added) + "\nword"]
        for probe in probes:
            whole = self._tokenizer.encode(probe, add_special_tokens=False).ids
            cuts = [0, *_all_cuts(probe), len(probe)]
            pieces = [probe[a:b] for a, b in itertools.pairwise(cuts) if b > a]
            # The batch call routing uses, against the plain call whole: the check covers both.
            parts = self._encode_batch(pieces, add_special_tokens=False)
            joined = [token for encoding in parts for token in encoding.ids]
            if joined != whole:
                return "cutting text at word and line starts changes its ids with this tokenizer"
        return None

    def _added_tokens(self) -> list[Any]:
        decoder = self._tokenizer.get_added_tokens_decoder()
        return list(decoder.values()) if isinstance(decoder, dict) else []


def _all_cuts(text: str) -> list[int]:
    """Every place ``chunk_bounds`` may cut: each line start and each word start."""
    cuts = {i + 1 for i, ch in enumerate(text) if ch == "\n" and _line_cut(text, i)}
    cuts |= {match.start() for match in _WORD_START.finditer(text)}
    return sorted(cut for cut in cuts if 0 < cut < len(text))


def _entry_bytes(piece: str, piece_ids: array[int]) -> int:
    # str stores 1, 2 or 4 bytes a character; ASCII prompts are the common case.
    width = 1 if piece.isascii() else 4
    return _ENTRY_OVERHEAD_BYTES + width * len(piece) + piece_ids.itemsize * len(piece_ids)
