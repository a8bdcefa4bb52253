"""The scorer registry: every scorer a configuration can weight, with its default weight.

Adding a scorer is one class (``name`` and ``score(candidates, request, config)``, see
``scorers.py``) and one line::

    register_scorer("queue_depth", QueueDepthScorer, weight=1.0,
                    description="Fewer requests ahead ...")

From then on ``scoring.weights`` (serve config), ``scorerWeights`` (SchedulingPolicy, camelCase
or snake_case) and ``ScorerWeights(...)`` accept the name, every default pipeline builds the
scorer, and a weight of 0 (the usual default for a new one) leaves it out of the picks.

This module imports nothing else of the pipeline: the configuration (``config.py``) validates
weights against it, and the scorers, which read the configuration, register into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.core.registry import Registry


@dataclass(frozen=True, slots=True)
class ScorerSpec:
    name: str  # snake_case; the key of its weight
    # Builds the scorer (called once per pipeline): an object with ``name`` and ``score``
    # (``scorers.Scorer``), checked when a pipeline is built.
    factory: Callable[[], object]
    default_weight: float  # its weight when a configuration does not set one
    description: str  # one line, for documentation and listings
    # Reads latency predictions (``Candidates.predicted_ttft_ms``): sits out the picks made
    # without them.
    needs_predictions: bool = False
    # Reads the request's LoRA adapter: sits out the picks of requests that name none, so
    # their totals are what they would be without it.
    needs_adapter: bool = False


SCORERS: Registry[ScorerSpec] = Registry("scorer")


def register_scorer(
    name: str,
    factory: Callable[[], object],
    *,
    weight: float,
    description: str,
    needs_predictions: bool = False,
    needs_adapter: bool = False,
) -> ScorerSpec:
    """Register a scorer under ``name``; a name registered before is refused."""
    if not weight >= 0.0:
        raise ValueError(f"scorer {name!r}: default weight must be >= 0, got {weight!r}")
    if not description or "\n" in description:
        raise ValueError(f"scorer {name!r}: the description must be one line")
    spec = ScorerSpec(name, factory, float(weight), description, needs_predictions, needs_adapter)
    return SCORERS.add(spec)
