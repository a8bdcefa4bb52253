"""ServeConfig: defaults, file + flag + --set layering, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.cli import main
from scheduler.server.config import ConfigError, ServeConfig, load_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_gie_conventions() -> None:
    config = ServeConfig()
    assert (config.grpc_port, config.health_port, config.metrics_port) == (9002, 9003, 9090)
    assert config.tls.mode == "self_signed"
    assert (config.kv_events.port, config.kv_events.replay_port) == (5557, 5558)
    assert config.scrape_interval_s == 0.1
    assert config.extproc.on_internal_error == "fallback"
    assert config.endpoints == []


def test_yaml_file_flags_and_sets_layer_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "serve.yaml",
        """
grpc_port: 19002
endpoints:
  - address: 10.0.0.5:8000
    data_parallel_size: 2
kv_events:
  topic: "kv@{host}"
scheduler:
  index: {block_size: 32}
  scoring: {mode: softmax}
  health: {unhealthy_after_failures: 5}
""",
    )
    config = load_config(
        path,
        {"grpc_port": 29002, "metrics_port": None},
        [("scheduler.scoring.temperature", 0.5), ("extproc.on_internal_error", "grpc_error")],
    )
    assert config.grpc_port == 29002  # flag beats file
    assert config.metrics_port == 9090  # a None override means "not given"
    assert config.scheduler.index.block_size == 32
    assert config.scheduler.scoring.mode == "softmax"
    assert config.scheduler.scoring.temperature == 0.5
    assert config.scheduler.health.unhealthy_after_failures == 5
    assert config.extproc.on_internal_error == "grpc_error"
    (endpoint,) = config.static_endpoints()
    assert endpoint.kv_topic == "kv@10.0.0.5"
    assert endpoint.kv_events == "tcp://10.0.0.5:5557"
    assert endpoint.index_workers() == ["10.0.0.5:8000", "10.0.0.5:8000#dp1"]


def test_json_file(tmp_path: Path) -> None:
    path = write(tmp_path, "serve.json", json.dumps({"tls": {"mode": "plaintext"}, "health_port": None}))
    config = load_config(path)
    assert config.tls.mode == "plaintext"
    assert config.health_port is None


def test_kv_events_off_strips_every_endpoint() -> None:
    config = ServeConfig.model_validate(
        {"kv_events": {"enabled": False}, "endpoints": [{"address": "h:1", "kv_events": "tcp://h:5557"}]}
    )
    assert config.static_endpoints()[0].kv_events is None


def test_pool_model_server_type_selects_metric_names() -> None:
    assert ServeConfig().metrics_spec().engine == "auto"
    assert (
        ServeConfig.model_validate({"pool": {"model_server_type": "sglang"}}).metrics_spec().engine
        == "sglang"
    )
    explicit = ServeConfig.model_validate({"pool": {"model_server_type": "sglang"}, "scrape_engine": "vllm"})
    assert explicit.metrics_spec().engine == "vllm"


def test_custom_metric_names() -> None:
    config = ServeConfig.model_validate(
        {
            "scrape_metric_names": {
                "waiting": ["tgi_queue_size"],
                "running": ["tgi_batch_current_size"],
                "kv_usage": ["x"],
            }
        }
    )
    names = config.metrics_spec().names
    assert names is not None
    assert (names.waiting, names.running, names.kv_usage) == (
        ("tgi_queue_size",),
        ("tgi_batch_current_size",),
        ("x",),
    )


@pytest.mark.parametrize(
    ("data", "location"),
    [
        ({"grpc_port": 70000}, "grpc_port"),
        ({"grpc_prot": 9002}, "grpc_prot"),
        ({"scrape_interval_s": 0}, "scrape_interval_s"),
        ({"tls": {"mode": "files"}}, "tls"),
        ({"tls": {"mode": "plaintext", "cert_file": "c.pem"}}, "tls"),
        ({"tls": {"mode": "mtls"}}, "tls.mode"),
        ({"endpoints": [{"address": "10.0.0.5"}]}, "endpoints.0.address"),
        ({"endpoints": [{"address": "h:1"}, {"address": "h:1"}]}, "endpoints"),
        ({"kv_events": {"topic": "kv@{pod}"}}, "kv_events.topic"),
        ({"kv_events": {"ingest": {"replay_timeout_s": -1}}}, "kv_events.ingest.replay_timeout_s"),
        (
            {"scheduler": {"scoring": {"weights": {"prefix_overlap": -1}}}},
            "scheduler.scoring.weights.prefix_overlap",
        ),
        (
            {"scheduler": {"health": {"unhealthy_after_failures": 0}}},
            "scheduler.health.unhealthy_after_failures",
        ),
        ({"extproc": {"on_internal_error": "crash"}}, "extproc.on_internal_error"),
        ({"log_level": "LOUD"}, "log_level"),
        (
            {"scrape_metric_names": {"waiting": [], "running": ["r"], "kv_usage": ["k"]}},
            "scrape_metric_names.waiting",
        ),
        ({"pool": {"model_server_type": "tgi"}}, "pool.model_server_type"),
    ],
)
def test_errors_name_the_field(data: dict[str, object], location: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, data)
    message = str(caught.value)
    assert message.startswith("invalid configuration")
    assert f"\n  {location}: " in message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "grpc_port: [1,\n"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write(tmp_path, "bad.json", "{grpc_port: 1}"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path, "empty.yaml", "")) == ServeConfig()


def test_cli_check_prints_the_merged_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "serve.yaml", "grpc_port: 19002\nendpoints: [{address: 'h:1'}]\n")
    argv = [
        "serve",
        "--config",
        str(path),
        "--plaintext",
        "--endpoint",
        "10.0.0.5:8000,dp=2,kv=false",
        "--endpoint",
        "10.0.0.6:8000",
        "--metrics-port",
        "0",
        "--set",
        "scheduler.scoring.num_fallbacks=1",
        "--on-internal-error",
        "grpc_error",
        "--check",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["grpc_port"] == 19002
    assert printed["metrics_port"] == 0
    assert printed["tls"]["mode"] == "plaintext"
    assert [e["address"] for e in printed["endpoints"]] == ["10.0.0.5:8000", "10.0.0.6:8000"]
    assert printed["endpoints"][0]["kv_events"] is False
    assert printed["endpoints"][0]["data_parallel_size"] == 2
    assert printed["scheduler"]["scoring"]["num_fallbacks"] == 1
    assert printed["extproc"]["on_internal_error"] == "grpc_error"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--grpc-port", "70000"], "grpc_port: Input should be less than or equal to 65535"),
        (["--endpoint", "10.0.0.5"], "endpoints.0.address: '10.0.0.5' is not host:port"),
        (["--endpoint", "10.0.0.5:8000,weight=2"], "unknown key 'weight'"),
        (["--set", "scheduler.scoring.mode=greedy"], "scheduler.scoring.mode:"),
        (["--set", "nonsense"], "expected KEY.PATH=VALUE"),
        (["--tls-cert", "c.pem"], "tls: mode 'files' needs cert_file and key_file"),
    ],
)
def test_cli_bad_configuration_exits_2_naming_the_field(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv, "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in captured.err
    assert captured.err.startswith("kvsched serve: ")
