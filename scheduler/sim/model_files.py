"""How the simulated model's tokenizer files in ``scheduler/sim/model/`` were made.

``python -m scheduler.sim.model_files OUT_DIR`` writes, in the Hugging Face layout that
``transformers.AutoTokenizer``, vLLM and benchmark clients load offline:

* ``tokenizer.json``: a byte-level BPE (GPT-2 / Llama-3 style: the GPT-2 pre-tokenizer
  regex, every byte representable, exact decode) of 32,000 ids, Llama-2's vocabulary
  size, so the token-id workloads (ids 1..31,999) stay valid prompts. A completion prompt
  gets ``<s>`` in front (vLLM's ``add_special_tokens=True`` default), like Llama's BOS.
* ``tokenizer_config.json``: the chat template and special tokens;
* ``config.json``: the simulated model's shape (context length, vocabulary size).

The merges are learned by the ``tokenizers`` BPE trainer (deterministic for a given
corpus) from English technical prose found on any Python installation: the docstrings of
the standard library and the ``pydoc`` topics, plus the docstrings of numpy, scipy and
matplotlib (about 10 MB). The shipped files were made once, with the versions recorded
in ``build.json``; kvsched loads them and never retrains. Measured with the shipped
files, held-out English prose tokenises at 4.2-4.6 characters per token (the GPL-3,
MPL-2.0 and Apache-2.0 texts), a markdown README with tables and numbers at 3.2: the
scale of Llama's tokenizers (about 4 on English), so simulated prefill work is realistic.

The generated text of the simulated engine is a fixed cycle of common English words,
each a single token with its leading space (the first also without; ``FILLER_WORDS``); ``build``
refuses a vocabulary where that is not so, because then an answer re-sent in the next
turn of a conversation would not tokenise back to the ids the engine generated and cached.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

VOCAB_SIZE = 32_000
MAX_MODEL_LEN = 8192
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|developer|>")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, *ROLE_TOKENS, END_OF_TURN)

# Output token i of every request is FILLER_WORDS[i % 16]: the first without a leading
# space (an answer starts a message), the others with one.
FILLER_WORDS = (
    "the",
    "model",
    "answers",
    "with",
    "plain",
    "words",
    "so",
    "that",
    "every",
    "token",
    "is",
    "known",
    "and",
    "can",
    "be",
    "cached",
)

# One message per turn: the role's token, a newline, the content, the end-of-turn token and
# a newline. Content is rendered as a string (vLLM then flattens a list of text parts with
# newlines, as kvsched's request codec does), never trimmed, so an answer re-sent as an
# assistant message tokenises to exactly the ids generated.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # Function tools as JSON ahead of the turns, where most tool-aware templates put them.
    "{% if tools %}{{ '<|tools|>\\n' }}{{ tools | tojson }}{{ '<|end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}{{ message['content'] or '' }}{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CORPUS_PACKAGES = ("numpy", "scipy", "matplotlib")


def _docstrings(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "test/", "tests/")) or "/test" in relative:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def corpus(packages: Iterable[str] = CORPUS_PACKAGES) -> list[str]:
    """The training texts, in a fixed order."""
    from pydoc_data import topics

    texts = list(_docstrings(Path(sysconfig.get_paths()["stdlib"])))
    texts += [topics.topics[key] for key in sorted(topics.topics)]
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the tokenizer corpus needs {package} installed")
        texts += _docstrings(Path(spec.origin).parent)
    return texts


def build(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    check_filler(tokenizer)
    return tokenizer


def check_filler(tokenizer: Any) -> None:
    """Each filler word is one token with its leading space (the first also without), and the
    cycle round-trips."""
    for index, word in enumerate(FILLER_WORDS):
        for text in (word, " " + word) if index == 0 else (" " + word,):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"filler word {index} {text!r} is {len(ids)} tokens in this vocabulary")
    cycle = "".join(word if i == 0 else " " + word for i, word in enumerate(FILLER_WORDS * 2))
    ids = tokenizer.encode(cycle, add_special_tokens=False).ids
    if len(ids) != 2 * len(FILLER_WORDS) or tokenizer.decode(ids) != cycle:
        raise ValueError("the filler cycle does not round-trip through this vocabulary")


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_MODEL_LEN,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(tokenizer: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": MAX_MODEL_LEN,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
    }


def write(directory: Path, packages: Iterable[str] = CORPUS_PACKAGES) -> None:
    packages = tuple(packages)
    texts = corpus(packages)
    tokenizer = build(texts)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)
    dump = {"indent": 1, "sort_keys": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), **dump) + "\n")  # type: ignore[arg-type]
    (directory / "config.json").write_text(json.dumps(model_config(tokenizer), **dump) + "\n")  # type: ignore[arg-type]
    provenance = {
        "python": sysconfig.get_python_version(),
        "packages": {name: importlib.metadata.version(name) for name in ("tokenizers", *packages)},
        "corpus_texts": len(texts),
        "corpus_chars": sum(len(text) for text in texts),
    }
    (directory / "build.json").write_text(json.dumps(provenance, **dump) + "\n")  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the simulated model's tokenizer files.")
    parser.add_argument("out", type=Path, help="directory to write (created if missing)")
    args = parser.parse_args(argv)
    write(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
