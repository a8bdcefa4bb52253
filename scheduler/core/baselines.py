"""Baseline routing policies, for comparison with kvsched's scoring pipeline.

They run inside the same Scheduler as the pipeline (same endpoint view, same in-flight
accounting), so the live server, the demo and the simulator compare policies on equal
terms. Each returns endpoint names, best first.

* ``round_robin`` and ``random``: cache- and load-blind.
* ``least_loaded``: fewest queued requests (scraped waiting + kvsched's own in-flight).
* ``queue_only`` / ``cache_only``: kvsched's pipeline scoring only the queue depth, or
  only the prefix overlap (ties to the least loaded): what either signal is worth alone.
* ``prefix_balance``: SGLang's cache-aware router (sgl-router ``CacheAwarePolicy``,
  defaults cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5):
  if the load is imbalanced (max - min > 64 and max > 1.5 x min) take the least
  loaded; else the longest prefix match when it covers more than 30% of the prompt;
  else the worker with the most free cache (fewest indexed blocks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scheduler.core.scoring import EndpointState, PrefixMatch

PolicyName = Literal[
    "kvsched", "round_robin", "random", "least_loaded", "prefix_balance", "queue_only", "cache_only"
]
BASELINE_POLICIES: tuple[PolicyName, ...] = ("round_robin", "random", "least_loaded", "prefix_balance")
# kvsched's own pipeline with one signal only (see ``PIPELINE_PRESETS`` in scheduler.py):
# ablations that show what each half of the score is worth.
SINGLE_SIGNAL_POLICIES: tuple[PolicyName, ...] = ("queue_only", "cache_only")
ALL_POLICIES: tuple[PolicyName, ...] = ("kvsched", *BASELINE_POLICIES, *SINGLE_SIGNAL_POLICIES)

SGLANG_CACHE_THRESHOLD = 0.3
SGLANG_BALANCE_ABS_THRESHOLD = 64
SGLANG_BALANCE_REL_THRESHOLD = 1.5


@dataclass(frozen=True, slots=True)
class BaselineInput:
    candidates: Sequence[EndpointState]  # eligible (healthy, within any subset hint)
    matches: Mapping[str, PrefixMatch]
    prompt_blocks: int
    cached_blocks: Callable[[str], int]  # blocks the index holds for an endpoint


def _load(state: EndpointState) -> int:
    return state.waiting + state.inflight_requests


def _by_load(candidates: Sequence[EndpointState]) -> list[str]:
    return [s.name for s in sorted(candidates, key=lambda s: (_load(s), s.inflight_prefill_tokens, s.name))]


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def order(self, data: BaselineInput, rng: random.Random) -> list[str]:
        names = sorted(s.name for s in data.candidates)
        if not names:
            return []
        start = self._next % len(names)
        self._next += 1
        return names[start:] + names[:start]


class RandomPick:
    def order(self, data: BaselineInput, rng: random.Random) -> list[str]:
        names = sorted(s.name for s in data.candidates)
        rng.shuffle(names)
        return names


class LeastLoaded:
    def order(self, data: BaselineInput, rng: random.Random) -> list[str]:
        return _by_load(data.candidates)


class PrefixBalance:
    def order(self, data: BaselineInput, rng: random.Random) -> list[str]:
        candidates = data.candidates
        if not candidates:
            return []
        by_load = _by_load(candidates)
        loads = [_load(s) for s in candidates]
        high, low = max(loads), min(loads)
        if high - low > SGLANG_BALANCE_ABS_THRESHOLD and high > SGLANG_BALANCE_REL_THRESHOLD * low:
            return by_load
        best = max(candidates, key=lambda s: (_matched(data, s.name), -_load(s), s.name))
        if data.prompt_blocks and _matched(data, best.name) / data.prompt_blocks > SGLANG_CACHE_THRESHOLD:
            primary = best.name
        else:
            primary = min(candidates, key=lambda s: (data.cached_blocks(s.name), _load(s), s.name)).name
        return [primary] + [name for name in by_load if name != primary]


def _matched(data: BaselineInput, name: str) -> int:
    match = data.matches.get(name)
    return match.total_blocks if match else 0


Baseline = RoundRobin | RandomPick | LeastLoaded | PrefixBalance


def make_baseline(name: PolicyName) -> Baseline | None:
    """The baseline named, or None for the policies the scoring pipeline runs."""
    if name == "kvsched" or name in SINGLE_SIGNAL_POLICIES:
        return None
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return RandomPick()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_balance":
        return PrefixBalance()
    raise ValueError(f"{name!r} is not a baseline policy; choose from {', '.join(BASELINE_POLICIES)}")
