"""The predictor's fitting process, lowered in priority before it imports anything heavy.

Spawned, not forked (the server holds gRPC and ZMQ threads), a child first re-imports the
module of the function that initialises it. That function used to live beside the trainer,
whose module imports numpy and the predictor: a new fitting process spent 0.71 s of CPU at
the server's own priority before it lowered itself, in the middle of the traffic that made
the first fit due (``getrusage`` of the spawned child, one trivial job). This module imports
only the standard library, so the child lowers itself (``FIT_NICENESS``) after 0.18-0.23 s,
the interpreter's own start, and imports numpy, the predictor and xgboost with the first
fit, at its lower priority.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

# Niceness of the fitting process: 10 gives it ~1/10 of a core the server also wants.
FIT_NICENESS = 10
# How often the fitting process checks that the server that started it still runs.
ORPHAN_CHECK_S = 1.0


def _start(niceness: int, server_pid: int) -> None:
    """In the fitting process: lower its priority, and end it when the server is gone.

    A server killed outright (SIGKILL, out of memory) cannot shut its pool down, and the
    pool's worker would wait on its queue forever, holding the server's stdout open.
    """
    os.nice(niceness)

    def leave_with_the_server() -> None:
        while os.getppid() == server_pid:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(0)

    threading.Thread(target=leave_with_the_server, name="server watch", daemon=True).start()


def fit_process() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(FIT_NICENESS, os.getpid()),
    )
