"""``kvsched doctor`` end to end: the endpoints ``kvsched serve`` would use (its configuration's
static endpoints, or an InferencePool's Ready pods through the same Kubernetes discovery), the
tokenizer it would settle on (the same start-up probe), then every endpoint's checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import zmq.asyncio

from scheduler.adapters.kubernetes.client import KubeClient, in_cluster_namespace
from scheduler.adapters.kubernetes.pools import POOL_RESOURCES, InferencePoolSource
from scheduler.adapters.kubernetes.reflector import Backoff
from scheduler.adapters.tokenizer_probe import TokenizerService
from scheduler.core.scheduler import Endpoint
from scheduler.doctor.checks import DoctorSettings, EndpointProbe, cross_check, diagnose_endpoint, run_all
from scheduler.doctor.findings import Check, DoctorReport, EndpointReport, Status
from scheduler.server.app import tokenizer_service
from scheduler.server.config import ConfigError, ServeConfig

HTTP_TIMEOUT_S = 10.0
CONCURRENCY = 16


def doctor_settings(config: ServeConfig, *, wait_s: float = 3.0, attempts: int = 3) -> DoctorSettings:
    return DoctorSettings(
        index=config.scheduler.index,
        metrics=config.metrics_spec(),
        kv_events=config.kv_events.enabled,
        wait_s=wait_s,
        attempts=attempts,
    )


async def kubernetes_endpoints(config: ServeConfig, timeout_s: float) -> tuple[list[Endpoint], list[str]]:
    """The pools' endpoints as ``kvsched serve`` discovers them, and the pools' problems."""
    settings = config.discovery.kubernetes
    namespace = config.kubernetes_namespace(os.environ) or in_cluster_namespace()
    if namespace is None:
        raise ConfigError("discovery.kubernetes.namespace is not set and cannot be inferred")
    try:
        client = KubeClient.connect(
            api_server=settings.api_server,
            kubeconfig=settings.kubeconfig,
            context=settings.context,
            in_cluster=settings.in_cluster,
        )
    except Exception as exc:  # the kubernetes client's ConfigException, a missing file, ...
        raise ConfigError(f"discovery.kubernetes: no usable API server credentials: {exc}") from exc
    source = InferencePoolSource(
        client,
        namespace,
        config.kubernetes_pools(),
        config.endpoint_defaults(),
        pool_resource=POOL_RESOURCES[config.pool_api_version()],
        backoff=Backoff(initial_s=settings.backoff_initial_s, max_s=settings.backoff_max_s),
    )
    source.start()
    try:
        updates = source.updates()
        try:
            endpoints = await asyncio.wait_for(anext(updates), timeout_s)
        except TimeoutError:
            raise ConfigError(
                f"the API server did not list the pools and pods of namespace {namespace} "
                f"within {timeout_s:g} s"
            ) from None
        found = {pool.name for pool in source.pools()}
        missing = [
            f"InferencePool {namespace}/{name} ({source.pool_resource.api_version}) not found"
            for name in source.pool_names
            if name not in found
        ]
        if not config.kv_events.enabled:
            endpoints = [
                Endpoint(name=e.name, address=e.address, metrics_url=e.metrics_url, labels=e.labels)
                for e in endpoints
            ]
        return endpoints, missing
    finally:
        await source.stop()
        await asyncio.to_thread(client.close)


async def _check_tokenizer(service: TokenizerService, report: EndpointReport) -> None:
    await service.on_endpoints()
    probe = service.probe
    in_use = service.tokenizer.description
    if probe.status == "match":
        report.add(Check.TOKENIZER, Status.OK, f"{in_use}: {probe.detail}")
    elif probe.status == "mismatch":
        report.add(
            Check.TOKENIZER,
            Status.FAIL,
            probe.detail,
            "set tokenizer_dir to the model's tokenizer files (tokenizer.json, tokenizer_config.json), or "
            "tokenizer_mode: worker_render",
        )
    elif probe.status == "skipped":
        report.add(Check.TOKENIZER, Status.OK, f"{in_use}: {probe.detail}")
    else:
        report.add(
            Check.TOKENIZER,
            Status.WARN,
            f"{in_use}: could not compare with the pool ({probe.detail})",
            "the pods' /tokenize answers the comparison; without it, watch kvsched_tokenization_mismatch",
        )


async def diagnose(
    config: ServeConfig,
    *,
    endpoints: list[Endpoint] | None = None,
    source: str = "the configuration",
    wait_s: float = 3.0,
    attempts: int = 3,
    discovery_timeout_s: float = 15.0,
    context: zmq.asyncio.Context | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> DoctorReport:
    """Everything ``kvsched doctor`` checks for this configuration."""
    problems: list[str] = []
    if endpoints is None:
        if config.discovery.type == "kubernetes":
            pools = ", ".join(config.kubernetes_pools())
            source = f"InferencePool(s) {pools}"
            endpoints, problems = await kubernetes_endpoints(config, discovery_timeout_s)
        else:
            endpoints = config.static_endpoints()
    settings = doctor_settings(config, wait_s=wait_s, attempts=attempts)
    index = settings.index
    report = DoctorReport(
        source=source,
        settings={
            "block size": index.block_size,
            "hash mode": index.hash_mode
            + (f" (seed {index.vllm_hash_seed!r})" if index.hash_mode == "vllm" else ""),
            "KV events": "on" if config.kv_events.enabled else "off (approximate mode)",
            "tokenizer mode": config.tokenizer_mode,
        },
    )
    for problem in problems:
        report.pool.add(
            Check.ENDPOINTS, Status.FAIL, problem, "create the pool, or name it in discovery.kubernetes.pools"
        )
    if not endpoints:
        report.pool.add(
            Check.ENDPOINTS,
            Status.FAIL,
            "no endpoints to check",
            "give --endpoint flags or endpoints in the configuration, or check the pool's selector and that "
            "its pods are Ready with an IP",
        )
        return report
    report.endpoints = [EndpointReport(e.name, e.address) for e in endpoints]
    reports = {r.name: r for r in report.endpoints}
    service = tokenizer_service(config, lambda: [e.address for e in endpoints])
    try:
        await _check_tokenizer(service, report.pool)
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            def task(endpoint: Endpoint) -> Callable[[], Awaitable[EndpointProbe]]:
                return lambda: diagnose_endpoint(
                    session,
                    endpoint,
                    settings,
                    reports[endpoint.name],
                    tokenizer=service.tokenizer,
                    context=context,
                    wall_clock=wall_clock,
                )

            probes = await run_all([task(endpoint) for endpoint in endpoints], CONCURRENCY)
        cross_check(probes, reports)
    finally:
        with contextlib.suppress(Exception):
            await service.close()
    return report
