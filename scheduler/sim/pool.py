"""Several simulated vLLM workers in one process and event loop.

``async with SimPool(4, PoolConfig(...)) as pool: pool.descriptors`` starts them on
loopback (ephemeral ports unless ``base_port`` is given: worker ``i`` then uses HTTP
``base_port + 3*i``, KV events ``+1`` and replay ``+2``); ``run_pool`` blocks until a
stop event (or SIGINT/SIGTERM when asked to handle signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scheduler.sim.engine import EngineConfig
from scheduler.sim.worker import DEFAULT_MODEL, SimWorker, WorkerConfig, WorkerDescriptor


@dataclass(frozen=True, slots=True)
class PoolConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    base_port: int | None = None
    speed: float = 1.0
    legacy_events: bool = False
    replay: bool = True
    name_prefix: str = "sim"
    # KV-event topic template (WorkerConfig.topic); "" is vLLM's default.
    topic: str = ""
    # Hugging Face tokenizer directory; None = the simulated model's own files.
    tokenizer_dir: str | None = None
    events_with_token_ids: bool = True
    omit_metrics: tuple[str, ...] = ()
    engine: EngineConfig = field(default_factory=EngineConfig)

    def worker_config(self, index: int) -> WorkerConfig:
        ports = (0, 0, 0)
        if self.base_port is not None:
            first = self.base_port + 3 * index
            ports = (first, first + 1, first + 2)
        return WorkerConfig(
            name=f"{self.name_prefix}-{index}",
            model=self.model,
            host=self.host,
            http_port=ports[0],
            kv_port=ports[1],
            replay_port=ports[2] if self.replay else None,
            speed=self.speed,
            legacy_events=self.legacy_events,
            topic=self.topic,
            tokenizer_dir=self.tokenizer_dir,
            events_with_token_ids=self.events_with_token_ids,
            omit_metrics=self.omit_metrics,
            engine=self.engine,
        )


class SimPool:
    def __init__(
        self,
        workers: int,
        config: PoolConfig | None = None,
        *,
        worker_configs: Sequence[WorkerConfig] | None = None,
    ) -> None:
        """``workers`` copies of ``config``, or exactly ``worker_configs`` when given."""
        if worker_configs is None:
            if workers < 1:
                raise ValueError("a pool needs at least one worker")
            cfg = config or PoolConfig()
            worker_configs = [cfg.worker_config(i) for i in range(workers)]
        self.workers = [SimWorker(c) for c in worker_configs]

    async def start(self) -> None:
        started: list[SimWorker] = []
        try:
            for worker in self.workers:
                await worker.start()
                started.append(worker)
        except BaseException:
            for worker in reversed(started):
                await worker.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self.workers), return_exceptions=True)

    async def __aenter__(self) -> SimPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def descriptors(self) -> list[WorkerDescriptor]:
        return [worker.descriptor for worker in self.workers]

    def worker(self, name: str) -> SimWorker:
        for worker in self.workers:
            if worker.name == name:
                return worker
        raise KeyError(name)


async def serve_pool(
    workers: int,
    config: PoolConfig | None = None,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[WorkerDescriptor]], None] | None = None,
    handle_signals: bool = False,
) -> None:
    """Run a pool until ``stop`` is set (or SIGINT/SIGTERM with ``handle_signals``)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
    try:
        async with SimPool(workers, config) as pool:
            if on_ready is not None:
                on_ready(pool.descriptors)
            await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def run_pool(
    workers: int,
    config: PoolConfig | None = None,
    *,
    on_ready: Callable[[list[WorkerDescriptor]], None] | None = None,
) -> None:
    """Blocking runner: start the pool, call ``on_ready``, serve until SIGINT/SIGTERM."""
    asyncio.run(serve_pool(workers, config, on_ready=on_ready, handle_signals=True))
