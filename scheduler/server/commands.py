"""``kvsched serve``: the Endpoint Picker for an Envoy-based inference gateway.

Configuration: ``--config FILE`` (YAML or JSON, see ``ServeConfig``), then flags, then
``--set KEY.PATH=VALUE`` overrides. A configuration that does not validate exits with
status 2 and names every offending field.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

EXIT_BAD_CONFIG = 2


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The flags as configuration overrides; commands that share only ``add_config_arguments``
    (``kvsched doctor``) lack the serving flags, which then override nothing."""
    from scheduler.adapters.discovery import parse_endpoint_flag
    from scheduler.server.config import ConfigError, parse_set_flag

    def flag(name: str) -> Any:
        return getattr(args, name, None)

    overrides: dict[str, Any] = {
        "host": flag("host"),
        "grpc_port": flag("grpc_port"),
        "health_port": flag("health_port"),
        "metrics_port": flag("metrics_port"),
        "scrape_interval_s": flag("scrape_interval"),
        "scrape_timeout_s": flag("scrape_timeout"),
        "scrape_engine": args.engine,
        "tokenizer_dir": args.tokenizer_dir,
        "tokenizer_json": args.tokenizer_json,
        "tokenizer_config": args.tokenizer_config,
        "tokenizer_mode": args.tokenizer_mode,
        "audit_log": flag("audit_log"),
    }
    sets: list[tuple[str, Any]] = []
    if flag("plaintext"):
        overrides["tls"] = {"mode": "plaintext"}
    elif flag("tls_cert") or flag("tls_key"):
        overrides["tls"] = {"mode": "files", "cert_file": args.tls_cert, "key_file": args.tls_key}
    if args.endpoint:
        try:
            overrides["endpoints"] = [parse_endpoint_flag(text) for text in args.endpoint]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.no_kv_events:
        sets.append(("kv_events.enabled", False))
    if flag("on_internal_error"):
        sets.append(("extproc.on_internal_error", args.on_internal_error))
    sets.extend(parse_set_flag(text) for text in args.set or ())
    return overrides, sets


def load_from_args(args: argparse.Namespace) -> Any:
    """The ServeConfig of ``--config`` and the flags (ConfigError names what is wrong)."""
    from scheduler.server.config import load_config

    overrides, sets = _overrides(args)
    return load_config(args.config, overrides, sets)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what pool and settings kvsched works with (serve and doctor)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON ServeConfig file")
    parser.add_argument(
        "--endpoint",
        action="append",
        metavar="ADDR[,KEY=VALUE...]",
        help="model server host:port, repeatable; replaces the file's endpoints. Keys: name, metrics, "
        "kv (tcp://... | true | false), replay, topic, dp, class, label.NAME",
    )
    parser.add_argument("--engine", choices=("auto", "vllm", "sglang"), help="model-server metric names")
    parser.add_argument("--no-kv-events", action="store_true", help="approximate mode for every endpoint")
    parser.add_argument(
        "--tokenizer-dir",
        metavar="DIR",
        help="Hugging Face tokenizer directory (kvsched sim prints the simulated pool's)",
    )
    parser.add_argument(
        "--tokenizer-mode",
        choices=("auto", "local", "worker_render", "bytes"),
        help="how text and chat prompts become token ids (default auto)",
    )
    parser.add_argument("--tokenizer-json", metavar="FILE", help="model tokenizer.json")
    parser.add_argument("--tokenizer-config", metavar="FILE", help="tokenizer_config.json (chat template)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override any config field, e.g. scheduler.scoring.mode=softmax (VALUE read as YAML)",
    )


def _serve(args: argparse.Namespace) -> int:
    from scheduler.server.app import serve_until_signalled
    from scheduler.server.config import ConfigError, ServeConfig, load_config

    try:
        overrides, sets = _overrides(args)
        config = load_config(args.config, overrides, sets)
    except ConfigError as exc:
        print(f"kvsched serve: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if config.log_level is not None:
        logging.getLogger().setLevel(config.log_level)
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    loader = None
    if args.config is not None:

        def loader() -> ServeConfig:
            return load_config(args.config, overrides, sets)

    try:
        asyncio.run(
            serve_until_signalled(
                config, ready_file=args.ready_file, config_loader=loader, watch_file=args.config
            )
        )
    except ConfigError as exc:  # found only when starting, e.g. no Kubernetes credentials
        print(f"kvsched serve: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 0


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the Endpoint Picker (Envoy ext_proc gRPC, health, metrics)",
        description="Run the Endpoint Picker until SIGTERM/SIGINT. Flags override --config.",
    )
    add_config_arguments(serve)
    serve.add_argument("--host", help="bind address of every port (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="ext_proc gRPC port (default 9002; 0 = ephemeral)")
    serve.add_argument("--health-port", type=int, help="gRPC health port (default 9003)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 9090)")
    tls = serve.add_mutually_exclusive_group()
    tls.add_argument("--plaintext", action="store_true", help="ext_proc without TLS")
    tls.add_argument("--tls-cert", metavar="FILE", help="ext_proc certificate (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="ext_proc private key (with --tls-cert)")
    serve.add_argument("--scrape-interval", type=float, metavar="SECONDS", help="default 0.1")
    serve.add_argument("--scrape-timeout", type=float, metavar="SECONDS", help="default 1.0")
    serve.add_argument("--on-internal-error", choices=("fallback", "grpc_error"))
    serve.add_argument(
        "--audit-log", action=argparse.BooleanOptionalAction, default=None, help="one JSON line per decision"
    )
    serve.add_argument("--ready-file", metavar="FILE", help="write the bound ports as JSON once serving")
    serve.add_argument("--check", action="store_true", help="validate and print the configuration, then exit")
    serve.set_defaults(func=_serve)
