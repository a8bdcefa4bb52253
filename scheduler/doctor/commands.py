"""``kvsched doctor``: check a live pool against kvsched's configuration, in plain words.

kvsched doctor [--config FILE] [--endpoint ADDR ...] [--set KEY=VALUE ...] [--json]
               [--wait SECONDS] [--attempts N] [--strict]

Takes the same configuration as ``kvsched serve`` (a file, ``--endpoint`` flags, or
``discovery.type: kubernetes`` for an InferencePool's pods). Exit status: 0 when precise
cache-aware routing can work (warnings allowed unless ``--strict``), 1 when something must be
fixed, 2 when the configuration itself is unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from scheduler.server.commands import add_config_arguments

EXIT_PROBLEMS = 1
EXIT_BAD_CONFIG = 2


def _run(args: argparse.Namespace) -> int:
    from scheduler.doctor.run import diagnose
    from scheduler.server.commands import load_from_args
    from scheduler.server.config import ConfigError

    # The report says what the start-up tokenizer probe found; its own log lines would repeat it.
    probe_log = logging.getLogger("scheduler.adapters.tokenizer_probe")
    level = probe_log.level
    if not probe_log.isEnabledFor(logging.DEBUG):
        probe_log.setLevel(logging.ERROR)
    try:
        config = load_from_args(args)
        report = asyncio.run(diagnose(config, wait_s=args.wait, attempts=args.attempts))
    except ConfigError as exc:
        print(f"kvsched doctor: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    finally:
        probe_log.setLevel(level)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print(report.render())
    return 0 if report.ok(strict=args.strict) else EXIT_PROBLEMS


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def register(subparsers: Any) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check that precise cache-aware routing can work against a live pool, and say what to fix",
        description="Check each endpoint kvsched serve would use: reachable, its metrics page, KV events "
        "end to end (a probe request, the events it causes, fed into kvsched's own index: topic, block "
        "size, hash algorithm and seed), sequence numbers, clocks, the replay socket, and the tokenizer. "
        "Exit 1 when something must be fixed.",
    )
    add_config_arguments(doctor)
    doctor.add_argument("--json", action="store_true", help="the report as JSON")
    doctor.add_argument(
        "--wait",
        type=_positive,
        default=3.0,
        metavar="SECONDS",
        help="per step that waits on a pod (default 3)",
    )
    doctor.add_argument(
        "--attempts", type=int, default=3, help="probe requests before concluding no events come (default 3)"
    )
    doctor.add_argument("--strict", action="store_true", help="warnings fail too")
    doctor.set_defaults(func=_run)
