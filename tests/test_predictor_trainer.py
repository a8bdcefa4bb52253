"""Background predictor training on a real event loop: fits off the loop, installs on it,
saves and loads the model file, survives failing fits and unreadable files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scheduler.adapters.fit_process import FIT_NICENESS, fit_process
from scheduler.adapters.predictor_trainer import PredictorTrainer
from scheduler.bench.predictor_bench import synthetic_samples
from scheduler.core.predictor import LatencyPredictor, PredictorConfig, TrainedModel, TrainingJob

CONFIG = PredictorConfig(min_samples=100, max_samples=4000, retrain_every_samples=200)
# A guard against a hung test, never a synchronisation: every wait below is on an event.
GUARD_S = 60.0


def observed_predictor(samples: int = 400, seed: int = 0) -> LatencyPredictor:
    predictor = LatencyPredictor(CONFIG)
    observe(predictor, 0, samples, seed)
    return predictor


def observe(predictor: LatencyPredictor, start: int, stop: int, seed: int = 0) -> None:
    data = synthetic_samples(stop, seed)
    for i in range(start, stop):
        predictor.observe(data.features[i], float(data.ttft_ms[i]), float(data.tpot_ms[i]), 0.0)


class GatedFit:
    """A fit that waits on the worker thread until the test lets it finish."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread_ids: list[int] = []
        self.jobs: list[TrainingJob] = []

    def __call__(self, job: TrainingJob) -> TrainedModel:
        self.thread_ids.append(threading.get_ident())
        self.jobs.append(job)
        self.entered.set()
        if not self.release.wait(GUARD_S):
            raise TimeoutError("the test never released the fit")
        return job.fit()

    async def wait_entered(self) -> None:
        # Waited for on a default-executor thread, so the loop itself stays free.
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, GUARD_S)


async def test_fit_runs_on_the_worker_thread_and_installs_on_the_loop() -> None:
    predictor = observed_predictor()
    gate = GatedFit()
    trainer = PredictorTrainer(predictor, fit=gate)
    rows = synthetic_samples(8, seed=1).features
    task = trainer.maybe_train()
    assert task is not None
    await gate.wait_entered()
    # The loop is free while the fit runs: picks are answered, by the prior, and no second fit starts.
    assert trainer.in_flight
    assert predictor.predict(rows).source == "prior"
    assert trainer.maybe_train() is task
    observe(predictor, 400, 600)  # arrives during the fit: not part of its job
    assert len(gate.jobs[0].train) + len(gate.jobs[0].holdout) == 400
    gate.release.set()
    model = await asyncio.wait_for(task, GUARD_S)
    assert model is not None and predictor.model is model
    assert predictor.predict(rows).source == "model"
    assert gate.thread_ids and gate.thread_ids[0] != threading.get_ident()
    assert trainer.stats.fits == 1 and trainer.stats.installed == 1 and trainer.stats.failures == 0
    assert not trainer.in_flight
    await trainer.stop()


async def test_periodic_checks_train_when_due_and_call_on_install() -> None:
    predictor = LatencyPredictor(CONFIG)
    installed: asyncio.Queue[TrainedModel] = asyncio.Queue()
    trainer = PredictorTrainer(predictor, check_interval_s=0.01, on_install=installed.put_nowait)
    async with trainer:
        observe(predictor, 0, 300)
        first = await asyncio.wait_for(installed.get(), GUARD_S)
        observe(predictor, 300, 600)  # retrain_every_samples (200) new observations
        second = await asyncio.wait_for(installed.get(), GUARD_S)
    assert (first.version, second.version) == (1, 2)
    assert predictor.model is second and predictor.stats.trainings == 2
    assert trainer.maybe_train() is None  # stopped


async def test_each_install_is_saved_and_loaded_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "models" / "predictor.npz"
    predictor = observed_predictor()
    trainer = PredictorTrainer(predictor, model_path=path)
    await trainer.start()
    task = trainer.maybe_train()
    assert task is not None
    model = await asyncio.wait_for(task, GUARD_S)
    await trainer.stop()
    assert model is not None and path.is_file()
    assert trainer.stats.saves == 1 and not list(path.parent.glob(".*.tmp"))

    restarted = LatencyPredictor(CONFIG)
    again = PredictorTrainer(restarted, model_path=path)
    await again.start()
    assert again.stats.loaded_version == model.version
    rows = synthetic_samples(64, seed=2).features
    expected, got = predictor.predict(rows), restarted.predict(rows)
    assert np.array_equal(got.ttft_ms, expected.ttft_ms) and np.array_equal(got.tpot_ms, expected.tpot_ms)
    # Training goes on from the loaded version: the next model is newer, so it installs.
    observe(restarted, 0, 300, seed=3)
    task = again.maybe_train()
    assert task is not None
    newer = await asyncio.wait_for(task, GUARD_S)
    assert newer is not None and newer.version > model.version and restarted.model is newer
    await again.stop()
    assert TrainedModel.from_bytes(path.read_bytes()).version == newer.version


async def test_a_failing_fit_is_counted_and_the_prior_keeps_answering() -> None:
    predictor = observed_predictor()

    def broken(job: TrainingJob) -> TrainedModel:
        raise RuntimeError("out of memory")

    trainer = PredictorTrainer(predictor, fit=broken)
    task = trainer.maybe_train()
    assert task is not None
    assert await asyncio.wait_for(task, GUARD_S) is None
    assert trainer.stats.failures == 1 and "out of memory" in trainer.stats.last_error
    assert predictor.model is None
    assert trainer.maybe_train() is None  # nothing new since the failed job
    observe(predictor, 400, 420)
    assert trainer.maybe_train() is not None
    await trainer.stop()


async def test_an_unreadable_model_file_is_ignored_at_start(tmp_path: Path) -> None:
    path = tmp_path / "predictor.npz"
    path.write_bytes(b"not a model")
    predictor = LatencyPredictor(CONFIG)
    trainer = PredictorTrainer(predictor, model_path=path)
    await trainer.start()
    assert predictor.model is None and trainer.stats.loaded_version is None
    assert str(path) in trainer.stats.last_error
    await trainer.stop()
    missing = PredictorTrainer(LatencyPredictor(CONFIG), model_path=tmp_path / "absent.npz")
    assert not await missing.load()
    await missing.stop()


async def test_stop_finishes_a_fit_in_flight_and_saves_it(tmp_path: Path) -> None:
    path = tmp_path / "predictor.npz"
    predictor = observed_predictor()
    gate = GatedFit()
    trainer = PredictorTrainer(predictor, model_path=path, fit=gate)
    await trainer.start()
    task = trainer.maybe_train()
    assert task is not None
    await gate.wait_entered()
    stopping = asyncio.create_task(trainer.stop())
    gate.release.set()
    await asyncio.wait_for(stopping, GUARD_S)
    assert task.done() and predictor.model is not None and path.is_file()


def test_check_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PredictorTrainer(LatencyPredictor(CONFIG), check_interval_s=0)


async def test_fits_in_a_lower_priority_process_install_on_the_loop() -> None:
    predictor = observed_predictor()
    trainer = PredictorTrainer(predictor, fit_in="process")
    task = trainer.maybe_train()
    assert task is not None
    model = await asyncio.wait_for(task, GUARD_S)
    assert model is not None and predictor.model is model
    rows = synthetic_samples(8, seed=1).features
    assert predictor.predict(rows).source == "model"
    assert trainer.stats.installed == 1 and trainer.stats.last_fit_cpu_s > 0
    # The fit ran in another process, at a lower priority than this one.
    executor = trainer._fit_executor
    assert executor is not None
    pids = await asyncio.get_running_loop().run_in_executor(executor, os.getpid)
    niceness = await asyncio.get_running_loop().run_in_executor(executor, os.nice, 0)
    assert pids != os.getpid()
    assert niceness == os.nice(0) + FIT_NICENESS
    await trainer.stop()


def test_a_new_fitting_process_lowers_itself_before_loading_numpy() -> None:
    # Its initializer's module is all a spawned child imports before lowering its priority;
    # importing the trainer's (numpy, the predictor) there cost 0.71 s of CPU at the
    # server's priority, in the middle of the traffic that made the first fit due.
    executor = fit_process()
    try:
        pid = executor.submit(os.getpid).result(GUARD_S)
        niceness = executor.submit(os.nice, 0).result(GUARD_S)
        loaded = Path(f"/proc/{pid}/maps").read_text()
    finally:
        executor.shutdown()
    assert pid != os.getpid() and niceness == os.nice(0) + FIT_NICENESS
    assert "_multiarray_umath" not in loaded and "libxgboost" not in loaded
    assert "_multiarray_umath" in Path(f"/proc/{os.getpid()}/maps").read_text()


def test_a_custom_fit_cannot_be_sent_to_a_process() -> None:
    with pytest.raises(ValueError, match="thread"):
        PredictorTrainer(observed_predictor(100), fit=GatedFit(), fit_in="process")


def test_the_fitting_process_ends_when_its_server_is_killed(tmp_path: Path) -> None:
    # A server that started its fitting process and was then killed outright (no shutdown).
    script = (
        "import asyncio, os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from scheduler.adapters.predictor_trainer import PredictorTrainer\n"
        "from test_predictor_trainer import observed_predictor\n"
        "async def main():\n"
        "    trainer = PredictorTrainer(observed_predictor(), fit_in='process')\n"
        "    await trainer.maybe_train()\n"
        "    pid = await asyncio.get_running_loop().run_in_executor(trainer._fit_executor, os.getpid)\n"
        "    print(pid, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
        "asyncio.run(main())\n"
    )
    tests_dir = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-c", script, str(tests_dir.parent)],
        cwd=tests_dir,
        env={**os.environ, "PYTHONPATH": f"{tests_dir.parent}{os.pathsep}{tests_dir}"},
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    helper = int(result.stdout.split()[0])
    deadline = time.monotonic() + GUARD_S
    while _running(helper):
        assert time.monotonic() < deadline, "the fitting process outlived its server"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
