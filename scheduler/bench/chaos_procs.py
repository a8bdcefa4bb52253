"""The processes of ``kvsched bench chaos``: one simulated vLLM worker, or one kvsched.

Each runs in a process of its own (``child_command``), so a fault can kill exactly one of
them with SIGKILL and start it again on the same ports. Both print one JSON line when they
serve (their addresses) and then answer one JSON command per stdin line with one JSON line:

* a worker: ``cache`` (its real prefix cache: distinct blocks held, and per prompt the leading
  blocks held), ``drop`` (the next N KV-event batches are lost on the wire but stay
  replayable), ``restart_engine`` (empty cache, publisher from seq 0), ``publish`` (bytes as
  the next batch: malformed, enormous, flooding) and ``frames`` (a message that is no vLLM frame
  set);
* kvsched: ``kvsched serve``'s own code path (``serve_until_signalled`` with the configuration
  file, reloaded when it changes; SIGTERM stops it) with one debug hook, ``index``: what its
  prefix index holds for a worker (the same two figures as a worker's ``cache``) and how far
  its KV-event ingest got, so the bench can check the index against the real cache.

A child ends when its stdin closes (the bench ended) or when it is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _announce(message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _answer_commands(handlers: dict[str, Handler]) -> None:
    """Until stdin closes: one JSON command a line (``{"op": ..., ...}``), one JSON answer each."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        handler = handlers.get(command.get("op", ""))
        if handler is None:
            _announce({"error": f"unknown op {command.get('op')!r}"})
            continue
        try:
            _announce(await handler(command))
        except Exception as exc:  # the bench reads the error; the process goes on
            logging.getLogger(__name__).exception("command %s failed", command.get("op"))
            _announce({"error": f"{type(exc).__name__}: {exc}"})


# --- a simulated worker --------------------------------------------------------------------


async def _serve_worker(options: dict[str, Any]) -> None:
    from scheduler.sim.engine import EngineConfig
    from scheduler.sim.worker import SimWorker, WorkerConfig

    engine = EngineConfig(
        max_model_len=options["max_model_len"],
        capacity_blocks=options["capacity_blocks"],
        max_num_seqs=options["max_num_seqs"],
    )
    config = WorkerConfig(
        name=options["name"],
        host="127.0.0.1",
        http_port=options["http_port"],
        kv_port=options["kv_port"],
        replay_port=options["replay_port"],
        speed=options["speed"],
        buffer_steps=options["buffer_steps"],
        engine=engine,
    )
    async with SimWorker(config) as worker:
        publisher = worker.publisher
        assert publisher is not None

        async def cache(command: dict[str, Any]) -> dict[str, Any]:
            return {
                "blocks": len(worker.engine.cached_wire_hashes()),
                "prefix_blocks": [worker.engine.cached_prefix_blocks(p) for p in command["prompts"]],
                "next_seq": publisher.next_seq,
                "busy": worker.engine.has_work,
                "running": worker.engine.num_running,
            }

        async def drop(command: dict[str, Any]) -> dict[str, Any]:
            first = publisher.next_seq
            for seq in range(first, first + int(command["batches"])):
                publisher.drop_seq(seq)
            return {"first": first, "batches": command["batches"]}

        async def restart_engine(command: dict[str, Any]) -> dict[str, Any]:
            await worker.restart_engine()
            return {"next_seq": publisher.next_seq}

        async def bad_kv(command: dict[str, Any]) -> dict[str, Any]:
            kind, count = command["kind"], int(command.get("count", 1))
            if kind == "frames":
                for _ in range(count):
                    await publisher.send_frames([b"kv", b"\x00\x01"])
                return {"sent": count, "bytes": 4}
            payloads = bad_kv_payloads(kind, count, worker.config.engine.block_size)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for payload in payloads:
                await publisher.publish_payload(payload)
            return {
                "sent": len(payloads),
                "bytes": sum(len(p) for p in payloads),
                "seconds": loop.time() - started,
            }

        _announce(worker.descriptor.as_dict())
        await _answer_commands(
            {
                "cache": cache,
                "drop": drop,
                "restart_engine": restart_engine,
                "bad_kv": bad_kv,
            }
        )


def bad_kv_payloads(kind: str, count: int, block_size: int) -> list[bytes]:
    """Batches a broken or hostile publisher sends, each kind as the wire carries it."""
    import msgpack

    from scheduler.codec.kvevents import encode_batch
    from scheduler.core.events import BlockRemoved, BlockStored, EventBatch, KVEvent

    rng = random.Random(count)
    ts = time.time()

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 32_000) for _ in range(n)]

    if kind == "malformed_msgpack":  # 0xc1 is never used in msgpack
        return [b"\xc1\x93\x00" for _ in range(count)]
    if kind == "wrong_types":  # a batch whose events are a string, and a BlockStored of strings
        return [
            msgpack.packb([ts, "events", 0])
            if i % 2 == 0
            else msgpack.packb(
                [
                    ts,
                    [{"type": "BlockStored", "block_hashes": "x", "parent_block_hash": "y", "token_ids": 3}],
                    0,
                ]
            )
            for i in range(count)
        ]
    if kind == "unknown_tag":
        return [
            msgpack.packb([ts, [{"type": "BlockFrobnicated", "block_hashes": [1]}], 0]) for _ in range(count)
        ]
    if kind == "other_rank":  # a batch claiming a data-parallel rank this endpoint does not have
        events: list[KVEvent] = [BlockStored([rng.getrandbits(63)], None, tokens(block_size), block_size)]
        return [encode_batch(EventBatch(ts, events, 7)) for _ in range(count)]
    if kind == "huge":  # one BlockStored chain of `count` blocks, token ids and all
        hashes = [rng.getrandbits(63) for _ in range(count)]
        return [
            encode_batch(
                EventBatch(ts, [BlockStored(hashes, None, tokens(count * block_size), block_size)], 0)
            )
        ]
    if kind == "flood":  # valid churn: each batch stores 32 blocks and removes them again
        distinct = []
        for _ in range(64):
            hashes = [rng.getrandbits(63) for _ in range(32)]
            stored = BlockStored(hashes, None, tokens(32 * block_size), block_size)
            distinct.append(encode_batch(EventBatch(ts, [stored, BlockRemoved(hashes)], 0)))
        return [distinct[i % len(distinct)] for i in range(count)]
    raise ValueError(f"unknown bad KV-event kind {kind!r}")


# --- kvsched ---------------------------------------------------------------------------------


def _index_hook(app: Any) -> Handler:
    """The bench's window on a running kvsched's prefix index (reads only)."""

    async def index(command: dict[str, Any]) -> dict[str, Any]:
        scheduler = app.scheduler
        name = command["worker"]
        prefix_blocks = []
        for prompt in command["prompts"]:
            match = scheduler.index.match(scheduler.index.request_keys(prompt))
            prefix_blocks.append(match[name].total_blocks if name in match else 0)
        ingest = None if app.ingest is None else app.ingest.subscribers.get(name)
        ranks = [] if ingest is None else ingest.snapshot()["ranks"]
        return {
            "blocks": scheduler.index.worker_blocks(name) if name in scheduler.index.workers else 0,
            "prefix_blocks": prefix_blocks,
            "next_seq": ranks[0]["next_seq"] if ranks else None,
            "replay_in_flight": ranks[0]["replay_in_flight"] if ranks else False,
            "view_complete": ranks[0]["view_complete"] if ranks else False,
        }

    return index


def _state_hook(app: Any) -> Handler:
    """What a leak or a refused reload would show: asyncio tasks, the settings in force."""

    async def state(command: dict[str, Any]) -> dict[str, Any]:
        return {
            "tasks": len(asyncio.all_tasks()),
            "scheduler": app.scheduler.config.model_dump(mode="json", exclude={"predictor"}),
            "status": app.status(),
        }

    return state


async def _serve_kvsched(options: dict[str, Any]) -> None:
    from scheduler.server.app import ServeApp, serve_until_signalled
    from scheduler.server.config import load_config

    path = options["config"]

    def loader() -> Any:
        return load_config(path, {}, [])

    hooks: list[asyncio.Task[None]] = []

    async def answer_until_stdin_closes(app: ServeApp) -> None:
        await _answer_commands({"index": _index_hook(app), "state": _state_hook(app)})
        # The bench is gone: stop as SIGTERM would, draining what is in flight.
        os.kill(os.getpid(), signal.SIGTERM)

    def on_app(app: ServeApp) -> None:
        hooks.append(asyncio.create_task(answer_until_stdin_closes(app)))

    try:
        await serve_until_signalled(
            loader(), ready_file=options["ready_file"], config_loader=loader, watch_file=path, on_app=on_app
        )
    finally:
        for task in hooks:
            task.cancel()


_CHILDREN = {"worker": _serve_worker, "kvsched": _serve_kvsched}


def child_main(argv: list[str]) -> None:
    """``KIND OPTIONS_JSON``: one process of the chaos stack (started by ``child_command``)."""
    # kvsched logs as `kvsched serve` does (the bench scans it for tracebacks); workers quietly.
    kind, options = argv
    logging.basicConfig(
        level=logging.INFO if kind == "kvsched" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_CHILDREN[kind](json.loads(options)))
