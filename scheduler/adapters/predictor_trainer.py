"""Trains the latency predictor in the background of the live server.

A fit takes seconds (xgboost, two targets); a pick takes microseconds and runs on the
event loop. So the trainer takes the predictor's training job on the loop (a snapshot:
observations keep arriving while it fits), fits it off the loop, and installs the result
back on the loop, where every predictor call happens, so the predictor itself needs no lock.
At most one fit runs at a time.

Where a fit runs (``fit_in``):

* ``"process"`` (what ``kvsched serve`` uses): one long-lived helper process, started at the
  first fit (spawned, not forked: the server holds gRPC and ZMQ threads) at a lower
  scheduling priority (``os.nice(FIT_NICENESS)``, before it imports numpy or xgboost:
  ``fit_process.py``). xgboost's Python side and the compiling
  of its trees hold the GIL for most of a fit, so a fit on a thread of the server stalled
  every ext_proc stream for its duration; in another process it cannot, and at niceness 10
  the kernel gives it about a tenth of a core the event loop wants (CFS weights 110 against
  1024), so it takes the idle time instead of the decisions' time. The job goes over as a
  pickle (~0.14 MB at 2,000 samples) and the model back (~1.3 MB): milliseconds, once per
  fit.
* ``"thread"``: a worker thread of this process, for callers that pass their own ``fit``.

xgboost runs with the predictor's ``xgboost.nthread`` (1 by default).

Optionally each installed model is saved to a file (written beside it and renamed over
it, so a reader never sees half a model) and the file is loaded at start, so a restarted
server predicts with what it had learned instead of starting over from the prior. File
reads and writes happen on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scheduler.adapters.fit_process import fit_process
from scheduler.adapters.stage_times import STAGE_TIMES
from scheduler.core.predictor import LatencyPredictor, TrainedModel, TrainingJob

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_S = 1.0
FitPlace = Literal["process", "thread"]


@dataclass(slots=True)
class TrainerStats:
    fits: int = 0  # finished, successful or not
    failures: int = 0
    installed: int = 0
    saves: int = 0
    save_failures: int = 0
    loaded_version: int | None = None  # the model loaded at start, if any
    last_error: str = ""
    last_fit_s: float = 0.0
    last_fit_cpu_s: float = 0.0  # CPU time of the last fit, wherever it ran


def _fit(job: TrainingJob) -> TrainedModel:
    return job.fit()


def _timed_fit(fit: Callable[[TrainingJob], TrainedModel], job: TrainingJob) -> tuple[TrainedModel, int]:
    """The fit and the CPU nanoseconds it took on the thread (or process) that ran it."""
    started = time.thread_time_ns()
    model = fit(job)
    return model, time.thread_time_ns() - started


class PredictorTrainer:
    """Fits ``predictor``'s training jobs off the event loop whenever ``training_due``."""

    def __init__(
        self,
        predictor: LatencyPredictor,
        *,
        model_path: str | os.PathLike[str] | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        fit: Callable[[TrainingJob], TrainedModel] = _fit,
        on_install: Callable[[TrainedModel], None] | None = None,
        fit_in: FitPlace = "thread",
    ) -> None:
        if check_interval_s <= 0:
            raise ValueError("check_interval_s must be positive")
        if fit_in == "process" and fit is not _fit:
            raise ValueError("a custom fit runs on a thread (fit_in='thread')")
        self.fit_in = fit_in
        self.predictor = predictor
        self.model_path = None if model_path is None else Path(model_path)
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.stats = TrainerStats()
        self._fit = fit
        self._on_install = on_install
        # Files are read and written on this thread; fits too unless they run in a process.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-fit")
        self._fit_executor: Executor | None = None if fit_in == "process" else self._executor
        self._training: asyncio.Task[TrainedModel | None] | None = None
        self._checks: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def in_flight(self) -> bool:
        """Whether a fit (or the save that follows it) is under way."""
        return self._training is not None and not self._training.done()

    async def start(self) -> None:
        """Load the model file if there is one, then check ``training_due`` every interval."""
        if self.model_path is not None:
            await self.load()
        if self._checks is None:
            self._checks = asyncio.create_task(self._check_loop(), name="predictor trainer")

    async def stop(self) -> None:
        """Stop checking; a fit in flight is finished, installed and saved before this returns."""
        self._stopped = True
        checks, self._checks = self._checks, None
        if checks is not None:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
        if self._training is not None:
            await self._training
        self._executor.shutdown(wait=False)
        if self._fit_executor is not None and self._fit_executor is not self._executor:
            self._fit_executor.shutdown(wait=True, cancel_futures=True)
        self._fit_executor = None

    async def __aenter__(self) -> PredictorTrainer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def maybe_train(self) -> asyncio.Task[TrainedModel | None] | None:
        """Start a fit when one is due and none is running; the running one's task, or None.

        Cheap enough to call after every observation; the periodic check calls it too.
        The task's result is the fitted model, or None when the fit failed.
        """
        if self.in_flight:
            return self._training
        if self._stopped or not self.predictor.training_due(self.clock()):
            return None
        job = self.predictor.training_job()
        self._training = asyncio.get_running_loop().create_task(
            self._train(job), name=f"predictor fit v{job.version}"
        )
        return self._training

    async def _check_loop(self) -> None:
        while True:
            self.maybe_train()
            await asyncio.sleep(self.check_interval_s)

    async def _train(self, job: TrainingJob) -> TrainedModel | None:
        loop = asyncio.get_running_loop()
        started = self.clock()
        if self._fit_executor is None:
            self._fit_executor = fit_process()
        try:
            model, cpu_ns = await loop.run_in_executor(self._fit_executor, _timed_fit, self._fit, job)
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool):
                # The fitting process died (killed, out of memory): the next fit starts another.
                self._fit_executor = None
            self.stats.fits += 1
            self.stats.failures += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("predictor fit v%d failed; the current model keeps answering", job.version)
            return None
        self.stats.fits += 1
        self.stats.last_fit_s = self.clock() - started
        self.stats.last_fit_cpu_s = cpu_ns / 1e9
        STAGE_TIMES.add("predictor_fit", cpu_ns)
        if self.predictor.install(model, self.clock()):
            self.stats.installed += 1
            if self._on_install is not None:
                self._on_install(model)
            if self.model_path is not None:
                await self._save(model, self.model_path)
        return model

    async def _save(self, model: TrainedModel, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, _write_atomically, path, model)
        except OSError as exc:
            self.stats.save_failures += 1
            self.stats.last_error = f"saving {path}: {exc}"
            log.warning("could not save the predictor model to %s: %s", path, exc)
            return
        self.stats.saves += 1

    async def load(self) -> bool:
        """Install the model saved at ``model_path``; False (logged) when it is missing or unusable."""
        path = self.model_path
        if path is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._executor, _read, path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            # Whatever is wrong with the file (truncated, another format, another feature
            # layout), the server starts, on the prior.
            self.stats.last_error = f"loading {path}: {exc}"
            log.warning("ignoring the predictor model in %s: %s", path, exc)
            return False
        if not self.predictor.install(model, self.clock()):
            return False
        self.stats.loaded_version = model.version
        return True


def _read(path: Path) -> TrainedModel:
    return TrainedModel.from_bytes(path.read_bytes())


def _write_atomically(path: Path, model: TrainedModel) -> None:
    data = model.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
