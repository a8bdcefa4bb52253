"""A simulated pool in a process of its own (``kvsched demo``'s): it serves vLLM's API from
there, and it is gone once the context ends."""

from __future__ import annotations

import os

import aiohttp
import pytest

from scheduler.sim.pool_process import PoolProcess


async def test_a_pool_in_its_own_process_serves_and_stops() -> None:
    async with PoolProcess(2, speed=50.0) as pool:
        pid = pool.pid
        assert pid is not None and pid != os.getpid()
        assert [d.name for d in pool.descriptors] == ["sim-0", "sim-1"]
        async with aiohttp.ClientSession() as session:
            for descriptor in pool.descriptors:
                async with session.get(f"{descriptor.http_url}/v1/models") as response:
                    models = await response.json()
                assert models["data"][0]["id"] == descriptor.model
            body = {"model": pool.descriptors[0].model, "prompt": "a prompt", "max_tokens": 2}
            async with session.post(f"{pool.descriptors[0].http_url}/v1/completions", json=body) as response:
                assert response.status == 200
    # Stopped and reaped: no process with that pid is left.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"the pool's process {pid} is still running")


async def test_a_pool_that_cannot_start_says_so_with_the_exit_code() -> None:
    # The child raises before announcing its workers (a pool needs one): no line, a clear error.
    pool = PoolProcess(0)
    with pytest.raises(RuntimeError, match=r"did not start \(exit code 1\)"):
        async with pool:
            raise AssertionError("entered a pool that never started")
    assert pool.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pool.pid, 0)
