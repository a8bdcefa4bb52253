"""Model-name rewriting with weights: the Inference Extension's InferenceModelRewrite rules.

Follows ``InferenceModelRewriteSpec`` of kubernetes-sigs/gateway-api-inference-extension
(``apix/v1alpha2/inferencemodelrewrite_types.go``, alpha since v1.2.1; API group
``inference.networking.x-k8s.io/v1alpha2``) and its guide (``site-src/api-types/
inferencemodelrewrite.md``):

* a rule's ``matches`` are Exact model names, any of which matches (logical OR); a rule with
  no ``matches`` matches every request, including one that names no model;
* precedence: a rule with an Exact match for the request's model wins over a generic rule;
  among equals, the first rule listed wins;
* ``targets`` split the matched traffic: target i gets weight_i / sum(weights) of it, chosen
  weighted-randomly per request (the reference implementation's algorithm); weights are all
  given (1..1,000,000) or all omitted (equal shares).

The draw is passed in (a number in [0, 1) from the caller's seeded rng), so this stays free of
I/O and randomness of its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RewriteRule:
    models: tuple[str, ...]  # Exact matches; empty: every request
    targets: tuple[RewriteTarget, ...]

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a rewrite rule needs at least one target")
        for target in self.targets:
            if not target.model:
                raise ValueError("a rewrite target needs a model name")
            if not 1 <= target.weight <= MAX_WEIGHT:
                raise ValueError(f"weight of {target.model!r} must be within 1..{MAX_WEIGHT}")


class ModelRewrites:
    """The rules of a pool, resolved once into a lookup by model name."""

    def __init__(self, rules: Sequence[RewriteRule] = ()) -> None:
        self.rules = tuple(rules)
        self._exact: dict[str, RewriteRule] = {}
        self._generic: RewriteRule | None = None
        for rule in self.rules:
            if not rule.models:
                if self._generic is None:
                    self._generic = rule
                continue
            for model in rule.models:
                self._exact.setdefault(model, rule)
        self._cumulative = {
            id(rule): list(accumulate(target.weight for target in rule.targets)) for rule in self.rules
        }

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rewrite(self, model: str | None, draw: float) -> str | None:
        """The model a request naming ``model`` is sent as, or None when no rule matches.

        ``draw``: uniform in [0, 1), one per request.
        """
        rule = self._exact.get(model) if model is not None else None
        if rule is None:
            rule = self._generic
        if rule is None:
            return None
        cumulative = self._cumulative[id(rule)]
        position = bisect.bisect_right(cumulative, draw * cumulative[-1])
        return rule.targets[min(position, len(rule.targets) - 1)].model
