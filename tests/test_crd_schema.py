"""The SchedulingPolicy CRD: structural, self-consistent, and strict about the objects it admits.

No Kubernetes API server runs here. The CRD's openAPIV3Schema is turned into the JSON Schema
the API server effectively enforces (structural schema, strict field validation, defaulting),
and sample objects under tests/fixtures/k8s/schedulingpolicy/ are checked with jsonschema:
valid ones pass after defaulting, each invalid one fails on exactly the constraint it breaks.
The CRD object itself is validated with kubernetes-validate against the apiextensions.k8s.io/v1
schema of Kubernetes 1.30 and of the newest release the package ships.

The helpers here (load_crd, policy_validator, apply_defaults) are also used by test_helm_chart.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "charts" / "kvsched" / "crds" / "schedulingpolicies.kvsched.io.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s" / "schedulingpolicy"

KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

# The JSONSchemaProps fields a structural schema may use (apiextensions.k8s.io/v1); anything
# else ($ref, definitions, patternProperties, ...) is rejected by the API server.
ALLOWED_KEYS = {
    "type", "format", "description", "default", "enum", "nullable", "required", "properties",
    "additionalProperties", "items", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "example", "title", "multipleOf",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
}  # fmt: skip


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return crd


def served_version(crd: dict[str, Any], name: str = "v1alpha1") -> dict[str, Any]:
    for version in crd["spec"]["versions"]:
        if version["name"] == name:
            found: dict[str, Any] = version
            return found
    raise AssertionError(f"version {name} not in the CRD")


def openapi_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = served_version(crd or load_crd())["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> draft 2020-12 JSON Schema with the API server's strictness.

    Unknown fields are errors (kubectl's default fieldValidation=Strict), `nullable` adds null,
    OpenAPI's boolean exclusiveMinimum/Maximum become numeric bounds, and int-or-string becomes
    an anyOf. List-map keys are kept for the extra keyword that policy_validator adds.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = to_json_schema(value)
        elif key == "additionalProperties":
            out[key] = to_json_schema(value) if isinstance(value, dict) else value
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            if value:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = node[bound]
        elif key in ("minimum", "maximum"):
            exclusive = "exclusiveMinimum" if key == "minimum" else "exclusiveMaximum"
            if not node.get(exclusive):
                out[key] = value
        elif key == "x-kubernetes-list-map-keys":
            out[key] = value
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "properties" in node
    ):
        out["additionalProperties"] = False
    return out


def _list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    seen: set[tuple[str, ...]] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(repr(item.get(name)) for name in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entries for map keys {keys}: {key}")
        seen.add(key)


PolicyValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


def policy_validator(crd: dict[str, Any] | None = None) -> Any:
    schema = to_json_schema(openapi_schema(crd))
    return PolicyValidator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def apply_defaults(schema: dict[str, Any], instance: Any) -> Any:
    """Fill in defaults the way the API server does: a missing field with a default gets it,
    then the defaulting continues inside every present field (so `default: {}` cascades)."""
    if isinstance(instance, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
        for name, sub in schema["properties"].items():
            if name in instance:
                apply_defaults(sub, instance[name])
    elif isinstance(instance, list) and "items" in schema:
        for item in instance:
            apply_defaults(schema["items"], item)
    return instance


def errors_of(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted path, failing keyword) of every error, after defaulting."""
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(obj))
    return sorted(
        (".".join(str(part) for part in error.absolute_path), str(error.validator))
        for error in policy_validator().iter_errors(defaulted)
    )


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _load(path: Path) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(path.read_text())
    return obj


VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))

# Each invalid fixture breaks exactly one rule: (path of the error, JSON Schema keyword).
EXPECTED_ERRORS = {
    "negative-weight": ("spec.scorerWeights.queueDepth", "minimum"),
    "unknown-picker-mode": ("spec.picker.mode", "enum"),
    "temperature-zero": ("spec.picker.temperature", "exclusiveMinimum"),
    "temperature-too-high": ("spec.picker.temperature", "maximum"),
    "hot-prefix-share-zero": ("spec.picker.hotPrefix.share", "exclusiveMinimum"),
    "missing-poolref-name": ("spec.poolRef", "required"),
    "missing-spec": ("", "required"),
    "too-many-fallbacks": ("spec.picker.numFallbacks", "maximum"),
    "fractional-fallbacks": ("spec.picker.numFallbacks", "type"),
    "misspelt-field": ("spec", "additionalProperties"),
    "unknown-hash-mode": ("spec.kvEvents.hashMode", "enum"),
    "kv-utilization-above-one": ("spec.flowControl.maxKVUtilization", "maximum"),
    "pool-kind-service": ("spec.poolRef.kind", "enum"),
    "duplicate-condition-type": ("status.conditions", "x-kubernetes-list-map-keys"),
    "condition-bad-status": ("status.conditions.0.status", "enum"),
}


def test_every_invalid_fixture_has_an_expected_error() -> None:
    assert {path.stem for path in INVALID} == set(EXPECTED_ERRORS)
    assert len(VALID) >= 3


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_policies_are_accepted(path: Path) -> None:
    assert errors_of(_load(path)) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_policies_are_rejected_for_their_one_fault(path: Path) -> None:
    assert errors_of(_load(path)) == [EXPECTED_ERRORS[path.stem]]


def test_minimal_policy_is_completed_by_the_defaults() -> None:
    policy = apply_defaults(openapi_schema(), _load(FIXTURES / "valid" / "minimal.yaml"))
    spec = policy["spec"]
    assert spec["poolRef"] == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": "llama-pool",
    }
    assert spec["scorerWeights"] == {
        "prefixOverlap": 1,
        "queueDepth": 1,
        "kvUtilization": 0.5,
        "inflightLoad": 1.5,
        "predictedLatency": 0,
        "prefillWait": 3,
        "sessionAffinity": 0,
        "loraAffinity": 2,
    }
    assert spec["tierWeights"] == {"gpu": 1, "cpu": 0.8, "storage": 0.5}
    assert spec["picker"] == {
        "mode": "maxScore",
        "temperature": 0.05,
        "numFallbacks": 2,
        "tieEpsilon": 0.02,
        "ownPrefillWeight": 2,
        "balance": {"absRequests": 48, "rel": 1.5},
        "hotPrefix": {
            "enabled": True,
            "share": 1,
            "minRequests": 48,
            "halfLifeSeconds": 10,
            "maxEntries": 50000,
        },
        "sloMargin": 0.1,
        "sloUnmeetable": "score",
    }
    assert spec["limits"] == {"maxWaiting": 128, "maxKvUsage": 0.98, "metricsStaleAfterSeconds": 2}
    assert spec["flowControl"]["maxQueueDepthPerEndpoint"] == 5
    assert spec["flowControl"]["maxWaitMs"] == 20000
    # Settings of the process, not of scoring: left out, the config file's value stays.
    assert spec["kvEvents"] == {}
    assert "scrapeIntervalMs" not in spec
    # No default objective (a request without SLO headers has none) and no predictor defaults
    # (left out, the configuration file's predictor settings stay).
    assert "sloDefaults" not in spec and "predictor" not in spec
    assert "status" not in policy


def test_defaults_do_not_override_what_is_set() -> None:
    policy = apply_defaults(openapi_schema(), _load(FIXTURES / "valid" / "older-pool-group.yaml"))
    spec = policy["spec"]
    assert spec["poolRef"]["group"] == "inference.networking.x-k8s.io"
    assert spec["scorerWeights"]["prefixOverlap"] == 0
    assert spec["scorerWeights"]["queueDepth"] == 1
    assert spec["picker"]["numFallbacks"] == 0
    assert spec["picker"]["mode"] == "maxScore"
    assert spec["flowControl"]["maxKVUtilization"] == 1


# --- the CRD against the settings kvsched runs with -------------------------------------------

# How each SchedulerConfig section stands in the CRD. In full: every field has a CRD default
# equal to kvsched's own, so a policy is complete once the API server has defaulted it. By
# field: a policy may set fields, none is defaulted (left out, the config file's value stays).
# Not at all: the index layout is fixed per process (a policy may only assert it), the seed and
# the comparison policies are for experiments. A new section must be put in one of these.
SECTIONS_IN_FULL = {"scoring", "health", "approximate", "speculative", "flow_control"}
SECTIONS_BY_FIELD = {"predictor", "slo_defaults", "disaggregation"}
# sync: how the replicas of one deployment share load, set with them (the chart), not per policy.
# candidates: what a pick costs in a large pool, not how it routes.
NOT_IN_POLICIES = {"index", "seed", "policy", "sync", "candidates"}
# CRD bounds kvsched deliberately refuses although the schema admits them.
REFUSED_ALTHOUGH_ADMITTED: set[tuple[str, ...]] = set()


def _leaves(data: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, data


def _at(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def _defaulted_spec() -> dict[str, Any]:
    policy = apply_defaults(openapi_schema(), _load(FIXTURES / "valid" / "minimal.yaml"))
    spec: dict[str, Any] = policy["spec"]
    return spec


def test_crd_defaults_are_the_schedulers_defaults() -> None:
    from scheduler.adapters.kubernetes.policy import PolicySettings
    from scheduler.core.scheduler import SchedulerConfig

    settings = PolicySettings.from_spec(_defaulted_spec())
    defaults = SchedulerConfig().model_dump()
    converted = dict(_leaves(dict(settings.scheduler)))
    assert converted, "the defaulted policy sets nothing"
    for path, value in converted.items():
        crd = ".".join(settings.origin[path])
        assert value == _at(defaults, path), (
            f"spec.{crd} defaults to {value!r}, kvsched to {_at(defaults, path)!r}"
        )
    # ... and every setting of a section carried in full has a CRD default, so none can be
    # added to SchedulerConfig without the CRD learning it.
    sections = set(SchedulerConfig.model_fields)
    assert sections <= SECTIONS_IN_FULL | SECTIONS_BY_FIELD | NOT_IN_POLICIES, (
        f"SchedulerConfig sections the CRD does not account for: "
        f"{sorted(sections - SECTIONS_IN_FULL - SECTIONS_BY_FIELD - NOT_IN_POLICIES)}"
    )
    missing = [
        ".".join(path)
        for path, _ in _leaves(defaults)
        if path[0] in SECTIONS_IN_FULL and path not in converted
    ]
    assert missing == [], f"SchedulerConfig settings without a SchedulingPolicy default: {missing}"
    assert not any(path[0] in SECTIONS_BY_FIELD for path in converted)
    # A policy of nothing but defaults leaves kvsched exactly as it starts.
    assert settings.scheduler_config(SchedulerConfig()) == SchedulerConfig()


def _crd_numeric_bounds() -> Iterator[tuple[tuple[str, ...], str, float]]:
    spec_schema = openapi_schema()["properties"]["spec"]
    for path, node in _walk(spec_schema, ""):
        if node.get("type") not in ("integer", "number"):
            continue
        parts = tuple(part for part in path.split(".") if part)
        for bound in ("minimum", "maximum"):
            if bound in node:
                value = node[bound]
                exclusive = node.get("exclusiveMinimum" if bound == "minimum" else "exclusiveMaximum")
                if exclusive:
                    value = value + 1e-6 if bound == "minimum" else value - 1e-6
                yield parts, bound, value


def test_every_value_the_crd_admits_is_a_valid_setting() -> None:
    from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
    from scheduler.core.scheduler import SchedulerConfig

    refused = []
    checked = 0
    sections = set(SchedulerConfig.model_fields)
    for parts, bound, value in _crd_numeric_bounds():
        if parts[0] in ("kvEvents", "scrapeIntervalMs"):
            continue  # process settings, checked apart
        if parts[0] == "predictor" and "predictor" not in sections:
            continue
        spec: dict[str, Any] = {"poolRef": {"name": "p"}}
        node = spec
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = int(value) if isinstance(value, float) and value.is_integer() else value
        try:
            PolicySettings.from_spec(spec).scheduler_config(SchedulerConfig())
        except PolicyError as exc:
            if (*parts, bound) not in REFUSED_ALTHOUGH_ADMITTED:
                refused.append(f"spec.{'.'.join(parts)} = {value} ({bound}): {exc}")
        checked += 1
    assert checked >= 30
    assert refused == []


def test_unknown_fields_are_refused_by_name() -> None:
    from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
    from scheduler.core.scheduler import SchedulerConfig

    with pytest.raises(PolicyError, match=r"spec\.tierWeights\.hbm: not a setting"):
        PolicySettings.from_spec({"tierWeights": {"hbm": 1}}).scheduler_config(SchedulerConfig())
    # A scorer weight names a scorer: an unregistered one is refused by its CRD path and name.
    with pytest.raises(
        PolicyError, match=r"spec\.scorerWeights\.sloUrgency: no scorer named 'slo_urgency' is registered"
    ):
        PolicySettings.from_spec({"scorerWeights": {"sloUrgency": 1}}).scheduler_config(SchedulerConfig())


def test_a_registered_scorer_is_weighted_by_a_policy() -> None:
    from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
    from scheduler.core.scheduler import SchedulerConfig
    from scheduler.core.scoring import SCORERS, QueueDepthScorer, register_scorer

    spec = apply_defaults(openapi_schema(), _load(FIXTURES / "valid" / "registered-scorer.yaml"))["spec"]
    # The schema keeps the name it does not list (no pruning) and still defaults the built-ins.
    assert spec["scorerWeights"] == {
        "prefixOverlap": 3,  # the fixture sets it
        "zoneAffinity": 2,
        "queueDepth": 1,
        "kvUtilization": 0.5,
        "inflightLoad": 1.5,
        "predictedLatency": 0,
        "prefillWait": 3,
        "sessionAffinity": 0,
        "loraAffinity": 2,
    }
    settings = PolicySettings.from_spec(spec)
    with pytest.raises(
        PolicyError, match=r"spec\.scorerWeights\.zoneAffinity: no scorer named 'zone_affinity'"
    ):
        settings.scheduler_config(SchedulerConfig())

    class ZoneAffinity(QueueDepthScorer):
        name = "zone_affinity"

    register_scorer("zone_affinity", ZoneAffinity, weight=0.0, description="Endpoints in zone a first.")
    try:
        weights = settings.scheduler_config(SchedulerConfig()).scoring.weights
        assert (weights["zone_affinity"], weights["prefix_overlap"]) == (2.0, 3.0)
        snake_case = PolicySettings.from_spec({"scorerWeights": {"zone_affinity": 4}})
        assert snake_case.scheduler_config(SchedulerConfig()).scoring.weights["zone_affinity"] == 4.0
    finally:
        SCORERS.remove("zone_affinity")


def test_enum_values_map_onto_the_settings() -> None:
    from scheduler.adapters.kubernetes.policy import PolicySettings
    from scheduler.core.scheduler import SchedulerConfig

    spec_schema = openapi_schema()["properties"]["spec"]
    modes = spec_schema["properties"]["picker"]["properties"]["mode"]["enum"]
    for mode in modes:
        config = PolicySettings.from_spec({"picker": {"mode": mode}}).scheduler_config(SchedulerConfig())
        assert config.scoring.mode in ("max_score", "softmax")
    hash_modes = spec_schema["properties"]["kvEvents"]["properties"]["hashMode"]["enum"]
    from scheduler.core.index import IndexConfig

    assert set(hash_modes) == set(IndexConfig.model_fields["hash_mode"].annotation.__args__)  # type: ignore[union-attr]


def test_schema_is_structural() -> None:
    schema = openapi_schema()
    problems = []
    for path, node in _walk(schema, "$"):
        if unknown := set(node) - ALLOWED_KEYS:
            problems.append(f"{path}: keys not allowed in a structural schema: {sorted(unknown)}")
        typeless = not node.get("x-kubernetes-int-or-string") and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        if typeless and not node.get("type"):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: both properties and additionalProperties")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{path}: required {name!r} is not a property")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if node.get("x-kubernetes-list-type") == "map":
            item_props = node["items"].get("properties", {})
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in node["items"].get("required", []) or key not in item_props:
                    problems.append(f"{path}: list-map key {key!r} must be a required item field")
        if "exclusiveMinimum" in node and "minimum" not in node:
            problems.append(f"{path}: exclusiveMinimum without minimum")
    # The API server forbids restricting metadata beyond name/generateName.
    assert set(schema["properties"]["metadata"]) == {"type"}
    assert problems == []


def test_every_default_is_valid_under_its_own_schema() -> None:
    checked = 0
    for path, node in _walk(openapi_schema(), "$"):
        if "default" not in node:
            continue
        # The API server validates each default after defaulting inside it (and pruning).
        value = apply_defaults(node, copy.deepcopy(node["default"]))
        errors = list(PolicyValidator(to_json_schema(node)).iter_errors(value))
        assert errors == [], f"{path}: default {node['default']!r}: {[e.message for e in errors]}"
        checked += 1
    assert checked >= 30


def test_crd_metadata_and_columns() -> None:
    crd = load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["group"] == "kvsched.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "SchedulingPolicy"
    assert spec["names"]["shortNames"] == ["schedpol"]
    version = served_version(crd)
    assert version["served"] and version["storage"]
    assert [v["name"] for v in spec["versions"] if v["storage"]] == ["v1alpha1"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Pool", "Mode", "Accepted", "Age"]
    assert columns["Age"]["type"] == "date"
    schema = openapi_schema(crd)
    # Printer columns must point at fields the schema has.
    for name, column in columns.items():
        if name in ("Accepted", "Age"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"]
    assert columns["Accepted"]["jsonPath"] == '.status.conditions[?(@.type=="Accepted")].status'
    status = schema["properties"]["status"]["properties"]
    assert status["observedGeneration"]["type"] == "integer"
    condition = status["conditions"]["items"]
    assert set(condition["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert set(condition["properties"]) == set(condition["required"]) | {"observedGeneration"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_crd_object_is_valid_apiextensions_v1(kube_version: str) -> None:
    crd = load_crd()
    assert kubernetes_validate.validate(crd, kube_version, strict=True)
    broken = copy.deepcopy(crd)
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["minimumm"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kube_version, strict=True)
