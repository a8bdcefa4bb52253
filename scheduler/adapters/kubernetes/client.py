"""The HTTP side of talking to a Kubernetes API server, on the official ``kubernetes`` client.

The client supplies what is hard to get right: loading in-cluster credentials (with the
projected service-account token re-read as it rotates) or a kubeconfig (contexts, client
certificates, exec plugins), and a urllib3 pool configured for the server's TLS. Requests go
through that pool by path, with the current bearer token from the client's configuration.
kvsched keeps the list/watch protocol itself (``reflector.py``) instead of using the
client's ``Watch`` helper, because it must see every protocol element: resourceVersion of
lists and events, BOOKMARK events, 410 Gone as an HTTP status or as an ERROR event.
Every call here blocks; callers run them in threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

# Several watches stay open at once (pools, pods, policies, objectives), each holding a
# connection, besides short list / patch / event requests.
POOL_MAXSIZE = 16
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True, slots=True)
class ResourceType:
    """A namespaced API resource: ``/api/v1/...`` for the core group, ``/apis/<g>/<v>/...`` else."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/namespaces/{quote(namespace, safe='')}/{self.plural}"

    def object_path(self, namespace: str, name: str, subresource: str = "") -> str:
        path = f"{self.collection_path(namespace)}/{quote(name, safe='')}"
        return f"{path}/{subresource}" if subresource else path

    def __str__(self) -> str:
        return f"{self.plural}.{self.group or 'core'}/{self.version}"


PODS = ResourceType("", "v1", "pods", "Pod")
EVENTS = ResourceType("", "v1", "events", "Event")


class KubeError(Exception):
    """A request the API server answered with an error status (or that never got an answer)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


def status_message(body: bytes) -> tuple[str, str]:
    """(reason, message) of a ``Status`` error body; the raw text when it is not one."""
    try:
        status = json.loads(body)
    except ValueError:
        return "", body.decode("utf-8", "replace")[:500]
    if not isinstance(status, dict):
        return "", str(status)[:500]
    return str(status.get("reason", "")), str(status.get("message", ""))[:500]


class KubeClient:
    """Blocking JSON requests to one API server, through the ``kubernetes`` client's pool."""

    def __init__(self, configuration: Any) -> None:
        from kubernetes.client import ApiClient

        if configuration.connection_pool_maxsize is None or configuration.connection_pool_maxsize < 16:
            configuration.connection_pool_maxsize = POOL_MAXSIZE
        self.configuration = configuration
        self._api_client: Any = ApiClient(configuration)
        self._pool: urllib3.PoolManager = self._api_client.rest_client.pool_manager
        self.host = str(configuration.host).rstrip("/")

    @classmethod
    def connect(
        cls,
        *,
        api_server: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool | None = None,
    ) -> KubeClient:
        """In-cluster credentials when running in a pod (or ``in_cluster``), else a kubeconfig
        (``kubeconfig``, $KUBECONFIG or ~/.kube/config); ``api_server`` overrides the host, and
        alone (no kubeconfig, ``in_cluster`` unset) means an unauthenticated server such as a
        test's."""
        import kubernetes.client
        import kubernetes.config

        # The loaders are untyped; Any keeps mypy --strict from flagging every call.
        kube_config: Any = kubernetes.config
        configuration = kubernetes.client.Configuration()
        if in_cluster is None:
            # An explicit server alone means no credentials, even inside a pod (a test's server).
            in_cluster = kubeconfig is None and api_server is None and "KUBERNETES_SERVICE_HOST" in os.environ
        if in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)
        elif kubeconfig is not None or api_server is None:
            kube_config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        if api_server is not None:
            configuration.host = api_server
        return cls(configuration)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "kvsched"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        # auth_settings() calls the configuration's refresh hook, so a rotated in-cluster
        # token is picked up here.
        for setting in self.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def url(self, path: str, query: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> str:
        encoded = urlencode(list(query.items()) if isinstance(query, Mapping) else list(query))
        return f"{self.host}{path}" + (f"?{encoded}" if encoded else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> Any:
        """One request with a JSON body (or none); the decoded JSON answer. Errors -> KubeError."""
        data = None if body is None else json.dumps(body).encode()
        try:
            response = self._pool.request(
                method,
                self.url(path, query or {}),
                body=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s),
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise KubeError(0, f"{method} {path}: {exc}") from exc
        if response.status >= 300:
            reason, message = status_message(response.data)
            raise KubeError(response.status, message or f"{method} {path}", reason)
        try:
            return json.loads(response.data) if response.data else None
        except ValueError as exc:
            raise KubeError(response.status, f"{method} {path}: answer is not JSON: {exc}") from exc

    def open_stream(self, path: str, query: Sequence[tuple[str, str]], read_timeout_s: float) -> Any:
        """A streaming GET (a watch): the urllib3 response, body unread. Errors -> KubeError."""
        try:
            response = self._pool.request(
                "GET",
                self.url(path, query),
                headers=self._headers(),
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout_s),
                preload_content=False,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise KubeError(0, f"watch {path}: {exc}") from exc
        if response.status != 200:
            body = response.read()
            response.release_conn()
            reason, message = status_message(body)
            raise KubeError(response.status, message or f"watch {path}", reason)
        return response

    def close(self) -> None:
        self._api_client.close()


def iter_lines(response: Any) -> Iterator[bytes]:
    """The newline-delimited JSON lines of a watch body, as they arrive (chunked or not)."""
    chunks: Iterator[bytes]
    if getattr(response, "chunked", False):
        chunks = response.read_chunked(decode_content=True)
    else:
        chunks = iter(lambda: bytes(response.read1(65536)), b"")
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    # A fragment without its newline is an event cut off by a dropped connection: the API
    # server ends every event with one.


def in_cluster_namespace() -> str | None:
    try:
        with open(IN_CLUSTER_NAMESPACE_FILE, encoding="utf-8") as file:
            return file.read().strip() or None
    except OSError:
        return None
