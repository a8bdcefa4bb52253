"""The Helm chart, rendered and linted by Helm's own engine, and what it renders validated.

No Kubernetes API server and no Docker engine run here. Helm v4's Go library (helm-python-sdk,
no helm binary) renders and lints charts/kvsched for the default values and several other value
sets, exactly as `helm template` / `helm lint` would; rendering also applies values.schema.json.
Every rendered built-in object is validated with kubernetes-validate in strict mode (unknown
fields are errors) against the schemas of Kubernetes 1.30 and of the newest release the package
ships. Custom-resource objects are validated against their CRD: SchedulingPolicy against the
chart's own CRD, InferencePool and ServiceMonitor against schemas for the fields this chart uses,
written here from the upstream API definitions (their CRDs are not part of this chart). The
Dockerfile is checked as text against the chart: same uid, ports, entrypoint and config path.
"""

from __future__ import annotations

import copy
import json
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate
from test_crd_schema import KUBE_VERSIONS, apply_defaults, openapi_schema, policy_validator

REPO = Path(__file__).resolve().parents[1]
CHART_DIR = REPO / "charts" / "kvsched"
RELEASE = "demo"
NAMESPACE = "llm"
FULLNAME = "demo-kvsched"
CONFIG_PATH = "/etc/kvsched/config.yaml"

# Values as a Gateway API Inference Extension `inferencepool` chart user writes them.
GIE_VALUES: dict[str, Any] = {
    "inferenceExtension": {
        "replicas": 3,
        "image": {"hub": "registry.example/ml", "name": "kvsched", "tag": "v9.9.9", "pullPolicy": "Always"},
        "extProcPort": 9002,
        "failureMode": "FailOpen",
        "flags": {"v": 4, "kv-events-timeout": "5s"},
        "env": [{"name": "EXTRA_SETTING", "value": "on"}],
        "extraContainerPorts": [{"name": "debug", "containerPort": 6060, "protocol": "TCP"}],
        "extraServicePorts": [{"name": "debug", "port": 6060, "protocol": "TCP", "targetPort": 6060}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "epp", "effect": "NoSchedule"}],
        "monitoring": {
            "interval": "15s",
            "prometheus": {
                "enabled": True,
                "auth": {"enabled": True, "secretName": "metrics-reader-token"},
                "extraLabels": {"release": "prometheus"},
            },
        },
    },
    "inferencePool": {
        "apiVersion": "inference.networking.k8s.io/v1",
        "modelServerType": "vllm",
        "targetPorts": [{"number": 8000}, {"number": 8001}],
        "modelServers": {"matchLabels": {"app": "vllm-llama3-8b", "llm-d.ai/inference-serving": True}},
    },
    "provider": {"name": "none"},
}

POLICY_SPEC = {
    "scorerWeights": {"prefixOverlap": 4, "queueDepth": 1},
    "picker": {"mode": "softmax", "temperature": 0.5},
    "kvEvents": {"blockSize": 32},
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tls-secret": {"inferenceExtension": {"tls": {"mode": "secret", "secretName": "kvsched-tls"}}},
    "plaintext": {"inferenceExtension": {"tls": {"mode": "plaintext"}}},
    "gie-pool": GIE_VALUES,
    "servicemonitor": {"inferenceExtension": {"monitoring": {"prometheus": {"enabled": True}}}},
    "replicas-3": {"inferenceExtension": {"replicas": 3}},
    "single-replica": {"inferenceExtension": {"replicas": 1}},
    "grafana-dashboard": {
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "kvsched"}}
    },
    # The policy's kvEvents.blockSize must be what kvsched's index runs with.
    "scheduling-policy": {
        "schedulingPolicy": {"create": True, "spec": POLICY_SPEC},
        "config": {"scheduler": {"index": {"block_size": 32}}},
    },
    "legacy-port": {
        "inferencePool": {"targetPortNumber": 8200, "modelServers": {"matchLabels": {"app": "old"}}}
    },
    "existing-pool": {
        "inferencePool": {
            "create": False,
            "name": "shared-pool",
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "modelServers": {"matchLabels": {"app": "x"}},
        },
        "config": {
            "scrape_timeout_s": 0.04,
            "discovery": {"kubernetes": {"pools": ["shared-pool", "second"]}},
        },
    },
}

Manifest = dict[str, Any]


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


@cache
def _render_cached(values_json: str, release: str) -> tuple[tuple[str, str], ...]:
    rendered = _chart().render(json.loads(values_json), name=release, namespace=NAMESPACE)
    return tuple(sorted(rendered.items()))


def render(values: dict[str, Any], release: str = RELEASE) -> list[Manifest]:
    """Every object the chart renders for these values (fresh copies, safe to modify)."""
    docs = []
    for name, text in _render_cached(json.dumps(values, sort_keys=True), release):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(values: dict[str, Any]) -> str:
    rendered = dict(_render_cached(json.dumps(values, sort_keys=True), RELEASE))
    return next(text for name, text in rendered.items() if name.endswith("NOTES.txt"))


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[Manifest]) -> Manifest:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


def config_of(docs: list[Manifest]) -> dict[str, Any]:
    (configmap,) = [doc for doc in by_kind(docs, "ConfigMap") if "config.yaml" in doc.get("data", {})]
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return config


# --- custom resources: schemas for the fields the chart writes ------------------------------

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

# InferencePool inference.networking.k8s.io/v1 (Gateway API Inference Extension api/v1): selector
# of 1-64 labels, 1-8 target ports, appProtocol http | kubernetes.io/h2c, endpointPickerRef to a
# Service port with failureMode FailOpen | FailClose.
INFERENCE_POOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": 64,
                            "additionalProperties": {"type": "string", "maxLength": 63},
                        }
                    },
                },
                "targetPorts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 8,
                    "uniqueItems": True,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["number"],
                        "properties": {"number": _PORT},
                    },
                },
                "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
                "endpointPickerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "port"],
                    "properties": {
                        "group": {"type": "string", "maxLength": 253},
                        "kind": {"const": "Service"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "port": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["number"],
                            "properties": {"number": _PORT},
                        },
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}

# ServiceMonitor monitoring.coreos.com/v1 (Prometheus Operator API), the fields used here.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["name", "key"],
                                        "properties": {
                                            "name": {"type": "string", "minLength": 1},
                                            "key": {"type": "string", "minLength": 1},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate_custom_resource(doc: Manifest) -> None:
    kind = doc["kind"]
    if kind == "SchedulingPolicy":
        defaulted = apply_defaults(openapi_schema(), copy.deepcopy(doc))
        errors = [e.message for e in policy_validator().iter_errors(defaulted)]
    elif kind == "InferencePool":
        errors = [e.message for e in jsonschema.Draft202012Validator(INFERENCE_POOL_SCHEMA).iter_errors(doc)]
    elif kind == "ServiceMonitor":
        errors = [e.message for e in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc)]
    else:
        raise AssertionError(f"no schema for {doc['apiVersion']} {kind}")
    assert errors == [], f"{kind}: {errors}"


CUSTOM_GROUPS = {"kvsched.io", "inference.networking.k8s.io", "monitoring.coreos.com"}
BUILT_IN_KINDS = {
    "ConfigMap",
    "Deployment",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
}


# --- rendering, linting, validation ---------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; info (the missing icon) is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_are_valid(name: str, kube_version: str) -> None:
    docs = render(VALUE_SETS[name])
    built_in = []
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, kube_version, strict=True)
            validate_custom_resource(doc)
        else:
            assert kubernetes_validate.validate(doc, kube_version, strict=True)
            built_in.append(doc["kind"])
    expected = sorted(BUILT_IN_KINDS)
    if VALUE_SETS[name].get("inferenceExtension", {}).get("replicas") == 1:
        expected.remove("PodDisruptionBudget")
    if VALUE_SETS[name].get("grafanaDashboard", {}).get("enabled"):
        expected.append("ConfigMap")  # the dashboard's, beside the configuration's
    assert sorted(built_in) == sorted(expected)


def test_strict_validation_catches_an_unknown_field() -> None:
    deployment = one(render({}), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 9003}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_custom_resource_checks_catch_mistakes() -> None:
    pool = one(render(GIE_VALUES), "InferencePool")
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    with pytest.raises(AssertionError, match="FailSometimes"):
        validate_custom_resource(pool)
    policy = one(render(VALUE_SETS["scheduling-policy"]), "SchedulingPolicy")
    policy["spec"]["picker"]["temperature"] = 0
    with pytest.raises(AssertionError, match="SchedulingPolicy"):
        validate_custom_resource(policy)


def test_chart_metadata_and_crds() -> None:
    chart = _chart()
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["name"] == "kvsched"
    assert chart.metadata["appVersion"]
    # Helm installs crds/ before the templates, so a SchedulingPolicy template can be applied.
    (crd,) = chart.crds
    assert crd["name"] == "crds/schedulingpolicies.kvsched.io.yaml"
    assert yaml.safe_load(crd["data"])["metadata"]["name"] == "schedulingpolicies.kvsched.io"
    assert chart.schema is not None and chart.schema["additionalProperties"] is False


# --- what the default values make -----------------------------------------------------------


def test_default_objects_and_names() -> None:
    docs = render({})
    assert sorted(doc["kind"] for doc in docs) == sorted(BUILT_IN_KINDS)
    for doc in docs:
        assert doc["metadata"]["name"] == FULLNAME
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kvsched"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == _chart().metadata["appVersion"]


def test_release_named_after_the_chart_is_not_repeated() -> None:
    docs = render({}, release="kvsched")
    assert {doc["metadata"]["name"] for doc in docs} == {"kvsched"}
    docs = render({"fullnameOverride": "picker"})
    assert {doc["metadata"]["name"] for doc in docs} == {"picker"}


def test_deployment_is_active_active_and_rolls_without_losing_capacity() -> None:
    deployment = one(render({}), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert "leader" not in json.dumps(deployment).lower()


def test_container_command_image_and_ports() -> None:
    docs = render({})
    c = container(docs)
    assert c["image"] == f"ghcr.io/kvsched/kvsched:{_chart().metadata['appVersion']}"
    assert "command" not in c  # the image's entrypoint is kvsched
    assert c["args"] == ["--log-level", "INFO", "serve", "--config", CONFIG_PATH]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
        ("grpc", 9002),
        ("grpc-health", 9003),
        ("metrics", 9090),
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_probes_use_grpc_health_services() -> None:
    c = container(render({}))
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert c["startupProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    # A slow start (index catch-up) must not be killed by the liveness probe.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_security_context_is_locked_down() -> None:
    docs = render({})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc and "hostNetwork" not in pod


def test_writable_tmp_and_config_from_configmap() -> None:
    docs = render({})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/etc/kvsched"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    config_volume = volumes[mounts["/etc/kvsched"]["name"]]
    assert config_volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    # A whole-directory mount (no subPath) is what lets the kubelet update the file for hot reload.
    assert "subPath" not in mounts["/etc/kvsched"]
    assert mounts["/etc/kvsched"]["readOnly"] is True
    assert "config.yaml" in one(docs, "ConfigMap")["data"]


def test_config_file_from_values() -> None:
    config = config_of(render({}))
    assert config == {
        "grpc_port": 9002,
        "health_port": 9003,
        "metrics_port": 9090,
        "tls": {"mode": "self_signed"},
        # The image is built with the native transport; the chart asks for it by name.
        "extproc": {"transport": "native"},
        "pool": {
            "name": RELEASE,
            "namespace": NAMESPACE,
            "group": "inference.networking.k8s.io",
            "model_server_type": "vllm",
        },
        "discovery": {"type": "kubernetes"},
    }


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_config_file_is_a_valid_serve_config(name: str) -> None:
    from scheduler.server.config import ServeConfig

    config = ServeConfig.model_validate(config_of(render(VALUE_SETS[name])))
    assert config.discovery.type == "kubernetes"
    assert config.kubernetes_pools()[0] == config.pool.name
    assert config.kubernetes_namespace({}) == NAMESPACE
    group = config.pool.group
    assert config.pool_api_version().startswith(f"{group}/")


def test_pdb_keeps_one_replica() -> None:
    pdb = one(render({}), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == one(render({}), "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert by_kind(render(VALUE_SETS["single-replica"]), "PodDisruptionBudget") == []
    assert one(render(VALUE_SETS["single-replica"]), "Deployment")["spec"]["replicas"] == 1


def test_replicas_three() -> None:
    docs = render(VALUE_SETS["replicas-3"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_service_ports_and_selector() -> None:
    docs = render({})
    service = one(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert list(ports) == ["grpc", "grpc-health", "metrics"]
    assert (ports["grpc"]["port"], ports["grpc"]["appProtocol"]) == (9002, "http2")
    assert ports["grpc-health"]["port"] == 9003
    assert ports["metrics"]["port"] == 9090
    container_ports = {p["name"] for p in container(docs)["ports"]}
    assert all(p["targetPort"] in container_ports for p in ports.values())
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["type"] == "ClusterIP"


EXPECTED_RBAC = {
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "events", "create"),
    ("", "events", "patch"),
    *(
        (group, "inferencepools", verb)
        for group in ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
        for verb in ("get", "list", "watch")
    ),
    *(
        (group, "inferenceobjectives", verb)
        for group in ("llm-d.ai", "inference.networking.x-k8s.io")
        for verb in ("get", "list", "watch")
    ),
    ("kvsched.io", "schedulingpolicies", "get"),
    ("kvsched.io", "schedulingpolicies", "list"),
    ("kvsched.io", "schedulingpolicies", "watch"),
    ("kvsched.io", "schedulingpolicies/status", "update"),
    ("kvsched.io", "schedulingpolicies/status", "patch"),
}


def test_rbac_is_exactly_least_privilege() -> None:
    docs = render({})
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    role = one(docs, "Role")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames tricks, no wildcards
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    assert granted == EXPECTED_RBAC
    assert not any("*" in part for triple in granted for part in triple)
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_rbac_and_service_account_can_be_left_out() -> None:
    docs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "epp"}})
    assert by_kind(docs, "Role") == [] and by_kind(docs, "ServiceAccount") == []
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "epp"


# --- non-default value sets -----------------------------------------------------------------


def test_tls_from_a_secret() -> None:
    docs = render(VALUE_SETS["tls-secret"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (tls_volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert tls_volume["secret"]["secretName"] == "kvsched-tls"
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == tls_volume["name"]]
    assert mount["readOnly"] is True
    # Not inside the read-only ConfigMap mount, where no mount point can be created.
    assert not mount["mountPath"].startswith("/etc/kvsched")
    tls = config_of(docs)["tls"]
    assert tls == {
        "mode": "files",
        "cert_file": f"{mount['mountPath']}/tls.crt",
        "key_file": f"{mount['mountPath']}/tls.key",
    }


def test_plaintext_mode() -> None:
    docs = render(VALUE_SETS["plaintext"])
    assert config_of(docs)["tls"] == {"mode": "plaintext"}
    assert not any("secret" in v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"])


def test_gie_values_are_honoured() -> None:
    docs = render(GIE_VALUES)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    c = container(docs)
    assert c["image"] == "registry.example/ml/kvsched:v9.9.9"
    assert c["imagePullPolicy"] == "Always"
    # GIE's verbosity v=4 is debug; other flags pass through to `kvsched serve`.
    assert c["args"] == [
        "--log-level",
        "DEBUG",
        "serve",
        "--config",
        CONFIG_PATH,
        "--kv-events-timeout=5s",
    ]
    assert {"name": "EXTRA_SETTING", "value": "on"} in c["env"]
    assert ("debug", 6060) in [(p["name"], p["containerPort"]) for p in c["ports"]]
    assert "debug" in [p["name"] for p in one(docs, "Service")["spec"]["ports"]]
    assert deployment["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"

    pool = one(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == RELEASE  # the GIE chart names the pool after the release
    assert pool["spec"]["selector"]["matchLabels"] == {
        "app": "vllm-llama3-8b",
        "llm-d.ai/inference-serving": "true",
    }
    assert pool["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]
    assert pool["spec"]["appProtocol"] == "http"
    service = one(docs, "Service")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert pool["spec"]["endpointPickerRef"] == {
        "group": "",
        "kind": "Service",
        "name": service["metadata"]["name"],
        "port": {"number": grpc_port},
        "failureMode": "FailOpen",
    }
    assert config_of(docs)["pool"]["name"] == pool["metadata"]["name"]

    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["interval"] == "15s"
    assert endpoint["authorization"]["credentials"] == {"name": "metrics-reader-token", "key": "token"}


def test_pool_is_created_only_when_asked_or_given_pods() -> None:
    assert by_kind(render({}), "InferencePool") == []
    assert by_kind(render(VALUE_SETS["existing-pool"]), "InferencePool") == []
    legacy = one(render(VALUE_SETS["legacy-port"]), "InferencePool")
    assert legacy["spec"]["targetPorts"] == [{"number": 8200}]
    assert legacy["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    grpc = render(
        {
            "inferencePool": {
                "create": True,
                "modelServerProtocol": "grpc",
                "modelServers": {"matchLabels": {"a": "b"}},
            }
        }
    )
    assert one(grpc, "InferencePool")["spec"]["appProtocol"] == "kubernetes.io/h2c"


def test_existing_pool_and_extra_config() -> None:
    docs = render(VALUE_SETS["existing-pool"])
    config = config_of(docs)
    assert config["pool"]["name"] == "shared-pool"
    assert config["pool"]["group"] == "inference.networking.x-k8s.io"
    assert config["scrape_timeout_s"] == 0.04
    # The chart's own discovery settings merge with the user's.
    assert config["discovery"] == {"type": "kubernetes", "kubernetes": {"pools": ["shared-pool", "second"]}}
    assert config["grpc_port"] == 9002
    assert "shared-pool" in notes(VALUE_SETS["existing-pool"])


def test_service_monitor_scrapes_the_metrics_port() -> None:
    docs = render(VALUE_SETS["servicemonitor"])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert "authorization" not in endpoint
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_scheduling_policy_from_values() -> None:
    docs = render(VALUE_SETS["scheduling-policy"])
    policy = one(docs, "SchedulingPolicy")
    assert policy["apiVersion"] == "kvsched.io/v1alpha1"
    assert policy["metadata"]["name"] == RELEASE
    assert policy["spec"]["poolRef"] == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": config_of(docs)["pool"]["name"],
    }
    assert {k: v for k, v in policy["spec"].items() if k != "poolRef"} == POLICY_SPEC


def test_policy_from_values_is_accepted_by_kvsched() -> None:
    from scheduler.adapters.kubernetes.policy import PolicyError, PolicySettings
    from scheduler.server.config import ServeConfig

    docs = render(VALUE_SETS["scheduling-policy"])
    config = ServeConfig.model_validate(config_of(docs))
    # As stored after the API server's defaulting.
    policy = apply_defaults(openapi_schema(), one(docs, "SchedulingPolicy"))
    settings = PolicySettings.from_spec(policy["spec"])
    effective = settings.scheduler_config(config.scheduler)
    assert effective.scoring.mode == "softmax" and effective.scoring.temperature == 0.5
    assert effective.scoring.weights["prefix_overlap"] == 4
    assert effective.index.block_size == 32
    # Without the matching index setting kvsched would refuse it, naming the field.
    with pytest.raises(PolicyError, match=r"spec\.kvEvents\.blockSize"):
        settings.scheduler_config(ServeConfig.model_validate(config_of(render({}))).scheduler)


def test_notes_explain_active_active() -> None:
    text = notes({})
    assert "active-active" in text
    assert "9002" in text and "9003" in text and "9090" in text


# --- values the schema (or a template) rejects ----------------------------------------------

BAD_VALUES = {
    "zero-replicas": ({"inferenceExtension": {"replicas": 0}}, "replicas"),
    "unknown-top-level-key": ({"replicaCount": 2}, "replicaCount"),
    "gie-plugins-config": ({"inferenceExtension": {"pluginsConfigFile": "x.yaml"}}, "pluginsConfigFile"),
    "gie-provider-gke": ({"provider": {"name": "gke"}}, "provider"),
    "tls-secret-without-name": ({"inferenceExtension": {"tls": {"mode": "secret"}}}, "secretName"),
    "tls-unknown-mode": ({"inferenceExtension": {"tls": {"mode": "mtls"}}}, "mode"),
    "failure-mode": ({"inferenceExtension": {"failureMode": "FailSometimes"}}, "failureMode"),
    "port-out-of-range": ({"inferenceExtension": {"extProcPort": 70000}}, "extProcPort"),
    "pool-without-pods": ({"inferencePool": {"create": True}}, "matchLabels"),
    "pool-nine-ports": (
        {"inferencePool": {"targetPorts": [{"number": 8000 + i} for i in range(9)]}},
        "targetPorts",
    ),
    "pool-old-api-created": (
        {
            "inferencePool": {
                "create": True,
                "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
                "modelServers": {"matchLabels": {"a": "b"}},
            }
        },
        "apiVersion",
    ),
    "model-server-type": ({"inferencePool": {"modelServerType": "triton-tensorrt-llm"}}, "modelServerType"),
    "config-owned-key": ({"config": {"grpc_port": 1}}, "grpc_port"),
    "policy-pool-ref": ({"schedulingPolicy": {"spec": {"poolRef": {"name": "other"}}}}, "poolRef"),
    "flag-overrides-config": ({"inferenceExtension": {"flags": {"config": "/x"}}}, "flags"),
    "image-digest": ({"inferenceExtension": {"image": {"digest": "latest"}}}, "digest"),
    "metrics-auth-without-secret": (
        {"inferenceExtension": {"monitoring": {"prometheus": {"auth": {"enabled": True}}}}},
        "secretName",
    ),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_values_are_rejected(name: str) -> None:
    values, mentioned = BAD_VALUES[name]
    with pytest.raises(helm.HelmValuesError) as caught:
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert mentioned in str(caught.value)


# --- the image recipe, checked against the chart --------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    lines: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    instructions = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_dockerfile_matches_the_chart() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage build expected"
    build, final = stages[0], stages[-1]
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "gcc" in build_runs and "pip install ." in build_runs
    # The native ext_proc transport is built, and the build fails rather than leave it out.
    assert "libgrpc++-dev" in build_runs and "import scheduler.cli, scheduler._native.extproc" in build_runs
    assert "KVSCHED_NATIVE_EXTPROC=1" in shlex.split(" ".join(rest for k, rest in build if k == "ENV"))
    # The final image copies the built environment and installs no compiler or headers, only
    # the shared libraries the native transport links; the module must import there.
    assert any(k == "COPY" and rest.startswith("--from=") for k, rest in final)
    final_runs = " ".join(rest for k, rest in final if k == "RUN")
    assert not any(word in final_runs for word in ("gcc", "g++", "-dev"))
    assert "libgrpc++1.51" in final_runs and "import scheduler._native.extproc" in final_runs
    assert all("3.11" in rest or "PYTHON_IMAGE" in rest for k, rest in (build[0], final[0]))

    docs = render({})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    user = next(rest for k, rest in final if k == "USER")
    uid, _, gid = user.partition(":")
    assert int(uid) == pod["securityContext"]["runAsUser"] != 0
    assert int(gid) == pod["securityContext"]["runAsGroup"]

    exposed = {int(p) for k, rest in final if k == "EXPOSE" for p in rest.split()}
    assert exposed == {p["containerPort"] for p in container(docs)["ports"]} == {9002, 9003, 9090}
    entrypoint = json.loads(next(rest for k, rest in final if k == "ENTRYPOINT"))
    cmd = json.loads(next(rest for k, rest in final if k == "CMD"))
    assert entrypoint == ["kvsched"]
    assert cmd == ["serve", "--config", CONFIG_PATH]
    assert container(docs)["args"][-3:] == cmd
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in shlex.split(env)


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # everything else stays out of the build context
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src
        for k, rest in _dockerfile_instructions()
        if k == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    }
    assert copied <= kept
    assert {"kernels", "scheduler", "proto", "pyproject.toml", "setup.py"} <= kept
