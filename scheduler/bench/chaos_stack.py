"""The stack ``kvsched bench chaos`` breaks: simulated workers, kvsched replicas, a real Envoy.

Every part is a process of its own, as deployed: each simulated vLLM worker, each kvsched
replica (``kvsched serve`` on a configuration file), Envoy. The gateway is wired the way the
chart's defaults and the Inference Extension's fallback behaviour describe:

* kvsched runs ``inferenceExtension.replicas`` (2) active-active replicas behind one ext_proc
  cluster, health-checked on their gRPC health ports; an ext_proc stream that cannot reach a
  replica, or loses it before its first answer, is replayed on the other (``epp_retries``);
* the failure mode is the chart's ``inferenceExtension.failureMode`` (FailClose) unless told;
* kvsched writes its ordered fallback list (``extproc.destination_list``) and Envoy's
  ``override_host`` policy takes it: a request whose endpoint refuses the connection or resets
  before answering is retried on the next endpoint of the list (``upstream_retries``).

Ports are fixed when the stack starts, so a killed process comes back where Envoy and kvsched
expect it. Every kvsched replica logs to a file of its own, which the bench scans for tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from scheduler.adapters.extproc.health import EXT_PROC_SERVICE
from scheduler.bench.epp_bench import child_command
from scheduler.demo.envoy import EnvoyGateway, EnvoySettings, EppReplica

PROCS_MODULE = "scheduler.bench.chaos_procs"
START_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 60.0
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# Fixed ports come from below Linux's ephemeral range (ip_local_port_range, 32768-60999 by
# default): a port taken from the kernel's ephemeral choice was, in a first run here, taken
# again by an outgoing connection before kvsched bound it; and a restarted process must find
# its port free again, which outgoing connections would not respect either.
_PORT_RANGE = (20_000, 32_000)
_taken: set[int] = set()


def free_port() -> int:
    """A loopback port below the ephemeral range that nothing listens on now."""
    rng = random.Random()
    while True:
        port = rng.randrange(*_PORT_RANGE)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@dataclass(frozen=True)
class StackConfig:
    workers: int = 4
    # The chart's defaults: inferenceExtension.replicas and inferenceExtension.failureMode.
    replicas: int = 2
    fail_open: bool = False
    # Envoy's ext_proc layout (EnvoySettings.observation): two filters, or the GIE single one.
    observation: bool = True
    transport: str = "native"
    speed: float = 1.0
    max_model_len: int = 4096
    capacity_blocks: int = 2048
    max_num_seqs: int = 256
    # vLLM's default replay buffer; small values make a gap unrecoverable by replay.
    buffer_steps: int = 10_000
    # Workers given a small replay buffer (buffer_small_steps batches).
    small_buffer_workers: tuple[str, ...] = ()
    buffer_small_steps: int = 4
    upstream_retries: int = 2
    epp_retries: int = 2
    # The chart turns the replicas' in-flight sync on when replicas > 1.
    sync: bool = True
    # One routing in this many carries its block keys for the peers' agreement check; the
    # chart's default is 32, every routing here so that agreement is measured within seconds
    # at the steady load's 8 req/s.
    agreement_sample_every: int = 1
    # Merged into kvsched's configuration file (e.g. scheduler.flow_control).
    kvsched: dict[str, Any] = field(default_factory=dict)


class Child:
    """One process of the stack: first stdout line = its addresses, then command/answer lines."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, *, announces: bool = True) -> Any:
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=1 << 26,
            )
        self.starts += 1
        if not announces:
            return None
        return await self._read_line(START_TIMEOUT_S, "start")

    async def _read_line(self, timeout_s: float, what: str) -> Any:
        assert self.process is not None and self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"{self.name} did not answer {what} (exit code {self.process.returncode})")
        return json.loads(line)

    async def ask(self, command: dict[str, Any], timeout_s: float = ANSWER_TIMEOUT_S) -> Any:
        async with self._lock:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write(json.dumps(command).encode() + b"\n")
            await self.process.stdin.drain()
            answer = await self._read_line(timeout_s, command.get("op", "?"))
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(f"{self.name}: {command.get('op')}: {answer['error']}")
        return answer

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as a crash or an OOM kill."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def stop(self, timeout_s: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass
class WorkerProc:
    name: str
    child: Child
    options: dict[str, Any]
    descriptor: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.options['http_port']}"

    async def start(self) -> None:
        self.descriptor = await self.child.start()

    async def ask(self, command: dict[str, Any], timeout_s: float = ANSWER_TIMEOUT_S) -> Any:
        return await self.child.ask(command, timeout_s)


@dataclass
class KvschedProc:
    name: str
    child: Child
    ports: dict[str, int]
    ready_file: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    async def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        await self.child.start(announces=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        # `kvsched serve --ready-file` writes the file (atomically) once every port serves.
        while not self.ready_file.exists():
            if not self.child.running or loop.time() > deadline:
                raise RuntimeError(f"{self.name} did not start; its log: {self.child.log_path}")
            await asyncio.sleep(0.05)

    async def ask(self, command: dict[str, Any], timeout_s: float = ANSWER_TIMEOUT_S) -> Any:
        return await self.child.ask(command, timeout_s)


class ChaosStack:
    """Start with ``async with ChaosStack(config, workdir) as stack``; everything stops on exit."""

    def __init__(self, config: StackConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.workers: dict[str, WorkerProc] = {}
        self.kvsched: list[KvschedProc] = []
        self.envoy: EnvoyGateway | None = None
        self.config_path = workdir / "kvsched.json"
        self.model = ""
        self.tokenizer_dir = ""

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for index in range(self.config.workers):
            self.workers[f"sim-{index}"] = self._worker(f"sim-{index}")
        await asyncio.gather(*(worker.start() for worker in self.workers.values()))
        first = next(iter(self.workers.values())).descriptor
        self.model, self.tokenizer_dir = first["model"], first["tokenizer_dir"]
        self.write_kvsched_config(self.kvsched_config())
        for index in range(self.config.replicas):
            self.kvsched.append(self._kvsched(index))
        # Again, now that every replica's sync port is known: each file names its peers.
        self.write_kvsched_config(json.loads(self.config_path.read_text()))
        await asyncio.gather(*(replica.start() for replica in self.kvsched))
        self.envoy = EnvoyGateway(self.envoy_settings())
        await self.envoy.start()
        await self.wait_routable()

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        await asyncio.gather(*(replica.child.stop() for replica in self.kvsched))
        await asyncio.gather(*(worker.child.stop() for worker in self.workers.values()))

    async def __aenter__(self) -> ChaosStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _worker(self, name: str) -> WorkerProc:
        cfg = self.config
        options = {
            "name": name,
            "http_port": free_port(),
            "kv_port": free_port(),
            "replay_port": free_port(),
            "speed": cfg.speed,
            "max_model_len": cfg.max_model_len,
            "capacity_blocks": cfg.capacity_blocks,
            "max_num_seqs": cfg.max_num_seqs,
            "buffer_steps": cfg.buffer_small_steps if name in cfg.small_buffer_workers else cfg.buffer_steps,
        }
        child = Child(name, child_command("worker", options, PROCS_MODULE), self.workdir / f"{name}.log")
        return WorkerProc(name, child, options)

    def _kvsched(self, index: int) -> KvschedProc:
        name = f"kvsched-{index}"
        ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port(), "sync": free_port()}
        ready = self.workdir / f"{name}.ready"
        # One file per replica (ports differ); the shared settings come from kvsched_config.
        path = self.workdir / f"{name}.json"
        options = {"config": str(path), "ready_file": str(ready)}
        child = Child(name, child_command("kvsched", options, PROCS_MODULE), self.workdir / f"{name}.log")
        replica = KvschedProc(name, child, ports, ready)
        self._write_replica_config(replica, json.loads(self.config_path.read_text()))
        return replica

    # --- configuration -----------------------------------------------------------------

    def kvsched_config(self) -> dict[str, Any]:
        """kvsched's configuration as the chart would render it for this pool (ports apart)."""
        cfg = self.config
        config: dict[str, Any] = {
            "host": "127.0.0.1",
            "tls": {"mode": "plaintext"},
            "extproc": {"transport": cfg.transport, "destination_list": True},
            "tokenizer_dir": self.tokenizer_dir,
            "reload_interval_s": 0.5,
            "shutdown_grace_s": 2.0,
            "endpoints": [
                {
                    "address": worker.address,
                    "kv_events": worker.descriptor["kv_endpoint"],
                    "kv_replay": worker.descriptor["replay_endpoint"],
                }
                for worker in self.workers.values()
            ],
        }
        for key, value in cfg.kvsched.items():
            config[key] = value
        if cfg.sync and cfg.replicas > 1:
            scheduler = config["scheduler"] = dict(config.get("scheduler") or {})
            scheduler["sync"] = {
                "enabled": True,
                "agreement_sample_every": cfg.agreement_sample_every,
                **(scheduler.get("sync") or {}),
            }
        return config

    def write_kvsched_config(self, config: dict[str, Any]) -> None:
        """The shared settings; every replica's file follows (a live reload where it runs)."""
        self.config_path.write_text(json.dumps(config, indent=1))
        for replica in self.kvsched:
            self._write_replica_config(replica, config)

    def _write_replica_config(self, replica: KvschedProc, config: dict[str, Any]) -> None:
        mine = {
            **config,
            "grpc_port": replica.ports["grpc"],
            "health_port": replica.ports["health"],
            "metrics_port": replica.ports["metrics"],
            # Static peers: every other replica's sync port (the chart lists them from the
            # Service's EndpointSlices).
            "peer_sync": {
                "port": replica.ports["sync"],
                "replica": replica.name,
                "peers": [
                    f"tcp://127.0.0.1:{other.ports['sync']}" for other in self.kvsched if other is not replica
                ],
            },
        }
        path = Path(json.loads(replica.child.argv[-1])["config"])
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(mine, indent=1))
        partial.replace(path)

    def envoy_settings(self) -> EnvoySettings:
        first, *others = self.kvsched
        return EnvoySettings(
            "127.0.0.1",
            first.ports["grpc"],
            epp_health_port=first.ports["health"],
            more_epps=[EppReplica("127.0.0.1", r.ports["grpc"], r.ports["health"]) for r in others],
            fail_open=self.config.fail_open,
            observation=self.config.observation,
            pool=[worker.address for worker in self.workers.values()],
            destination_lb="override_host",
            upstream_retries=self.config.upstream_retries,
            epp_retries=self.config.epp_retries,
            access_log=True,
        )

    # --- views -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url

    def worker_by_address(self) -> dict[str, str]:
        return {worker.address: name for name, worker in self.workers.items()}

    async def metrics(self, replica: KvschedProc) -> dict[str, float]:
        """kvsched's Prometheus page as ``{name{labels}: value}`` (samples, not families)."""
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession() as session,
            session.get(replica.metrics_url, timeout=timeout) as resp,
        ):
            text = await resp.text()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return samples

    async def wait_routable(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every replica is ready (grpc health SERVING) and has scraped every worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for replica in self.kvsched:
            while True:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    samples = await self.metrics(replica)
                    healthy = [v for k, v in samples.items() if k.startswith("kvsched_endpoint_healthy{")]
                    if len(healthy) == len(self.workers) and all(healthy):
                        break
                if loop.time() > deadline:
                    raise RuntimeError(f"{replica.name} never saw every worker healthy")
                await asyncio.sleep(0.1)

    async def serving(self, replica: KvschedProc, timeout_s: float = 1.0) -> bool:
        """Whether the replica's gRPC health says SERVING for the service Envoy checks."""
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.ports['health']}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), timeout=timeout_s
                )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def status(self, replica: KvschedProc) -> dict[str, Any]:
        """The replica's ``/debug/status``."""
        url = f"http://127.0.0.1:{replica.ports['metrics']}/debug/status"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            document: dict[str, Any] = await resp.json()
        return document

    async def epp_hosts(self) -> dict[str, dict[str, Any]]:
        """Envoy's view of each kvsched replica (admin ``/clusters``): streams sent to it
        (``rq_total``), and its health flags."""
        assert self.envoy is not None
        url = f"{self.envoy.admin_url}/clusters?format=json"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            document = await resp.json(content_type=None)
        ports = {replica.ports["grpc"]: replica.name for replica in self.kvsched}
        hosts: dict[str, dict[str, Any]] = {}
        for cluster in document.get("cluster_statuses", []):
            if cluster.get("name") != "ext_proc":
                continue
            for host in cluster.get("host_statuses", []):
                port = host["address"]["socket_address"]["port_value"]
                stats = {stat["name"]: int(stat.get("value", 0)) for stat in host.get("stats", [])}
                hosts[ports.get(port, str(port))] = {
                    "rq_total": stats.get("rq_total", 0),
                    "health": host.get("health_status", {}),
                }
        return hosts

    def tracebacks(self) -> dict[str, int]:
        """Python tracebacks in each kvsched replica's log so far."""
        counts = {}
        for replica in self.kvsched:
            text = (
                replica.child.log_path.read_text(errors="replace") if replica.child.log_path.exists() else ""
            )
            counts[replica.name] = text.count("Traceback (most recent call last)")
        return counts


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kvsched-chaos-"))


def kvsched_pids(stack: ChaosStack) -> Sequence[int]:
    return [replica.child.pid for replica in stack.kvsched if replica.child.running]
