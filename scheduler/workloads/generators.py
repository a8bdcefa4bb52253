"""Seeded workload generators with the prefix structures production traffic has.

Every generator is a pure function of its parameters and ``seed``; token ids are drawn
from a 32k vocabulary (id 0 left out); new sessions, agents or queries arrive as a
Poisson process of ``rate`` per second, and ``requests`` (when given) keeps the first
that many requests by arrival.

* ``chat``: multi-turn sessions; a few system prompts shared by many sessions; every
  turn resends the whole conversation (the previous answer included) plus a new user
  message, after a think time.
* ``rag``: a shared pool of long documents with Zipf popularity, each behind one of a
  few few-shot preambles; each query is preamble + document + a short unique question.
* ``agentic``: agent loops over a long tool-description prompt; every step appends the
  agent's action and the tool's result, so contexts grow turn after turn.
* ``shared_prefix``: the shape of inference-perf's ``shared_prefix`` data generator
  (kubernetes-sigs/inference-perf ``inference_perf/datagen/synthetic/shared_prefix_datagen.py``,
  0.7.0): ``groups`` random system prompts, ``prompts_per_group`` random questions after
  each, every prompt sent at most once in a seeded shuffled order, at a constant ``rate``.
  Given ``words`` (single-token words of a tokenizer) the prompts are text, each word one
  token, so the server's count is known; otherwise token ids.
* ``burst``: chat sessions whose first requests arrive together (within ``spread_s``),
  over a few system prompts no endpoint has seen: every first request is routed before
  any endpoint's KV events can report the shared prefix (a launch, a batch job, a retry
  storm after an outage).
* ``lora`` (``kvsched bench lora``): many LoRA adapters behind one base model, chosen with
  Zipf popularity; each request names its adapter as its model and sends one system prompt
  every adapter shares,
  then its adapter's own instructions, then a unique question. The shared prompt's blocks
  hash differently under each adapter (vLLM keys them per adapter), so only a pod that
  served the same adapter holds them.
* ``default``: the demo's mix (chat and RAG, ~440 requests over about a minute), with
  strong prefix sharing and moderate load, so that cache-aware routing visibly beats
  round-robin on 8 simulated workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from scheduler.workloads.model import Workload, WorkloadRequest

VOCAB = 32_000
BLOCK_TOKENS = 16


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    values: list[int] = rng.integers(1, VOCAB, size=max(n, 0)).tolist()
    return values


def _poisson_starts(rng: np.random.Generator, count: int, rate: float) -> list[float]:
    if rate <= 0:
        raise ValueError("rate must be positive")
    starts: list[float] = np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()
    return starts


def _between(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return int(rng.integers(low, high + 1))


def _finish(name: str, requests: list[WorkloadRequest], limit: int | None, **meta: object) -> Workload:
    requests.sort(key=lambda r: r.arrival_s)
    if limit is not None:
        del requests[limit:]
    return Workload(name, requests, block_tokens=BLOCK_TOKENS, meta={"generator": name, **meta})


def chat(
    *,
    seed: int = 0,
    sessions: int = 60,
    turns: int = 6,
    system_prompts: int = 4,
    system_tokens: int = 1024,
    user_tokens: tuple[int, int] = (40, 200),
    answer_tokens: tuple[int, int] = (60, 240),
    think_time_s: float = 4.0,
    rate: float = 2.0,
    requests: int | None = None,
) -> Workload:
    """Chat sessions starting at ``rate`` per second; ``requests`` sets the session count too."""
    if requests is not None:
        sessions = math.ceil(requests / turns)
    rng = np.random.default_rng(seed)
    systems = [_tokens(rng, system_tokens) for _ in range(system_prompts)]
    out: list[WorkloadRequest] = []
    for s, start in enumerate(_poisson_starts(rng, sessions, rate)):
        context = list(systems[int(rng.integers(system_prompts))])
        at = start
        for turn in range(turns):
            context += _tokens(rng, _between(rng, user_tokens))
            answer = _between(rng, answer_tokens)
            out.append(WorkloadRequest(f"chat-{s}-{turn}", at, list(context), answer, f"chat-{s}"))
            # The next turn carries this answer. The server's own answer tokens are not
            # known in advance, so fresh tokens of the same length stand for them.
            context += _tokens(rng, answer)
            at += float(rng.exponential(think_time_s)) + 1.0
    return _finish("chat", out, requests, seed=seed)


def rag(
    *,
    seed: int = 0,
    requests: int | None = 300,
    documents: int = 24,
    document_tokens: int = 2048,
    preambles: int = 3,
    preamble_tokens: int = 512,
    question_tokens: tuple[int, int] = (20, 80),
    answer_tokens: tuple[int, int] = (40, 160),
    zipf_a: float = 1.2,
    rate: float = 6.0,
) -> Workload:
    """``requests`` queries at ``rate`` per second over ``documents`` Zipf-popular documents."""
    count = 300 if requests is None else requests
    rng = np.random.default_rng(seed)
    fewshot = [_tokens(rng, preamble_tokens) for _ in range(preambles)]
    docs = [_tokens(rng, document_tokens) for _ in range(documents)]
    weights = 1.0 / np.arange(1, documents + 1) ** zipf_a
    weights /= weights.sum()
    out = []
    for i, at in enumerate(_poisson_starts(rng, count, rate)):
        preamble = fewshot[int(rng.integers(preambles))]
        doc = docs[int(rng.choice(documents, p=weights))]
        prompt = preamble + doc + _tokens(rng, _between(rng, question_tokens))
        out.append(WorkloadRequest(f"rag-{i}", at, prompt, _between(rng, answer_tokens)))
    return _finish("rag", out, count, seed=seed)


def agentic(
    *,
    seed: int = 0,
    agents: int = 24,
    steps: int = 8,
    tools_tokens: int = 2048,
    task_tokens: tuple[int, int] = (100, 400),
    tool_result_tokens: tuple[int, int] = (150, 700),
    action_tokens: tuple[int, int] = (30, 120),
    step_gap_s: float = 1.5,
    rate: float = 1.0,
    requests: int | None = None,
) -> Workload:
    """Agents starting at ``rate`` per second, ``steps`` model calls each, contexts growing."""
    if requests is not None:
        agents = math.ceil(requests / steps)
    rng = np.random.default_rng(seed)
    tools = _tokens(rng, tools_tokens)
    out = []
    for a, start in enumerate(_poisson_starts(rng, agents, rate)):
        context = tools + _tokens(rng, _between(rng, task_tokens))
        at = start
        for step in range(steps):
            action = _between(rng, action_tokens)
            out.append(WorkloadRequest(f"agent-{a}-{step}", at, list(context), action, f"agent-{a}"))
            context += _tokens(rng, action) + _tokens(rng, _between(rng, tool_result_tokens))
            at += float(rng.exponential(step_gap_s)) + 0.5
    return _finish("agentic", out, requests, seed=seed)


def shared_prefix(
    *,
    seed: int = 0,
    groups: int = 64,
    prompts_per_group: int = 4,
    system_tokens: int = 800,
    question_tokens: int = 64,
    output_tokens: int = 64,
    rate: float = 4.0,
    requests: int | None = 240,
    words: Sequence[str] | None = None,
) -> Workload:
    """``requests`` (default 240: 4 req/s for 60 s) of ``groups * prompts_per_group`` prompts
    at a constant ``rate``, each prompt at most once while prompts last."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = np.random.default_rng(seed)
    vocabulary = list(words) if words else None

    def piece(n: int) -> tuple[list[int], str | None]:
        if vocabulary is None:
            return _tokens(rng, n), None
        picked = rng.integers(0, len(vocabulary), size=n)
        return [], "".join(" " + vocabulary[int(i)] for i in picked)

    prompts: list[tuple[list[int], str | None]] = []
    for _ in range(groups):
        system_ids, system_text = piece(system_tokens)
        for _ in range(prompts_per_group):
            question_ids, question_text = piece(question_tokens)
            text = None if system_text is None or question_text is None else (system_text + question_text)
            prompts.append((system_ids + question_ids, text))
    order = rng.permutation(len(prompts))
    count = len(prompts) if requests is None else min(requests, len(prompts))
    out = []
    for i in range(count):
        ids, text = prompts[int(order[i])]
        out.append(WorkloadRequest(f"sp-{i}", i / rate, ids, output_tokens, prompt_text=text))
    return _finish("shared_prefix", out, count, seed=seed, groups=groups, prompts_per_group=prompts_per_group)


def burst(
    *,
    seed: int = 0,
    sessions: int = 128,
    turns: int = 2,
    system_prompts: int = 8,
    system_tokens: int = 4096,
    user_tokens: tuple[int, int] = (40, 200),
    answer_tokens: tuple[int, int] = (60, 240),
    think_time_s: float = 4.0,
    spread_s: float = 0.25,
    rate: float | None = None,
    requests: int | None = None,
) -> Workload:
    """``sessions`` chat sessions all starting within ``spread_s`` seconds (``rate``, when
    given, sets ``spread_s`` to ``sessions / rate``); ``requests`` sets the session count too."""
    if requests is not None:
        sessions = math.ceil(requests / turns)
    if rate is not None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        spread_s = sessions / rate
    rng = np.random.default_rng(seed)
    systems = [_tokens(rng, system_tokens) for _ in range(system_prompts)]
    starts = np.sort(rng.uniform(0.0, spread_s, size=sessions)).tolist()
    out: list[WorkloadRequest] = []
    for s, start in enumerate(starts):
        context = list(systems[int(rng.integers(system_prompts))])
        at = float(start)
        for turn in range(turns):
            context += _tokens(rng, _between(rng, user_tokens))
            answer = _between(rng, answer_tokens)
            out.append(WorkloadRequest(f"burst-{s}-{turn}", at, list(context), answer, f"burst-{s}"))
            context += _tokens(rng, answer)
            at += float(rng.exponential(think_time_s)) + 1.0
    return _finish("burst", out, requests, seed=seed)


def lora(
    *,
    seed: int = 0,
    requests: int | None = 1200,
    adapters: int = 30,
    zipf_a: float = 1.0,
    shared_tokens: int = 1024,
    adapter_tokens: int = 256,
    question_tokens: tuple[int, int] = (30, 300),
    answer_tokens: tuple[int, int] = (40, 200),
    rate: float = 48.0,
) -> Workload:
    """``requests`` at ``rate`` per second, each naming one of ``adapters`` LoRA adapters
    (``lora-00`` the most popular; weight 1 / rank ** ``zipf_a``)."""
    count = 1200 if requests is None else requests
    rng = np.random.default_rng(seed)
    shared = _tokens(rng, shared_tokens)
    instructions = [_tokens(rng, adapter_tokens) for _ in range(adapters)]
    weights = 1.0 / np.arange(1, adapters + 1) ** zipf_a
    weights /= weights.sum()
    out = []
    for i, at in enumerate(_poisson_starts(rng, count, rate)):
        adapter = int(rng.choice(adapters, p=weights))
        prompt = shared + instructions[adapter] + _tokens(rng, _between(rng, question_tokens))
        out.append(
            WorkloadRequest(
                f"lora-{i}", at, prompt, _between(rng, answer_tokens), model=f"lora-{adapter:02d}"
            )
        )
    return _finish("lora", out, count, seed=seed, adapters=adapters, zipf_a=zipf_a)


# The default mix: 48 chat sessions of 5 turns and 200 RAG queries, about 440 requests.
_DEFAULT_SESSIONS, _DEFAULT_TURNS, _DEFAULT_QUERIES = 48, 5, 200
_DEFAULT_RATE = 7.0  # new sessions + new queries per second: 2 + 5


def default(*, seed: int = 0, rate: float | None = None, requests: int | None = None) -> Workload:
    """The demo's workload: chat sessions over six shared system prompts plus RAG traffic over
    sixteen documents. ``rate`` is new chat sessions plus new RAG queries per second (default
    7, split 2:5); ``requests`` scales both parts in proportion."""
    factor = (rate or _DEFAULT_RATE) / _DEFAULT_RATE
    size = 1.0 if requests is None else requests / (_DEFAULT_SESSIONS * _DEFAULT_TURNS + _DEFAULT_QUERIES)
    conversations = chat(
        seed=seed,
        sessions=max(1, math.ceil(_DEFAULT_SESSIONS * size)),
        turns=_DEFAULT_TURNS,
        system_prompts=6,
        system_tokens=1536,
        rate=2.0 * factor,
    )
    documents = rag(
        seed=seed + 1, requests=max(1, math.ceil(_DEFAULT_QUERIES * size)), documents=16, rate=5.0 * factor
    )
    return _finish("default", conversations.requests + documents.requests, requests, seed=seed)


# Generators that send text when given a tokenizer's single-token words.
TEXT_GENERATORS = frozenset({"shared_prefix"})

GENERATORS: dict[str, Callable[..., Workload]] = {
    "chat": chat,
    "rag": rag,
    "agentic": agentic,
    "default": default,
    "shared_prefix": shared_prefix,
    "burst": burst,
}
# Not in GENERATORS: its requests name LoRA adapters, which only a pool serving them can run
# (``kvsched bench lora`` gives the simulated pool adapter slots); a replay against the
# demo's pool would see every request refused.


def generate(
    name: str,
    *,
    seed: int = 0,
    rate: float | None = None,
    requests: int | None = None,
    words: Sequence[str] | None = None,
) -> Workload:
    """Workload ``name`` with its defaults, overriding the arrival ``rate`` and the request
    count when given (see each generator for what its rate counts); ``words`` makes the
    generators that take them send text."""
    try:
        generator = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(sorted(GENERATORS))}") from None
    overrides: dict[str, Any] = {}
    if rate is not None:
        overrides["rate"] = rate
    if requests is not None:
        overrides["requests"] = requests
    if words is not None and name in TEXT_GENERATORS:
        overrides["words"] = words
    return generator(seed=seed, **overrides)
