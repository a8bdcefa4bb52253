"""The search space of ``kvsched tune``: every registered scorer's weight, plus the picker and
the saturation thresholds.

Scorer weights are read from the scorer registry when a search starts, so a scorer registered
later is searched with no change here. Each knob names where it lives in ``SchedulerConfig``
and in a SchedulingPolicy's spec, so a tuned point becomes either without a second mapping.
Knobs that only matter for requests with objectives (the SLO stage's margin and its rule for
unmeetable requests) are searched only when the objective is an SLO one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from scheduler.core.scheduler import SchedulerConfig
from scheduler.core.scoring.registry import SCORERS

Kind = Literal["float", "int", "categorical"]
# Weights only matter as ratios; 0-5 spans "off" to ten times the built-in load weights.
MAX_WEIGHT = 5.0
Params = dict[str, Any]


class Suggester(Protocol):
    """What a knob asks of an optimiser's trial (``optuna.Trial`` satisfies it)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True, slots=True)
class Knob:
    param: str  # the optimiser's parameter name
    config_path: tuple[str, ...]  # in SchedulerConfig
    crd_path: tuple[str, ...]  # in a SchedulingPolicy's spec
    kind: Kind
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple[Any, ...] = ()
    # Searched only when this holds for the parameters suggested before it.
    applies: Callable[[Params], bool] | None = None
    slo_only: bool = False

    def suggest(self, trial: Suggester) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.param, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.param, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.param, list(self.choices))


def camel(name: str) -> str:
    """``queue_depth`` -> ``queueDepth`` (the CRD's spelling of a snake_case name)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _softmax(params: Params) -> bool:
    return bool(params.get("picker.mode") == "softmax")


def knobs() -> list[Knob]:
    """The search space as the registries stand now."""
    weights = [
        Knob(
            f"weight.{spec.name}",
            ("scoring", "weights", spec.name),
            ("scorerWeights", camel(spec.name)),
            "float",
            0.0,
            MAX_WEIGHT,
        )
        for spec in SCORERS.specs()
    ]
    return [
        *weights,
        Knob(
            "picker.mode",
            ("scoring", "mode"),
            ("picker", "mode"),
            "categorical",
            choices=("max_score", "softmax"),
        ),
        Knob(
            "picker.temperature",
            ("scoring", "temperature"),
            ("picker", "temperature"),
            "float",
            0.005,
            0.5,
            log=True,
            applies=_softmax,
        ),
        Knob("picker.tie_epsilon", ("scoring", "tie_epsilon"), ("picker", "tieEpsilon"), "float", 0.0, 0.2),
        Knob(
            "picker.own_prefill_weight",
            ("scoring", "own_prefill_weight"),
            ("picker", "ownPrefillWeight"),
            "float",
            1.0,
            4.0,
        ),
        # 0 turns the balance guard off; past ~128 requests ahead it hardly ever fires.
        Knob(
            "picker.balance.abs_requests",
            ("scoring", "balance", "abs_requests"),
            ("picker", "balance", "absRequests"),
            "int",
            0,
            128,
        ),
        Knob(
            "picker.balance.rel",
            ("scoring", "balance", "rel"),
            ("picker", "balance", "rel"),
            "float",
            1.0,
            3.0,
        ),
        # Per holder, a hot prefix's requests over the pool's requests per endpoint: 0.5
        # spreads a prefix at half its fair share, 4 only far past it.
        Knob(
            "picker.hot_prefix.share",
            ("scoring", "hot_prefix", "share"),
            ("picker", "hotPrefix", "share"),
            "float",
            0.5,
            4.0,
            log=True,
        ),
        Knob(
            "limits.max_waiting",
            ("scoring", "limits", "max_waiting"),
            ("limits", "maxWaiting"),
            "int",
            2,
            256,
            log=True,
        ),
        Knob(
            "flow.queue_depth_threshold",
            ("flow_control", "queue_depth_threshold"),
            ("flowControl", "maxQueueDepthPerEndpoint"),
            "int",
            1,
            64,
            log=True,
        ),
        Knob(
            "flow.kv_cache_threshold",
            ("flow_control", "kv_cache_threshold"),
            ("flowControl", "maxKVUtilization"),
            "float",
            0.5,
            1.0,
        ),
        Knob(
            "picker.slo_margin",
            ("scoring", "slo_margin"),
            ("picker", "sloMargin"),
            "float",
            0.0,
            0.5,
            slo_only=True,
        ),
        Knob(
            "picker.slo_unmeetable",
            ("scoring", "slo_unmeetable"),
            ("picker", "sloUnmeetable"),
            "categorical",
            choices=("score", "fastest"),
            slo_only=True,
        ),
    ]


def searched(space: Sequence[Knob], *, slo: bool) -> list[Knob]:
    return [knob for knob in space if slo or not knob.slo_only]


def suggest(trial: Suggester, space: Sequence[Knob]) -> Params:
    """One point of the space: each knob in order, conditional ones only when they apply."""
    params: Params = {}
    for knob in space:
        if knob.applies is None or knob.applies(params):
            params[knob.param] = knob.suggest(trial)
    return params


def _get(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for part in path:
        node = node[part]
    return node


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def params_of(config: SchedulerConfig, space: Sequence[Knob]) -> Params:
    """The point of the space ``config`` sits at (conditional knobs only where they apply)."""
    dumped = config.model_dump()
    params: Params = {}
    for knob in space:
        if knob.applies is None or knob.applies(params):
            params[knob.param] = _get(dumped, knob.config_path)
    return params


def apply_params(base: SchedulerConfig, params: Params, space: Sequence[Knob]) -> SchedulerConfig:
    """``base`` with the point's settings laid over it, validated."""
    data = base.model_dump()
    for knob in space:
        if knob.param in params:
            _set(data, knob.config_path, params[knob.param])
    return SchedulerConfig.model_validate(data)


def policy_spec(config: SchedulerConfig, space: Sequence[Knob]) -> dict[str, Any]:
    """The SchedulingPolicy spec fields (without poolRef) that set every searched knob."""
    dumped = config.model_dump()
    spec: dict[str, Any] = {}
    params: Params = {}
    for knob in space:
        if knob.applies is not None and not knob.applies(params):
            continue
        value = _get(dumped, knob.config_path)
        params[knob.param] = value
        if isinstance(value, str) and knob.kind == "categorical":
            value = camel(value)  # the CRD's enum spelling: max_score -> maxScore
        if isinstance(value, float):
            value = round(value, 4)
        _set(spec, knob.crd_path, value)
    return spec
