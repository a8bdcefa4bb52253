"""``kvsched sim``: run simulated vLLM workers on this machine until interrupted."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scheduler.core.blockhash_ref import VLLM_DEFAULT_SEED, VLLM_HASH_ALGOS
from scheduler.sim.engine import DEFAULT_CAPACITY_BLOCKS, EngineConfig
from scheduler.sim.latency import LatencyModel
from scheduler.sim.pool import PoolConfig, run_pool
from scheduler.sim.worker import DEFAULT_MODEL, LLMD_TOPIC, WorkerDescriptor, check_topic


def _print_table(descriptors: list[WorkerDescriptor]) -> None:
    rows = [("worker", "http", "kv events", "replay", "topic")]
    rows += [
        (d.name, d.http_url, d.kv_endpoint, d.replay_endpoint or "-", repr(d.topic)) for d in descriptors
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _run(args: argparse.Namespace) -> int:
    engine = EngineConfig(
        block_size=args.block_size,
        capacity_blocks=args.capacity_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        hash_seed=args.hash_seed,
        hash_algo=args.hash_algo,
        latency=LatencyModel(token_scale=args.token_scale),
    )
    config = PoolConfig(
        model=args.model,
        host=args.host,
        base_port=args.base_port,
        speed=args.speed,
        legacy_events=args.legacy_events,
        replay=not args.no_replay,
        events_with_token_ids=not args.no_event_token_ids,
        omit_metrics=tuple(args.omit_metric or ()),
        topic=LLMD_TOPIC if args.kv_topic == "llm-d" else args.kv_topic,
        tokenizer_dir=args.tokenizer_dir,
        engine=engine,
    )

    def ready(descriptors: list[WorkerDescriptor]) -> None:
        tokenizer_dir = descriptors[0].tokenizer_dir if descriptors else ""
        if args.json:
            print(json.dumps({"workers": [d.as_dict() for d in descriptors], "tokenizer_dir": tokenizer_dir}))
        else:
            _print_table(descriptors)
            print(f"{len(descriptors)} simulated workers at speed x{args.speed:g}; Ctrl-C stops them")
            # What kvsched serve (tokenizer_dir) and benchmark clients load to count the same tokens.
            print(f"tokenizer: {tokenizer_dir}")
        sys.stdout.flush()

    run_pool(args.workers, config, on_ready=ready)
    return 0


def _topic(text: str) -> str:
    if text == "llm-d":
        return text
    try:
        return check_topic(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="simulated vLLM workers (HTTP API, /metrics, ZMQ KV events) on this machine",
        description="Start simulated vLLM workers (Llama-3-8B on one H100 each) and serve until interrupted.",
    )
    sim.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    sim.add_argument(
        "--capacity-blocks",
        type=int,
        default=DEFAULT_CAPACITY_BLOCKS,
        help=f"KV blocks per worker (default {DEFAULT_CAPACITY_BLOCKS}, an 80 GB H100)",
    )
    sim.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    sim.add_argument("--speed", type=_positive_float, default=1.0, help="simulated seconds per real second")
    sim.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sim.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="worker i listens on HTTP P+3i, KV events P+3i+1, replay P+3i+2 (default: ephemeral ports)",
    )
    sim.add_argument(
        "--legacy-events", action="store_true", help="positional event arrays and replay frames without topic"
    )
    sim.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    sim.add_argument(
        "--kv-topic",
        type=_topic,
        default="",
        help="KV-event ZMQ topic (default '', vLLM's default); 'llm-d' = llm-d's kv@{address}@{model}; "
        "may name {host}, {port}, {address}, {model}",
    )
    sim.add_argument(
        "--tokenizer-dir",
        help="Hugging Face tokenizer directory (default: the simulated model's own, printed at start)",
    )
    sim.add_argument(
        "--hash-algo",
        choices=VLLM_HASH_ALGOS,
        default="sha256_cbor",
        help="vLLM's --prefix-caching-hash-algo for the published block hashes (default sha256_cbor)",
    )
    sim.add_argument(
        "--hash-seed",
        default=VLLM_DEFAULT_SEED,
        help="the pods' PYTHONHASHSEED, the root of vLLM's block hashes "
        f"(default {VLLM_DEFAULT_SEED!r}: unset)",
    )
    sim.add_argument("--no-replay", action="store_true", help="no KV-event replay socket (vLLM's default)")
    sim.add_argument(
        "--no-event-token-ids", action="store_true", help="BlockStored without token ids (older vLLM)"
    )
    sim.add_argument(
        "--omit-metric",
        action="append",
        metavar="NAME",
        help="leave this metric family off /metrics, e.g. vllm:kv_cache_usage_perc (repeatable)",
    )
    sim.add_argument("--max-num-seqs", type=int, default=256)
    sim.add_argument("--max-num-batched-tokens", type=int, default=8192)
    sim.add_argument("--max-model-len", type=int, default=8192)
    sim.add_argument(
        "--token-scale",
        type=_positive_float,
        default=1.0,
        help="real tokens per simulated token in the latency model (traces with scaled-down blocks)",
    )
    sim.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    sim.set_defaults(func=_run)
