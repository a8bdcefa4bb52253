"""The routers ``kvsched bench peers`` compares, each started as its users start it.

Every router runs in processes of its own, in front of a simulated pool in a process of its
own (``kvsched sim``): no two of them share an event loop, as none would in production.
What each row is:

* ``kvsched``: ``kvsched serve`` (its defaults; the pool's tokenizer directory; every worker's
  KV events and replay socket) as the ext_proc Endpoint Picker of a real Envoy
  (``scheduler/demo/envoy.py``: GIE's FULL_DUPLEX_STREAMED modes, ORIGINAL_DST cluster).
  Its CPU is kvsched's and Envoy's together.
* ``sglang``: sglang-router 0.3.2, ``python -m sglang_router.launch_router --policy
  cache_aware`` over the workers' URLs, every routing setting at its default (cache_threshold
  0.3, balance_abs_threshold 64, balance_rel_threshold 1.5, eviction_interval_secs 60,
  max_tree_size 2**26: ``launch_router --help``, ``sglang_router/router_args.py`` of the
  0.3.2 wheel). ``--tokenizer-path`` names the pool's tokenizer directory; the workers'
  ``/server_info`` names the same directory as ``model_path``, where 0.3.2 loads a worker's
  tokenizer from, so nothing reaches for a model hub. Its ``cache_aware`` matches request
  text (characters), not tokens.
* ``vllm``: vllm-router 0.1.17, ``vllm-router --policy kv_aware`` with each worker's ZMQ
  KV-event and replay endpoints (``--kv-event-source URL=tcp://...``,
  ``--kv-event-replay-source``; outside Kubernetes kv_aware needs them and
  ``--kv-event-model``), block size 16 (its default, the pool's), every other setting at its
  default (router_temperature 0.0, kv_penalty_host 0.8, kv_penalty_external 0.6,
  kv_penalty_disk 0.3, session affinity off: ``vllm-router --help``,
  ``vllm_router/router_args.py`` of the 0.1.17 wheel). It subscribes to the empty topic
  only, which is why the pool publishes under vLLM's default topic (``""``). It has no
  tokenizer setting: it asks the workers' render API for a text prompt's ids.
* ``envoy-rr``: the same Envoy with no Endpoint Picker, a plain ``ROUND_ROBIN`` cluster of
  the workers: what a gateway gives without one. Its CPU is Envoy's.
* ``envoy-floor``: the same Envoy with the protocol-only ext_proc of ``kvsched bench epp``'s
  floors (``bench/extproc_floors.py``, native code: the GIE exchange and nothing decided; the
  workers in turn), answering the response phase on the decision stream as the Inference
  Extension's layout does: the data path's floor for any Endpoint Picker behind Envoy. It
  places as ``envoy-rr`` does, so the two rows' data paths differ by the protocol alone, and
  kvsched's row's above it is kvsched's own. Its CPU is the floor's and Envoy's.
* ``client-rr``: no router at all; the load generator sends request ``i`` to worker
  ``i mod N``. Its data-path figure is the floor of the client and the loopback.

``--router-args NAME ARGS`` appends arguments to a router's command line (kvsched serve,
sglang-router, vllm-router), for what-if runs; the rows' ``command`` records them.

Both peers log at ``warn`` (their default is ``info``): their log lines go to a file and
are no part of what is compared. Children run with ``HF_HUB_OFFLINE=1`` and see only
loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

import scheduler
from scheduler.bench.epp_bench import cpu_seconds
from scheduler.bench.peer_names import PEERS, ROUTER_DESCRIPTIONS
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings, envoy_binary
from scheduler.workloads.model import WorkloadRequest

READY_TIMEOUT_S = 60.0
_POLL_S = 0.05
_STOP_TIMEOUT_S = 10.0
# The simulated workers' model publishes KV blocks of this many tokens (the pool's default).
BLOCK_SIZE = 16
# The data path's floor: a protocol-only ext_proc in native code (``kvsched bench epp``'s).
NATIVE_EXTPROC = "scheduler._native.extproc"
FLOORS_MODULE = "scheduler.bench.extproc_floors"
PEERS_INSTALL = "pip install 'kvsched[peers]'"
_INSTALL_HINTS = {NATIVE_EXTPROC: "pip install builds it where gRPC C++ is present: README, Set up"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# --- child processes --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The children's environment: offline, and importing this very ``scheduler`` package
    whatever the working directory or install."""
    env = {**os.environ, **OFFLINE_ENV}
    root = str(Path(scheduler.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def free_port() -> int:
    """A loopback port free now (for programs that cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Child:
    """A started program; its output goes to ``log``."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def child(
    name: str, argv: list[str], workdir: Path, *, stdout_pipe: bool = False, stdin_pipe: bool = False
) -> AsyncIterator[Child]:
    """Run ``argv`` until the block ends, then SIGTERM it (SIGKILL after a grace period).
    ``stdin_pipe``: its stdin stays open until then (children that stop when it closes)."""
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else sink,
            stderr=sink,
            env=child_env(),
        )
    started = Child(name, process, log)
    try:
        yield started
    finally:
        if process.stdin is not None:
            process.stdin.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()


async def until_ready(
    started: Child, ready: Callable[[], Awaitable[bool]], what: str, timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Poll ``ready`` until it holds; fail with the program's log if it exits or times out.
    (These programs announce readiness on no channel of their own; polling their API is how
    their operators wait for them too.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if started.process.returncode is not None:
            raise RuntimeError(f"{started.name} exited ({started.process.returncode}): {started.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError, KeyError, TimeoutError):
            if await ready():
                return
        if loop.time() > deadline:
            raise RuntimeError(
                f"{started.name}: {what} not reached in {timeout_s:.0f}s: {started.log_tail()}"
            )
        await asyncio.sleep(_POLL_S)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        if response.status != 200:
            raise ValueError(f"{url}: HTTP {response.status}")
        return await response.json(content_type=None)


async def envoy_counters(session: aiohttp.ClientSession, admin_url: str, pattern: str) -> dict[str, int]:
    """Envoy's counters whose names match ``pattern`` (a regular expression), from its admin API."""
    query = urllib.parse.urlencode({"format": "json", "filter": pattern})
    page = await get_json(session, f"{admin_url}/stats?{query}")
    return {
        str(stat["name"]): int(stat["value"])
        for stat in page.get("stats", ())
        if "name" in stat and isinstance(stat.get("value"), int)
    }


def tree_cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and all its live descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                parents[int(entry.name)] = int(fields[1])
    out: dict[str, float] = {}
    for name, root in pids.items():
        tree, frontier = {root}, [root]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
            tree.update(children)
            frontier += children
        total = 0.0
        for pid in tree:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += cpu_seconds(pid)
        out[name] = total
    return out


# --- the pool -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    """A fresh simulated pool: worker ``i`` is the one worker of its own ``kvsched sim``
    process (``pids[i]``), named ``sim-i`` here; ``labels`` maps the name each worker gives
    itself in responses (``sim-i-0``) to that."""

    workers: list[dict[str, Any]]
    tokenizer_dir: str
    pids: list[int]
    labels: dict[str, str]

    @property
    def model(self) -> str:
        return str(self.workers[0]["model"])

    @property
    def urls(self) -> list[str]:
        return [str(w["http_url"]) for w in self.workers]


async def announced(started: Child) -> Any:
    """The first line a child prints on its stdout (what it serves), as JSON."""
    stdout = started.process.stdout
    assert stdout is not None
    try:
        line = await asyncio.wait_for(stdout.readline(), READY_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line:
        raise RuntimeError(f"{started.name} did not start: {started.log_tail()}")
    return json.loads(line)


@contextlib.asynccontextmanager
async def simulated_pool(
    workdir: Path, *, workers: int, capacity_blocks: int, max_model_len: int, speed: float = 1.0
) -> AsyncIterator[Pool]:
    """``workers`` processes of ``kvsched sim --workers 1``: empty caches, vLLM's default
    (empty) KV topic, engines at ``speed`` (simulated seconds per real second).

    One process per worker, as every vLLM pod has its own API server: a worker's HTTP
    handling and tokenisation (about 5 ms of CPU for a 2.6k-token text prompt here) then
    delays that worker only. In one process, vllm-router's render call to every worker for
    every request kept the pool's one event loop busy 40% of the time at 12 req/s and
    pushed every worker's TTFT p50 from 8 ms to 2 s.
    """
    argv = [sys.executable, "-m", "scheduler", "sim", "--json", "--workers", "1"]
    argv += ["--capacity-blocks", str(capacity_blocks), "--max-model-len", str(max_model_len)]
    argv += ["--block-size", str(BLOCK_SIZE), "--speed", repr(speed)]
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                child(f"sim-{i}", [*argv, "--name-prefix", f"sim-{i}"], workdir, stdout_pipe=True)
            )
            for i in range(workers)
        ]
        described = await asyncio.gather(*(announced(s) for s in started))
        members = [{**d["workers"][0], "name": f"sim-{i}"} for i, d in enumerate(described)]
        labels = {d["workers"][0]["name"]: f"sim-{i}" for i, d in enumerate(described)}
        yield Pool(members, described[0]["tokenizer_dir"], [s.pid for s in started], labels)


# --- routers ------------------------------------------------------------------------------------


@dataclass
class RunningRouter:
    """A router in front of a pool: where requests go, and whose CPU is the router's."""

    url: str
    pids: dict[str, int]
    route: Callable[[WorkloadRequest], str] | None = None
    # What the router says about its own decisions after the run (kvsched's /debug/status).
    diagnostics: Callable[[], Awaitable[dict[str, Any]]] | None = None
    command: list[str] = field(default_factory=list)


class RouterStarter(Protocol):
    def __call__(
        self, pool: Pool, workdir: Path, extra_args: Sequence[str] = ()
    ) -> contextlib.AbstractAsyncContextManager[RunningRouter]: ...


@dataclass(frozen=True, slots=True)
class RouterSpec:
    name: str
    description: str
    start: RouterStarter
    # A Python module the router needs; None: none beyond kvsched's own.
    module: str | None = None
    needs_envoy: bool = False
    is_peer: bool = False

    def missing(self) -> str | None:
        """Why this router cannot run here, or None."""
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed ({_INSTALL_HINTS.get(self.module, PEERS_INSTALL)})"
        if self.needs_envoy:
            try:
                envoy_binary()
            except RuntimeError as exc:
                return str(exc)
        return None


@contextlib.asynccontextmanager
async def _kvsched(pool: Pool, workdir: Path, extra_args: Sequence[str] = ()) -> AsyncIterator[RunningRouter]:
    ready_file = workdir / "kvsched-ready.json"
    argv = [sys.executable, "-m", "scheduler", "serve", "--plaintext", "--host", "127.0.0.1"]
    argv += ["--grpc-port", "0", "--health-port", "0", "--metrics-port", "0"]
    argv += ["--tokenizer-dir", pool.tokenizer_dir, "--ready-file", str(ready_file), *extra_args]
    for w in pool.workers:
        argv += ["--endpoint", f"{w['address']},kv={w['kv_endpoint']},replay={w['replay_endpoint']}"]
    async with child("kvsched", argv, workdir) as serve, aiohttp.ClientSession() as session:

        async def ready_file_written() -> bool:
            return ready_file.exists()

        await until_ready(serve, ready_file_written, "the ready file")
        ports = json.loads(ready_file.read_text())["ports"]
        metrics = f"http://127.0.0.1:{ports['metrics']}"

        async def scraped_every_worker() -> bool:
            # Every worker's load scraped once, as the peers know their (zero) loads at start.
            async with session.get(f"{metrics}/metrics") as response:
                page = await response.text()
            ages = [
                line for line in page.splitlines() if line.startswith("kvsched_endpoint_metrics_age_seconds{")
            ]
            return len(ages) == len(pool.workers) and not any(line.endswith(" NaN") for line in ages)

        await until_ready(serve, scraped_every_worker, "a first scrape of every worker")
        settings = EnvoySettings("127.0.0.1", ports["grpc"], epp_health_port=ports["health"])
        async with EnvoyGateway(settings) as envoy:
            assert envoy.pid is not None

            async def status() -> dict[str, Any]:
                result: dict[str, Any] = await get_json(session, f"{metrics}/debug/status")
                # Envoy's side of the exchange: a request Envoy fails on the ext_proc stream
                # (stream failed, message timeout) never reaches kvsched's own counters.
                result["envoy"] = await envoy_counters(
                    session, envoy.admin_url, r"http\.gw\.(ext_proc\.|downstream_rq_[1-5]xx)"
                )
                return result

            yield RunningRouter(
                envoy.url, {"kvsched": serve.pid, "envoy": envoy.pid}, diagnostics=status, command=argv
            )


@contextlib.asynccontextmanager
async def _sglang(pool: Pool, workdir: Path, extra_args: Sequence[str] = ()) -> AsyncIterator[RunningRouter]:
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--worker-urls", *pool.urls, "--policy", "cache_aware", "--tokenizer-path", pool.tokenizer_dir]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warn"]
    argv += extra_args
    url = f"http://127.0.0.1:{port}"
    async with child("sglang-router", argv, workdir) as router, aiohttp.ClientSession() as session:

        async def workers_registered() -> bool:
            listed = await get_json(session, f"{url}/workers")
            healthy = [w for w in listed["workers"] if w.get("is_healthy")]
            return len(healthy) == len(pool.workers)

        await until_ready(router, workers_registered, "every worker registered and healthy")
        yield RunningRouter(url, {"sglang-router": router.pid}, command=argv)


@contextlib.asynccontextmanager
async def _vllm(pool: Pool, workdir: Path, extra_args: Sequence[str] = ()) -> AsyncIterator[RunningRouter]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--worker-urls", *pool.urls, "--policy", "kv_aware", "--kv-event-model", pool.model]
    argv += ["--kv-event-block-size", str(BLOCK_SIZE)]
    for w in pool.workers:
        argv += ["--kv-event-source", f"{w['http_url']}={w['kv_endpoint']}"]
        argv += ["--kv-event-replay-source", f"{w['http_url']}={w['replay_endpoint']}"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    argv += ["--log-level", "warning", *extra_args]
    url = f"http://127.0.0.1:{port}"
    async with child("vllm-router", argv, workdir) as router, aiohttp.ClientSession() as session:

        async def serving() -> bool:
            # It opens its port only once every worker answered its health check.
            async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status == 200

        await until_ready(router, serving, "its HTTP port")
        yield RunningRouter(url, {"vllm-router": router.pid}, command=argv)


@contextlib.asynccontextmanager
async def _envoy_round_robin(
    pool: Pool, workdir: Path, extra_args: Sequence[str] = ()
) -> AsyncIterator[RunningRouter]:
    settings = EnvoySettings("127.0.0.1", 0, ext_proc=False, pool=[str(w["address"]) for w in pool.workers])
    async with EnvoyGateway(settings) as envoy:
        assert envoy.pid is not None
        yield RunningRouter(
            envoy.url, {"envoy": envoy.pid}, command=["envoy (ROUND_ROBIN cluster, no ext_proc)"]
        )


@contextlib.asynccontextmanager
async def _envoy_floor(
    pool: Pool, workdir: Path, extra_args: Sequence[str] = ()
) -> AsyncIterator[RunningRouter]:
    # The protocol-only native ext_proc of `kvsched bench epp`'s floors, answering the response
    # phase on the decision stream (the GIE layout), behind the same Envoy as kvsched.
    options = {"endpoints": [str(w["address"]) for w in pool.workers]}
    argv = [sys.executable, "-m", FLOORS_MODULE, "floor_native", json.dumps(options)]
    async with child("extproc-floor", argv, workdir, stdout_pipe=True, stdin_pipe=True) as floor:
        ports = await announced(floor)
        settings = EnvoySettings(
            "127.0.0.1", ports["grpc_port"], epp_health_port=ports["health_port"], observation=False
        )
        async with EnvoyGateway(settings) as envoy:
            assert envoy.pid is not None
            yield RunningRouter(
                envoy.url,
                {"extproc-floor": floor.pid, "envoy": envoy.pid},
                command=[*argv[:-1], "(the workers in turn)"],
            )


@contextlib.asynccontextmanager
async def _client_round_robin(
    pool: Pool, workdir: Path, extra_args: Sequence[str] = ()
) -> AsyncIterator[RunningRouter]:
    urls = pool.urls
    turn = iter(range(1 << 62))

    def route(request: WorkloadRequest) -> str:
        # In the order requests are sent (arrival order): i mod N.
        return urls[next(turn) % len(urls)]

    yield RunningRouter(urls[0], {}, route=route, command=["(the client picks worker i mod N)"])


_STARTERS: dict[str, tuple[RouterStarter, str | None, bool]] = {
    # name: (how to start it, the Python module it needs, whether Envoy runs it)
    "kvsched": (_kvsched, None, True),
    "sglang": (_sglang, "sglang_router", False),
    "vllm": (_vllm, "vllm_router", False),
    "envoy-rr": (_envoy_round_robin, None, True),
    "envoy-floor": (_envoy_floor, NATIVE_EXTPROC, True),
    "client-rr": (_client_round_robin, None, False),
}
ROUTERS: dict[str, RouterSpec] = {
    name: RouterSpec(name, description, *_STARTERS[name], is_peer=name in PEERS)
    for name, description in ROUTER_DESCRIPTIONS.items()
}


def available_routers() -> tuple[list[str], dict[str, str]]:
    """The routers that can run here, and why each of the others cannot."""
    ready, missing = [], {}
    for name, spec in ROUTERS.items():
        reason = spec.missing()
        if reason is None:
            ready.append(name)
        else:
            missing[name] = reason
    return ready, missing
