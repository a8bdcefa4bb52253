"""Importing kvsched keeps numpy's OpenBLAS to one thread (its workers spin after every call,
CPU a latency-bound scheduler on a small node needs), unless the environment asks for more."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, scheduler, numpy; "
    "numpy.ones((256, 256)) @ numpy.ones((256, 256)); "
    "print(len(os.listdir('/proc/self/task')))"
)


def _threads_after_a_matrix_product(env_threads: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if env_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = env_threads
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(
    (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 cores and /proc"
)
def test_importing_kvsched_first_leaves_numpy_one_blas_thread() -> None:
    assert _threads_after_a_matrix_product(None) == 1
    # The environment still decides when it says something.
    assert _threads_after_a_matrix_product("2") > 1
