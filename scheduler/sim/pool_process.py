"""A simulated pool in a process of its own, as a pool is deployed.

In one process with kvsched and the load generator, the simulated workers' clock runs on the
same event loop as the scheduler's decisions: every millisecond kvsched spends deciding is a
millisecond the workers' simulated GPU stands still, which lands on the TTFT of the policy
that decides with more work (kvsched), not on round-robin's. Its own process gives the pool
its own loop, as real GPUs are not slowed by the gateway's CPU.

The child imports the very ``scheduler`` this process runs (its package root first on
``sys.path``, ``-P`` keeping the working directory off it), announces its workers as one
JSON line, and stops when its stdin closes (the parent exited or is done with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.worker import WorkerDescriptor

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = (
    "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
    "importlib.import_module('scheduler.sim.pool_process').child_main(sys.argv[2:])"
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class PoolProcess:
    """``async with PoolProcess(8, speed=10.0) as pool: pool.descriptors``."""

    def __init__(self, workers: int, *, speed: float = 1.0) -> None:
        self.workers = workers
        self.speed = speed
        self.descriptors: list[WorkerDescriptor] = []
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def __aenter__(self) -> PoolProcess:
        options = json.dumps({"workers": self.workers, "speed": self.speed})
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-c",
            _BOOT,
            _PACKAGE_ROOT,
            options,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            await self._stop()
            raise RuntimeError(
                f"the simulated pool's process did not start (exit code {self._process.returncode})"
            )
        self.descriptors = [WorkerDescriptor(**fields) for fields in json.loads(line)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the simulated pool's process did not stop in %g s; killing it", STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _serve(options: dict[str, Any]) -> None:
    async with SimPool(options["workers"], PoolConfig(speed=options["speed"])) as pool:
        sys.stdout.write(json.dumps([dataclasses.asdict(d) for d in pool.descriptors]) + "\n")
        sys.stdout.flush()
        await until_stdin_closes()


async def until_stdin_closes() -> None:
    """Wait until the parent closes this child's stdin, or exits (a child process's end)."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    # stdin turns readable (at end of file) when the parent closes it or exits.
    loop.add_reader(sys.stdin.fileno(), closed.set)
    try:
        await closed.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())


def child_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    # Ctrl-C reaches the whole process group; the parent stops this process (closing stdin)
    # once it has stopped using the pool, not before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    (options,) = argv
    asyncio.run(_serve(json.loads(options)))
