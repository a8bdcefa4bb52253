"""Seeded workload generators with the prefix structures production traffic has.

* ``chat``: multi-turn sessions; a few system prompts shared by many sessions; every
  turn resends the whole conversation plus a new user message (the previous answer
  included), after a think time.
* ``rag``: a pool of long documents with Zipf popularity behind a shared few-shot
  preamble; each request is preamble + one document + a short unique question.
* ``agentic``: agent loops over a long tool-description prompt; every step appends the
  previous tool result, so contexts grow turn after turn.
* ``default``: the demo's mix (chat and RAG), tuned so cache-aware routing visibly beats
  round-robin on 8 simulated workers within about a minute.

Token ids are drawn from a 32k vocabulary; sessions start as a Poisson process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scheduler.workloads.model import Workload, WorkloadRequest

VOCAB = 32_000


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    values: list[int] = rng.integers(1, VOCAB, size=max(n, 0)).tolist()
    return values


def _poisson_starts(rng: np.random.Generator, count: int, rate: float) -> list[float]:
    starts: list[float] = np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()
    return starts


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
    session_rate: float = 2.0,
) -> Workload:
    rng = np.random.default_rng(seed)
    systems = [_tokens(rng, system_tokens) for _ in range(system_prompts)]
    requests: list[WorkloadRequest] = []
    for s, start in enumerate(_poisson_starts(rng, sessions, session_rate)):
        context = list(systems[int(rng.integers(system_prompts))])
        at = start
        for turn in range(turns):
            context += _tokens(rng, int(rng.integers(*user_tokens)))
            answer = int(rng.integers(*answer_tokens))
            requests.append(WorkloadRequest(f"chat-{s}-{turn}", at, list(context), answer, f"chat-{s}"))
            # The next turn carries this answer (as the engine generated it, approximated
            # by fresh tokens: the server's own answer tokens are not known in advance).
            context += _tokens(rng, answer)
            at += float(rng.exponential(think_time_s)) + 1.0
    requests.sort(key=lambda r: r.arrival_s)
    return Workload("chat", requests)


def rag(
    *,
    seed: int = 0,
    requests: int = 300,
    documents: int = 24,
    document_tokens: int = 2048,
    preamble_tokens: int = 512,
    question_tokens: tuple[int, int] = (20, 80),
    answer_tokens: tuple[int, int] = (40, 160),
    zipf_a: float = 1.2,
    rate: float = 6.0,
) -> Workload:
    rng = np.random.default_rng(seed)
    preamble = _tokens(rng, preamble_tokens)
    docs = [_tokens(rng, document_tokens) for _ in range(documents)]
    weights = 1.0 / np.arange(1, documents + 1) ** zipf_a
    weights /= weights.sum()
    out = []
    for i, at in enumerate(_poisson_starts(rng, requests, rate)):
        doc = docs[int(rng.choice(documents, p=weights))]
        prompt = preamble + doc + _tokens(rng, int(rng.integers(*question_tokens)))
        out.append(WorkloadRequest(f"rag-{i}", at, prompt, int(rng.integers(*answer_tokens))))
    return Workload("rag", out)


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
    agent_rate: float = 1.0,
) -> Workload:
    rng = np.random.default_rng(seed)
    tools = _tokens(rng, tools_tokens)
    out = []
    for a, start in enumerate(_poisson_starts(rng, agents, agent_rate)):
        context = tools + _tokens(rng, int(rng.integers(*task_tokens)))
        at = start
        for step in range(steps):
            action = int(rng.integers(*action_tokens))
            out.append(WorkloadRequest(f"agent-{a}-{step}", at, list(context), action, f"agent-{a}"))
            context += _tokens(rng, action) + _tokens(rng, int(rng.integers(*tool_result_tokens)))
            at += float(rng.exponential(step_gap_s)) + 0.5
    out.sort(key=lambda r: r.arrival_s)
    return Workload("agentic", out)


def default(*, seed: int = 0, scale: float = 1.0) -> Workload:
    """The demo's workload: chat sessions over shared system prompts plus RAG traffic."""
    conversations = chat(
        seed=seed, sessions=int(48 * scale), turns=5, system_prompts=6, system_tokens=1536, session_rate=2.0
    )
    documents = rag(seed=seed + 1, requests=int(200 * scale), documents=16, rate=5.0)
    merged = sorted(conversations.requests + documents.requests, key=lambda r: r.arrival_s)
    return Workload("default", merged)


GENERATORS: dict[str, Callable[..., Workload]] = {
    "chat": chat,
    "rag": rag,
    "agentic": agentic,
    "default": default,
}


def generate(name: str, *, seed: int = 0) -> Workload:
    try:
        generator = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(sorted(GENERATORS))}") from None
    return generator(seed=seed)
