"""The ``kvsched`` command line: one subcommand per job, each defined beside its code.

Subcommand modules expose ``register(subparsers)``; they are imported here so that
``kvsched --help`` lists every job, and each sets ``func`` to run it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules that contribute subcommands, in the order --help shows them.
COMMAND_MODULES = (
    "scheduler.sim.commands",
    "scheduler.replay.commands",
    "scheduler.replay.sweep",
    "scheduler.server.commands",
    "scheduler.doctor.commands",
    "scheduler.demo.commands",
    "scheduler.bench.commands",
    "scheduler.tune.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsched", description="Cache-aware Endpoint Picker for vLLM fleets"
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
