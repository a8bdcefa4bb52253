"""The Endpoint Picker gRPC server: ext_proc + kvsched.v1 on one port, health on another.

Two transports serve them (``ExtProcConfig.transport``): grpcio with the asyncio servicers
(servicer.py, health.py, picker_api.py), or gRPC C++ (native.py) where kvsched was built with
scheduler._native.extproc. Both drive the same PickRunner, counters and audit lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2_grpc  # type: ignore[import-untyped]

from scheduler.adapters.extproc.config import ExtProcConfig, TransportChoice
from scheduler.adapters.extproc.decide import PickRunner, SchedulerPort
from scheduler.adapters.extproc.health import ReadinessHealthServicer
from scheduler.adapters.extproc.native import NativeTransport, load_native, native_options
from scheduler.adapters.extproc.observed import Observations
from scheduler.adapters.extproc.picker_api import EndpointPickerServicer, load_picker_protos
from scheduler.adapters.extproc.servicer import ExternalProcessorServicer
from scheduler.adapters.extproc.stats import ExtProcStats
from scheduler.adapters.extproc.tls import ServerCredentials, TLSSettings
from scheduler.adapters.flow_gate import FlowGate
from scheduler.adapters.tokenizer import ByteTokenizer, PromptTokenizer
from scheduler.adapters.tracing import DecisionTracer
from scheduler.core.model_rewrite import ModelRewrites
from scheduler.core.scheduler import Scheduler

log = logging.getLogger(__name__)

Transport = Literal["native", "python"]


def resolve_transport(wanted: TransportChoice) -> Transport:
    """The transport ``wanted`` means on this install ('auto': native when it was built)."""
    if wanted == "python":
        return "python"
    if load_native() is not None:
        return "native"
    if wanted == "native":
        raise RuntimeError(
            "extproc.transport is 'native' but this kvsched was built without "
            "scheduler._native.extproc (install libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev "
            "libsimdjson-dev pkg-config and reinstall)"
        )
    return "python"


class ExtProcServer:
    """Serves ``envoy.service.ext_proc.v3.ExternalProcessor`` and ``kvsched.v1.EndpointPicker``
    on ``host:port`` (TLS per ``tls``) and ``grpc.health.v1.Health`` in plaintext on
    ``health_host:health_port``. Port 0 binds an ephemeral port; read ``port``/``health_port``
    after ``start()``. All handlers run on the event loop that called ``start()``, so the
    Scheduler is only ever touched from that loop.
    """

    def __init__(
        self,
        scheduler: SchedulerPort,
        *,
        host: str = "0.0.0.0",
        port: int = 9002,
        tls: TLSSettings | None = None,
        health_host: str | None = None,
        health_port: int | None = 9003,
        config: ExtProcConfig | None = None,
        tokenizer: PromptTokenizer | None = None,
        ready: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics_registry: Any | None = None,
        flow_gate: FlowGate | None = None,
        tracer: DecisionTracer | None = None,
        model_rewrites: ModelRewrites | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config or ExtProcConfig()
        self.tls = tls if tls is not None else TLSSettings()
        self.stats = ExtProcStats(metrics_registry)
        self._host = host
        self._requested_port = port
        self._health_host = health_host or host
        self._requested_health_port = health_port
        self._tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self._ready = ready if ready is not None else (lambda: bool(scheduler.endpoints()))
        if flow_gate is None and isinstance(scheduler, Scheduler):
            # The Scheduler's own waiting room, on the clock every other call uses.
            flow_gate = FlowGate(
                scheduler.flow, scheduler.saturation, scheduler.saturation_states, clock=clock
            )
        self.flow_gate = flow_gate
        if tracer is not None and isinstance(scheduler, Scheduler):
            # The pick's own stages (lookup, score, predict) become spans too.
            scheduler.stage_clock = time.time_ns
        seed = scheduler.config.seed if isinstance(scheduler, Scheduler) else 0
        self.runner = PickRunner(
            scheduler,
            self.config,
            self._tokenizer,
            clock,
            self.stats,
            flow_gate,
            tracer,
            model_rewrites,
            seed,
        )
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health: ReadinessHealthServicer | None = None
        self._picker: EndpointPickerServicer | None = None
        self._credentials: ServerCredentials | None = None
        self._native: NativeTransport | None = None
        peer_load = getattr(scheduler, "peer_load", None)
        # Routed requests whose response phase is observed on another stream; ids name this
        # replica as peer sync does (start_sync names it before the first request).
        self.observations = Observations(
            self.stats,
            replica=lambda: str(getattr(peer_load, "replica", "") or ""),
            bounds=scheduler.config.sync if isinstance(scheduler, Scheduler) else None,
        )
        self._expiry: asyncio.Task[None] | None = None
        self.transport: Transport = resolve_transport(self.config.transport)
        self.port: int | None = None
        self.health_port: int | None = None

    @property
    def certificate_pem(self) -> bytes | None:
        """The serving certificate (PEM) clients should trust; None in plaintext mode."""
        return self._credentials.certificate_pem if self._credentials is not None else None

    async def start(self) -> None:
        if self._server is not None or self._native is not None:
            raise RuntimeError("server already started")
        protos = load_picker_protos()
        if protos is None:
            log.warning(
                "scheduler._proto is missing (package built without proto/): "
                "kvsched.v1.EndpointPicker is not served, ext_proc is"
            )
        else:
            self._picker = EndpointPickerServicer(
                self.runner, self.stats, self.config.picker_api_max_pending, protos[0]
            )
        self._credentials = ServerCredentials(self.tls)
        if self.transport == "native":
            await self._start_native(protos)
        else:
            await self._start_python(protos)
        self._expiry = asyncio.create_task(self._expire_unobserved())
        log.info(
            "endpoint picker serving ext_proc%s on %s:%d (%s, %s transport), health on %s",
            "" if self._picker is None else " and kvsched.v1",
            self._host,
            self.port,
            self.tls.mode,
            self.transport,
            "off" if self.health_port is None else f"{self._health_host}:{self.health_port}",
        )

    async def _start_native(self, protos: tuple[Any, Any] | None) -> None:
        assert self._credentials is not None
        options = native_options(
            self.config,
            self._credentials,
            host=self._host,
            port=self._requested_port,
            health_host=self._health_host,
            health_port=self._requested_health_port,
        )
        if self.runner.model_rewrites is not None:
            # A rewritten model needs the body's bytes in Python: it sends a new body on.
            options["parse_bodies"] = False
        native = NativeTransport(
            load_native(),
            self.runner,
            self.config,
            self.stats,
            options,
            ready=self._ready,
            picker=self._picker,
            picker_pb2=None if protos is None else protos[0],
            observations=self.observations,
        )
        await native.start()
        self._native = native
        self.port, self.health_port = native.port, native.health_port

    async def _start_python(self, protos: tuple[Any, Any] | None) -> None:
        assert self._credentials is not None
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(self.runner, self.config, self.stats, self.observations), server
        )
        if protos is not None and self._picker is not None:
            protos[1].add_EndpointPickerServicer_to_server(self._picker, server)
        address = f"{self._host}:{self._requested_port}"
        if self._credentials.credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self._credentials.credentials)
        if not bound:
            raise OSError(f"cannot bind the Endpoint Picker gRPC port {address}")
        await server.start()
        self._server = server
        self.port = bound
        if self._requested_health_port is not None:
            await self._start_health()

    async def _start_health(self) -> None:
        health = ReadinessHealthServicer(self._ready)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = f"{self._health_host}:{self._requested_health_port}"
        bound = server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot bind the health port {address}")
        await server.start()
        await health.start(self.config.health_refresh_s)
        self._health_server, self._health, self.health_port = server, health, bound

    async def refresh_readiness(self) -> None:
        """Readiness changed (``ready`` says otherwise now): health answers follow at once
        instead of at the next ``health_refresh_s``."""
        if self._native is not None:
            self._native.refresh_readiness()
        if self._health is not None:
            await self._health.refresh()

    async def _expire_unobserved(self) -> None:
        # Each decision expires what is due first; this covers a replica with no new requests,
        # whose phantom in-flight load would otherwise stay in its metrics and sync snapshots.
        while True:
            await asyncio.sleep(1.0)
            self.observations.expire(self.runner.clock())

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let streams in flight finish for ``grace`` seconds, then close."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
            self._expiry = None
        if self._health is not None:
            await self._health.shutdown()
        if self.flow_gate is not None:
            # Waiting requests get an explained 503 now rather than a reset stream later.
            self.flow_gate.close()
        if self._native is not None:
            await self._native.stop(grace)
            self._native = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._picker is not None:
            await self._picker.release_all()
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None
            self._health = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
