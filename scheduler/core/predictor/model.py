"""Trained latency models and the compiled tree ensembles that evaluate them at pick time.

xgboost trains the trees (training.py) but does not answer picks: its per-call overhead
alone (``inplace_predict``, no DMatrix) runs to hundreds of microseconds for 64 rows, more
than a whole pick's budget. A trained booster is compiled instead, from its JSON dump, into flat arrays
(CompiledEnsemble) that one call of the Cython kernel ``scheduler._native.treeeval``
walks for every candidate and every tree. A vectorised numpy walk over the same arrays
answers where the extension is not built; tests hold the two and xgboost to the same
numbers.
"""

from __future__ import annotations

import importlib
import io
import json
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from scheduler.core.predictor.features import FEATURE_NAMES, NUM_FEATURES, FeatureMatrix
from scheduler.core.predictor.prior import TTFT_TERMS, PriorModel

Floats = npt.NDArray[np.float64]
Transform = Literal["log", "identity"]

# One 16-byte record per node; see kernels/treeeval.pyx for the encoding.
NODE_DTYPE: Final = np.dtype([("feature", "<i4"), ("threshold", "<f4"), ("left", "<i4"), ("value", "<f4")])
FORMAT_VERSION: Final = 1
# Regression objectives whose prediction is the raw margin (no link function).
IDENTITY_OBJECTIVES: Final = ("reg:squarederror", "reg:absoluteerror")


def _load_native() -> ModuleType | None:
    try:
        return importlib.import_module("scheduler._native.treeeval")
    except ImportError:
        return None


_native = _load_native()
NATIVE_EVALUATOR: Final = _native is not None


@dataclass(frozen=True, slots=True, eq=False)
class CompiledEnsemble:
    """A regression tree ensemble as flat arrays: margin = base_score + sum of one leaf per tree."""

    nodes: npt.NDArray[np.void]  # NODE_DTYPE records, each tree's in breadth-first order
    missing_right: npt.NDArray[np.uint8]  # per record: a NaN feature goes right
    roots: npt.NDArray[np.int32]  # each tree's root record
    depths: npt.NDArray[np.int32]  # steps from each root to its deepest leaf
    base_score: float
    num_features: int  # feature columns the trees read (max index + 1)

    @property
    def trees(self) -> int:
        return int(self.roots.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if self.depths.size else 0

    def margin(self, features: FeatureMatrix) -> Floats:
        """Raw ensemble output per row (before the target transform is undone)."""
        if _native is None:
            return self.margin_numpy(features)
        return self.margin_native(features)

    def _checked(self, features: FeatureMatrix) -> FeatureMatrix:
        if features.ndim != 2 or features.shape[1] < self.num_features:
            raise ValueError(f"expected (rows, >= {self.num_features}) features, got {features.shape}")
        return np.ascontiguousarray(features, dtype=np.float32)

    def margin_native(self, features: FeatureMatrix) -> Floats:
        if _native is None:
            raise RuntimeError("scheduler._native.treeeval is not built")
        x = self._checked(features)
        out = np.empty(x.shape[0], dtype=np.float64)
        _native.ensemble_margin(
            x, self.nodes, self.missing_right, self.roots, self.depths, self.base_score, out
        )
        return out

    def margin_numpy(self, features: FeatureMatrix) -> Floats:
        """The same walk vectorised over (tree, row) pairs: one numpy pass per tree level."""
        x = self._checked(features)
        nodes = self.nodes
        feature, threshold, left = nodes["feature"], nodes["threshold"], nodes["left"]
        rows = np.arange(x.shape[0])
        at = np.repeat(self.roots[:, None], x.shape[0], axis=1)
        for _ in range(self.max_depth):
            value = x[rows, feature[at]]
            go_right = np.where(np.isnan(value), self.missing_right[at], value >= threshold[at])
            at = left[at] + go_right
        margin: Floats = self.base_score + nodes["value"][at].sum(axis=0, dtype=np.float64)
        return margin

    def to_arrays(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        return {
            f"{prefix}nodes": self.nodes,
            f"{prefix}missing_right": self.missing_right,
            f"{prefix}roots": self.roots,
            f"{prefix}depths": self.depths,
            f"{prefix}base_score": np.array([self.base_score], dtype=np.float64),
            f"{prefix}num_features": np.array([self.num_features], dtype=np.int64),
        }

    @staticmethod
    def from_arrays(arrays: Any, prefix: str) -> CompiledEnsemble:
        nodes = np.asarray(arrays[f"{prefix}nodes"])
        if nodes.dtype != NODE_DTYPE:
            raise ValueError(f"node records have dtype {nodes.dtype}, expected {NODE_DTYPE}")
        ensemble = CompiledEnsemble(
            nodes=nodes,
            missing_right=np.asarray(arrays[f"{prefix}missing_right"], dtype=np.uint8),
            roots=np.asarray(arrays[f"{prefix}roots"], dtype=np.int32),
            depths=np.asarray(arrays[f"{prefix}depths"], dtype=np.int32),
            base_score=float(arrays[f"{prefix}base_score"][0]),
            num_features=int(arrays[f"{prefix}num_features"][0]),
        )
        # A loaded file is untrusted input to a kernel that does no bounds checks.
        _validate(ensemble)
        return _frozen(ensemble)


def _frozen(ensemble: CompiledEnsemble) -> CompiledEnsemble:
    for array in (ensemble.nodes, ensemble.missing_right, ensemble.roots, ensemble.depths):
        array.setflags(write=False)
    return ensemble


def _validate(ensemble: CompiledEnsemble) -> None:
    """Every index the kernel follows stays inside its array, whatever the records say."""
    nodes = ensemble.nodes
    n = nodes.shape[0]
    # Leaves read feature 0 too (and ignore it), so at least one column is always read.
    if not 1 <= ensemble.num_features <= NUM_FEATURES:
        raise ValueError(f"trees read {ensemble.num_features} features, the layout has {NUM_FEATURES}")
    if ensemble.missing_right.shape != (n,) or (n and ensemble.missing_right.max() > 1):
        raise ValueError("missing_right needs one 0/1 entry per node")
    if n:
        feature, left = nodes["feature"], nodes["left"]
        if feature.min() < 0 or feature.max() >= ensemble.num_features:
            raise ValueError("a node reads a feature outside the layout")
        # A step lands on left + 1 at most; only a leaf (NaN threshold, missing stays left)
        # never does.
        stays = np.isnan(nodes["threshold"]) & (ensemble.missing_right == 0)
        if left.min() < 0 or (left + np.where(stays, 0, 1)).max() >= n:
            raise ValueError("a node's child is outside the ensemble")
    if ensemble.roots.shape != ensemble.depths.shape:
        raise ValueError("roots and depths differ in length")
    if ensemble.roots.size and (ensemble.roots.min() < 0 or ensemble.roots.max() >= n):
        raise ValueError("a root is outside the ensemble")
    if ensemble.depths.size and ensemble.depths.min() < 0:
        raise ValueError("a tree has a negative depth")


def _parse_base_score(text: str) -> float:
    # xgboost >= 3 writes a vector ("[1.5E0]") for multi-target support; older ones a scalar.
    values = [float(v) for v in str(text).strip("[]").split(",") if v.strip()]
    if len(values) != 1:
        raise ValueError(f"expected one base score, got {text!r}")
    return values[0]


def _compile_tree(
    tree: dict[str, Any], offset: int
) -> tuple[npt.NDArray[np.void], npt.NDArray[np.uint8], int]:
    """One xgboost tree as records from ``offset`` on, breadth first with sibling pairs adjacent."""
    if any(int(t) != 0 for t in tree.get("split_type", ())):
        raise ValueError("categorical splits are not supported")
    left, right = tree["left_children"], tree["right_children"]
    feature, condition, default_left = tree["split_indices"], tree["split_conditions"], tree["default_left"]
    # Records in the order they are placed: (xgboost node id, depth).
    order: list[tuple[int, int]] = [(0, 0)]
    depth = 0
    records: list[tuple[int, float, int, float]] = []
    missing_right: list[int] = []
    for position, (node, level) in enumerate(order):  # order grows while it is walked
        depth = max(depth, level)
        if left[node] < 0:
            # Leaves hold their value in split_conditions (xgboost's own convention).
            records.append((0, math.nan, offset + position, float(condition[node])))
            missing_right.append(0)
            continue
        records.append((int(feature[node]), float(condition[node]), offset + len(order), 0.0))
        missing_right.append(0 if default_left[node] else 1)
        order.append((left[node], level + 1))
        order.append((right[node], level + 1))
    return np.array(records, dtype=NODE_DTYPE), np.array(missing_right, dtype=np.uint8), depth


def compile_booster_json(raw: bytes | str) -> CompiledEnsemble:
    """Compile an xgboost regression booster (``save_raw("json")``) into a CompiledEnsemble."""
    doc = json.loads(raw)
    learner = doc["learner"]
    objective = learner["objective"]["name"]
    if objective not in IDENTITY_OBJECTIVES:
        # Other objectives apply a link function to the margin (and transform base_score).
        raise ValueError(f"only {' and '.join(IDENTITY_OBJECTIVES)} boosters compile, got {objective}")
    booster = learner["gradient_booster"]
    if booster.get("name", "gbtree") != "gbtree":
        raise ValueError(f"only gbtree boosters compile, got {booster.get('name')}")
    params = learner["learner_model_param"]
    if int(params.get("num_target", "1")) != 1:
        raise ValueError("only single-target boosters compile")
    blocks: list[npt.NDArray[np.void]] = []
    missing: list[npt.NDArray[np.uint8]] = []
    roots: list[int] = []
    depths: list[int] = []
    offset = 0
    for tree in booster["model"]["trees"]:
        block, missing_right, depth = _compile_tree(tree, offset)
        blocks.append(block)
        missing.append(missing_right)
        roots.append(offset)
        depths.append(depth)
        offset += block.shape[0]
    nodes = np.concatenate(blocks) if blocks else np.empty(0, dtype=NODE_DTYPE)
    splits = ~np.isnan(nodes["threshold"])
    ensemble = CompiledEnsemble(
        nodes=nodes,
        missing_right=np.concatenate(missing) if missing else np.empty(0, dtype=np.uint8),
        roots=np.asarray(roots, dtype=np.int32),
        depths=np.asarray(depths, dtype=np.int32),
        base_score=_parse_base_score(params["base_score"]),
        num_features=int(nodes["feature"][splits].max()) + 1 if splits.any() else 1,
    )
    _validate(ensemble)
    return _frozen(ensemble)


def to_target_space(ms: Floats, transform: Transform) -> Floats:
    return np.log1p(ms) if transform == "log" else ms


def from_margin(margin: Floats, transform: Transform) -> Floats:
    """Milliseconds from an ensemble's output; never negative."""
    ms = np.expm1(margin, out=margin) if transform == "log" else margin
    return np.maximum(ms, 0.0, out=ms)


def mape(predicted: Floats, observed: Floats) -> float:
    """Mean absolute percentage error (as a fraction) over the samples with a positive observation."""
    usable = observed > 0.0
    if not usable.any():
        return float("nan")
    return float(np.mean(np.abs(predicted[usable] - observed[usable]) / observed[usable]))


@dataclass(frozen=True, slots=True)
class TargetScore:
    """How one target's predictions did on the held-out samples of a training job."""

    holdout_samples: int
    model_mape: float | None  # None: no model fitted (too few samples) or nothing held out
    prior_mape: float | None  # the refitted prior's, for comparison; None: nothing held out
    model_used: bool  # the model answers this target (else the prior does)


@dataclass(frozen=True, slots=True, eq=False)
class TrainedModel:
    """What one training job produced: an ensemble per target (or None: the prior answers) and the prior."""

    version: int
    prior: PriorModel
    ttft: CompiledEnsemble | None
    tpot: CompiledEnsemble | None
    transform: Transform
    train_samples: int
    ttft_score: TargetScore
    tpot_score: TargetScore
    # xgboost's own JSON of each fitted booster, kept for inspection and comparisons;
    # predictions never read it.
    boosters: dict[str, bytes] = field(default_factory=dict)
    # The trees correct the prior (PredictorConfig.residual_to_prior): their output is added
    # to the prior's prediction in the target space.
    residual: bool = False

    def predict_ttft(self, features: FeatureMatrix) -> Floats:
        if self.ttft is None:
            return self.prior.predict_ttft(features)
        margin = self.ttft.margin(features)
        if self.residual:
            margin += to_target_space(self.prior.predict_ttft(features), self.transform)
        return from_margin(margin, self.transform)

    def predict_row(self, row: FeatureMatrix) -> tuple[float, float]:
        """(TTFT, TPOT) ms of one row (shape (NUM_FEATURES,)), bit for bit ``predict_ttft``
        and ``predict_tpot`` on it: the prior's terms in Python floats
        (``PriorModel.predict_row``), each ensemble once on the row, and the transforms on
        numpy scalars, which run the arrays' ufunc loops. A pick predicts its chosen endpoint
        alone, and through the array path that was 17% of a live pick (py-spy over kvsched
        bench epp; ttft_design's array alone 9%)."""
        prior_ttft, prior_tpot = self.prior.predict_row(row)
        rows = row[None, :]
        return self._row_target(self.ttft, rows, prior_ttft), self._row_target(self.tpot, rows, prior_tpot)

    def _row_target(self, ensemble: CompiledEnsemble | None, rows: FeatureMatrix, prior: float) -> float:
        if ensemble is None:
            return prior
        log = self.transform == "log"
        margin = float(ensemble.margin(rows)[0])
        if self.residual:
            margin += float(np.log1p(prior)) if log else prior
        ms = float(np.expm1(margin)) if log else margin
        # np.maximum's answer: a NaN stays NaN.
        return 0.0 if ms < 0.0 else ms

    def predict_tpot(self, features: FeatureMatrix) -> Floats:
        if self.tpot is None:
            return self.prior.predict_tpot(features)
        margin = self.tpot.margin(features)
        if self.residual:
            margin += to_target_space(self.prior.predict_tpot(features), self.transform)
        return from_margin(margin, self.transform)

    def to_bytes(self) -> bytes:
        ensembles = [name for name in ("ttft", "tpot") if getattr(self, name) is not None]
        header = {
            "format": FORMAT_VERSION,
            "features": list(FEATURE_NAMES),
            "version": self.version,
            "transform": self.transform,
            "train_samples": self.train_samples,
            "prior": prior_to_json(self.prior),
            "ttft_score": _score_to_json(self.ttft_score),
            "tpot_score": _score_to_json(self.tpot_score),
            "ensembles": ensembles,
            "boosters": sorted(self.boosters),
            "residual": self.residual,
        }
        arrays: dict[str, npt.NDArray[Any]] = {"header": _json_array(header)}
        for name in ensembles:
            ensemble = getattr(self, name)
            arrays.update(ensemble.to_arrays(f"{name}_"))
        for name, raw in self.boosters.items():
            arrays[f"booster_{name}"] = np.frombuffer(raw, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> TrainedModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            header = json.loads(arrays["header"].tobytes())
            if header.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported model format {header.get('format')}")
            if tuple(header["features"]) != FEATURE_NAMES:
                raise ValueError("the model was trained on a different feature layout")
            ensembles = {
                name: CompiledEnsemble.from_arrays(arrays, f"{name}_") for name in header["ensembles"]
            }
            boosters = {name: arrays[f"booster_{name}"].tobytes() for name in header["boosters"]}
        transform = header["transform"]
        if transform not in ("log", "identity"):
            raise ValueError(f"unknown target transform {transform!r}")
        return TrainedModel(
            version=int(header["version"]),
            prior=prior_from_json(header["prior"]),
            ttft=ensembles.get("ttft"),
            tpot=ensembles.get("tpot"),
            transform=transform,
            train_samples=int(header["train_samples"]),
            ttft_score=TargetScore(**header["ttft_score"]),
            tpot_score=TargetScore(**header["tpot_score"]),
            boosters=boosters,
            residual=bool(header.get("residual", False)),
        )


def _json_array(value: Any) -> npt.NDArray[np.uint8]:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _score_to_json(score: TargetScore) -> dict[str, Any]:
    return {
        "holdout_samples": score.holdout_samples,
        "model_mape": score.model_mape,
        "prior_mape": score.prior_mape,
        "model_used": score.model_used,
    }


def prior_to_json(prior: PriorModel) -> dict[str, Any]:
    return {
        "ttft": list(prior.ttft),
        "tpot": list(prior.tpot),
        "ttft_fitted_on": prior.ttft_fitted_on,
        "tpot_fitted_on": prior.tpot_fitted_on,
    }


# Terms of the TTFT law's first version (a base and four terms), the oldest a saved prior has.
_FIRST_TTFT_TERMS = 4


def prior_from_json(value: dict[str, Any]) -> PriorModel:
    ttft = tuple(float(c) for c in value["ttft"])
    if 1 + _FIRST_TTFT_TERMS <= len(ttft) < 1 + TTFT_TERMS:
        # Saved with the law before its later terms (prefill x decode batch, then the decoding
        # requests' prompt tokens; each appended after the others): fitted without them, so
        # their coefficients are 0.
        ttft = (*ttft, *[0.0] * (1 + TTFT_TERMS - len(ttft)))
    prior = PriorModel(
        ttft=ttft,
        tpot=tuple(float(c) for c in value["tpot"]),
        ttft_fitted_on=int(value["ttft_fitted_on"]),
        tpot_fitted_on=int(value["tpot_fitted_on"]),
    )
    if len(prior.ttft) != 1 + TTFT_TERMS or len(prior.tpot) != 2:
        raise ValueError("prior coefficients have the wrong length")
    return prior
