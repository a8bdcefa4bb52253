"""grpc.health.v1 on its own plaintext port (GIE: 9003).

Services: ``liveness`` (SERVING while the process serves), ``readiness``, the ext_proc service name
and ``""`` (SERVING once the scheduler can route, i.e. the ``ready`` callable says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]
from grpc_health.v1.health import aio as health_aio  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PICKER_SERVICE = "kvsched.v1.EndpointPicker"
READINESS_SERVICES = (READINESS, EXT_PROC_SERVICE, PICKER_SERVICE, "")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ReadinessHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """The reference servicer, with readiness re-evaluated at each Check and periodically."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready
        self._ready_now: bool | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, refresh_s: float) -> None:
        await self.set(LIVENESS, SERVING)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_every(refresh_s))

    async def refresh(self) -> None:
        try:
            ready = bool(self._ready())
        except Exception:
            log.exception("readiness check failed; reporting NOT_SERVING")
            ready = False
        if ready == self._ready_now:
            return
        self._ready_now = ready
        status = SERVING if ready else NOT_SERVING
        for service in READINESS_SERVICES:
            await self.set(service, status)

    async def _refresh_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self.refresh()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.refresh()
        return await super().Check(request, context)

    async def shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self.enter_graceful_shutdown()
