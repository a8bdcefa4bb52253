"""Text prompts for live replays, counted by the client's own tokenizer.

A benchmark client that sends text counts tokens itself (inference-perf counts the prompt and
every streamed chunk with the model's tokenizer, loaded from a local directory). This is the
same: ``ClientTokenizer`` loads ``tokenizer.json`` from a Hugging Face directory with the
``tokenizers`` library alone, independently of kvsched's and the workers' code, so a
disagreement between client and server shows as a token-count mismatch in the report.
"""

from __future__ import annotations

from pathlib import Path

from scheduler.workloads.generators import TEXT_GENERATORS, generate
from scheduler.workloads.model import Workload


class ClientTokenizer:
    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def prompt_ids(self, text: str) -> list[int]:
        """A completion prompt's ids, special tokens included (as the server counts them)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=True).ids
        return ids

    def count(self, text: str) -> int:
        """Tokens in a fragment of generated text (no special tokens), as inference-perf counts chunks."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def single_token_words(self) -> list[str]:
        """Lower-case ASCII words that are one token after a space: text made of them,
        space-separated, tokenises to one id per word, so a prompt's length is exact."""
        words = []
        vocabulary = self._tokenizer.get_vocab(with_added_tokens=False)
        for token, token_id in sorted(vocabulary.items(), key=lambda item: item[1]):
            word = token[1:]
            if not token.startswith("Ġ") or not word.isascii() or not word.isalpha() or not word.islower():
                continue
            if self._tokenizer.encode(" " + word, add_special_tokens=False).ids == [token_id]:
                words.append(word)
        return words


def text_workload(
    name: str,
    tokenizer: ClientTokenizer,
    *,
    seed: int = 0,
    rate: float | None = None,
    requests: int | None = None,
) -> Workload:
    """Workload ``name`` as text (for the generators that can send text), its ids counted by
    ``tokenizer``."""
    if name not in TEXT_GENERATORS:
        raise ValueError(f"{name!r} has no text form; text workloads: {', '.join(sorted(TEXT_GENERATORS))}")
    workload = generate(name, seed=seed, rate=rate, requests=requests, words=tokenizer.single_token_words())
    return workload.with_token_ids(tokenizer.prompt_ids)
