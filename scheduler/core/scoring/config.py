"""Scoring configuration: scorer weights, cache-tier values, filter limits, picker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError, core_schema

from scheduler.core.hotprefix import HotPrefixConfig
from scheduler.core.registry import UnknownNameError
from scheduler.core.scoring.registry import SCORERS


class ScorerWeights(Mapping[str, float]):
    """Relative weight of each registered scorer, by name; totals are divided by the sum, so
    only ratios matter.

    Every registered scorer has a weight: the one given, else its registered default
    (``register_scorer(..., weight=)``). The built-in defaults give the estimated prefill
    wait (``prefill_wait``: the queue ahead plus the request's own uncached prefill, in time)
    3 of 7: a cache hit counts mostly as the prefill it saves, so a hot prefix spreads once
    its holder's queue outgrows recomputing it; prefix overlap (1) keeps requests on their
    cache when the wait is about the same, and the load signals (queue depth 1, KV
    utilisation 0.5, in-flight prefill tokens 1.5) break the rest. With prefix overlap at
    half the total instead, a prefix every request shares kept half the pool idle on an
    agentic workload (measured in ``prefill_wait.py``). A weight of 0 turns a scorer off
    (it is not computed); all zero leaves every candidate tied, i.e. pure least-loaded
    picking. A name no scorer is registered under is refused, naming it.

    Immutable and hashable, like the frozen configuration models around it. In a pydantic
    model it validates from (and dumps to) a plain ``{name: weight}`` mapping.
    """

    __slots__ = ("_weights",)

    def __init__(self, weights: Mapping[str, float] | None = None, /, **named: float) -> None:
        given = {**(weights or {}), **named}
        unknown = [name for name in given if name not in SCORERS]
        if unknown:
            raise ValueError(str(UnknownNameError("scorer", unknown[0], SCORERS.names())))
        negative = {name: weight for name, weight in given.items() if not float(weight) >= 0.0}
        if negative:
            raise ValueError(f"scorer weights must be >= 0, got {negative}")
        # Registration order, whatever order they were given in: totals are summed in it.
        self._weights = {
            spec.name: float(given[spec.name]) if spec.name in given else spec.default_weight
            for spec in SCORERS.specs()
        }

    @classmethod
    def only(cls, **weights: float) -> ScorerWeights:
        """These weights, and 0 for every other registered scorer."""
        return cls({**dict.fromkeys(SCORERS.names(), 0.0), **weights})

    def __getitem__(self, name: str) -> float:
        return self._weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __hash__(self) -> int:
        return hash(tuple(self._weights.items()))

    def __repr__(self) -> str:
        return f"ScorerWeights({self._weights!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # Values are checked by the dict schema (an error at weights.<name>); names by
        # _validated, which reports an unknown one at weights.<name> as well.
        # NaN and infinity are refused as such: a NaN failed ">= 0" before, a misleading message.
        weight = core_schema.float_schema(ge=0, allow_inf_nan=False)
        mapping = core_schema.dict_schema(core_schema.str_schema(), weight)
        return core_schema.no_info_before_validator_function(
            _plain_mapping,
            core_schema.no_info_after_validator_function(cls._validated, mapping),
            serialization=core_schema.plain_serializer_function_ser_schema(dict),
        )

    @classmethod
    def _validated(cls, weights: dict[str, float]) -> ScorerWeights:
        errors: list[InitErrorDetails] = []
        for name, weight in weights.items():
            if name not in SCORERS:
                message = str(UnknownNameError("scorer", name, SCORERS.names()))
                error = PydanticCustomError("unknown_scorer", "{message}", {"message": message})
                errors.append(InitErrorDetails(type=error, loc=(name,), input=weight))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return cls(weights)


def _plain_mapping(value: Any) -> Any:
    return dict(value) if isinstance(value, ScorerWeights) else value


class TierWeights(BaseModel):
    """What one matched block is worth, by the tier holding it (GPU = a free hit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: float = Field(1.0, ge=0, le=1, description="Value of a matched block held in GPU memory.")
    cpu: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Value of a matched block held in CPU memory: reloaded over PCIe, far cheaper "
        "than recomputing it.",
    )
    storage: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Value of a matched block held in local/remote storage: the slowest reload.",
    )


class FilterLimits(BaseModel):
    """When an endpoint counts as saturated, and when its scraped metrics are too old."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_waiting: int = Field(
        128,
        ge=0,
        description="Saturated above this many waiting requests (the Gateway API Inference "
        "Extension's low-queue filter uses the same figure).",
    )
    max_kv_usage: float = Field(
        0.98, gt=0, le=1, description="Saturated above this KV-cache usage (0..1): admitting more evicts."
    )
    metrics_stale_after_s: float = Field(
        2.0,
        gt=0,
        description="Scraped metrics older than this (or never scraped) are not trusted: the endpoint "
        "stays eligible, scored on kvsched's own in-flight accounting only, and is never "
        "judged saturated.",
    )


class SessionAffinityConfig(BaseModel):
    """Requests naming a session (the ext_proc transport's ``session_header``) and where they go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hard: bool = Field(
        False,
        description="Send a session's requests only to its endpoint (the rendezvous-hash winner among "
        "the healthy endpoints, the same on every replica), whatever cache and load say; off: the "
        "session_affinity scorer's weight decides how much the session's endpoint is preferred.",
    )


class BalanceGuard(BaseModel):
    """When an endpoint has so many more requests in flight than the least loaded candidate
    that it should not be the primary, whatever its cache holds.

    The scorers price the request in front of them: a cache hit on a busy holder beats
    recomputing the prefix on an idle endpoint for that one request. But the requests that
    follow it (an agent loop's next steps, a chat's next turns) go where its history is, and
    every request in flight there shares the endpoint's engine iterations: its decoding
    sequences slow every step. An endpoint whose requests ahead (``Candidates.queue``)
    exceed the least loaded candidate's by more than ``abs_requests`` and are more than
    ``rel`` times them ranks after every endpoint that is not (among those, the totals decide
    as before; the overloaded ones stay fallbacks). The test is SGLang's cache-aware
    router's imbalance check (sgl-project/sglang ``sgl-router/src/policies/cache_aware.rs``,
    026f853b: ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5), applied per
    candidate; there it sends the request to the least loaded worker, here it only takes
    the overloaded ones out of the running for the primary.

    Measured with ``kvsched bench policies --size short`` (8 workers, seed 0): on the agentic
    workload (8-step agent loops over a 2k-token tool prompt) kvsched without the guard
    filled four workers with agent loops for the first 8 s and never used two of the eight; TTFT p50/p99 went
    from 46.7/142.9 ms to 35.3/101.0 at moderate load and from 139.0/364.9 to 110.6/290.0
    near saturation with ``abs_requests`` 48, hit ratio up. 32 did as well on agentic
    moderate (34.2/85.9) but cost chat and rag hits; 64 fired too late on agentic moderate
    (37.6/126.4, hit ratio 0.866 against 0.871 without).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    abs_requests: int = Field(
        48,
        ge=0,
        description="An endpoint is overloaded when it has more than this many requests ahead beyond the "
        "least loaded candidate's (and more than rel times its count); 0 turns the guard off.",
    )
    rel: float = Field(
        1.5, ge=1, description="... and more than this many times the least loaded candidate's requests."
    )


class ScoringConfig(BaseModel):
    """How candidates are filtered, scored and ordered. Immutable: reload by building a new pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: ScorerWeights = Field(
        default_factory=ScorerWeights,
        description="Weight per registered scorer, by name (scorers left out keep their default).",
    )
    tiers: TierWeights = Field(default_factory=TierWeights, description="Matched-block value per tier.")
    limits: FilterLimits = Field(default_factory=FilterLimits, description="Saturation and staleness.")
    session_affinity: SessionAffinityConfig = Field(
        default_factory=SessionAffinityConfig, description="Requests naming a session."
    )
    mode: Literal["max_score", "softmax"] = Field(
        "max_score",
        description="'max_score': the best total wins (near-ties broken on load); 'softmax': the "
        "primary is sampled with probability proportional to exp(total / temperature).",
    )
    temperature: float = Field(
        0.05, gt=0, le=10, description="Softmax temperature, in units of the [0, 1] total score."
    )
    num_fallbacks: int = Field(2, ge=0, le=8, description="Endpoints listed after the primary.")
    slo_margin: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="A candidate counts as meeting a request's SLO when its predicted TTFT (TPOT) is "
        "within (1 - slo_margin) x the objective: room for prediction error.",
    )
    slo_unmeetable: Literal["score", "fastest"] = Field(
        "score",
        description="When no candidate is predicted to meet a request's SLO: 'score' orders by the "
        "usual total, as for a request without SLO (cache affinity keeps the pool's effective "
        "capacity); 'fastest' puts the lowest predicted TTFT first. On the Mooncake conversation "
        "trace at twice its rate, 'score' kept 31.6% of requests within a 1 s TTFT and 'fastest' "
        "15.8%: under overload, chasing the fastest prediction scatters prefixes across workers.",
    )
    own_prefill_weight: float = Field(
        2.0,
        ge=1,
        le=10,
        description="How many times the prefill_wait scorer counts the request's own uncached prefill: "
        "once as its own wait and, above 1, again for the wait it adds there for the requests behind "
        "it (its session's next steps first). 1 prices the request alone: a session's next step "
        "leaves its history's holder as soon as the holder's queue outgrows recomputing the history.",
    )
    balance: BalanceGuard = Field(
        default_factory=BalanceGuard,
        description="Endpoints with far more requests in flight than the least loaded rank last.",
    )
    hot_prefix: HotPrefixConfig = Field(
        default_factory=HotPrefixConfig,
        description="Shared prefixes whose requests outgrow their holders: priced as cached everywhere.",
    )
    tie_epsilon: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Totals within this of the best count as tied; ties go to the least loaded.",
    )
