"""A local HTTP server speaking the slice of the Kubernetes API protocol that kvsched uses.

Why not a real API server: no kube-apiserver or etcd binary exists on these machines, and
envtest-style downloads are not possible. What kvsched depends on is the wire protocol, so
this server implements that protocol faithfully and nothing else:

- namespaced collections at ``/api/v1/namespaces/{ns}/{plural}`` and
  ``/apis/{group}/{version}/namespaces/{ns}/{plural}``; a resource type that is not installed
  answers 404, as when its CRD is missing;
- LIST with ``metadata.resourceVersion``, ``limit``/``continue`` pagination and equality label
  selectors;
- WATCH (``watch=1``) from a ``resourceVersion``: a chunked HTTP/1.1 body of newline-delimited
  JSON events (ADDED / MODIFIED / DELETED with the object at its new resourceVersion, BOOKMARK
  with only ``metadata.resourceVersion`` when ``allowWatchBookmarks=true``), ended cleanly after
  ``timeoutSeconds``; a resourceVersion older than the compacted history is answered
  ``410 Gone``, either as the HTTP status or as an ERROR event carrying a ``Status`` with code
  410 (the API server does both, depending on whether the watch cache serves the request);
- PATCH of the ``status`` subresource with a JSON merge patch (RFC 7386), which changes only
  ``status`` and does not bump ``metadata.generation``; a ``metadata.resourceVersion`` in the
  patch is a precondition (409 Conflict when the object has changed since);
- POST of objects (core/v1 Events), with ``metadata.generateName``.

What it leaves out, and what tests must therefore not rely on: authentication, RBAC,
admission, schema validation and CRD defaulting, server-side apply, strategic merge, field
selectors, and consistent pagination snapshots (a continued list reads the current state).
resourceVersions are one integer counter here; clients must treat them as opaque strings.

Tests drive it from their own thread: ``create``/``replace``/``delete`` make changes,
``bookmark()`` sends a BOOKMARK to every watch that allows them, ``compact()`` forgets
history, ``drop_watches()`` cuts every stream mid-body, ``pause_watches()``/``resume_watches()``
refuse new watches with 503 meanwhile, and ``wait_for`` waits on server-side state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ResourceKey = tuple[str, str, str]  # (group, version, plural); group "" is the core group


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    content_type: str = ""
    body: Any = None


@dataclass
class _Event:
    version: int
    resource: ResourceKey
    namespace: str
    type: str
    obj: dict[str, Any]


@dataclass
class _Stream:
    resource: ResourceKey
    namespace: str
    bookmarks: bool
    dropped: bool = False
    # Set by ``expire_watches``: the stream then ends with a 410 ERROR event.
    expired: bool = False
    bookmark_generation: int = 0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeAPIServer:
    def __init__(self, gone_as: str = "event") -> None:
        if gone_as not in ("event", "status"):
            raise ValueError("gone_as is 'event' or 'status'")
        self.gone_as = gone_as
        self._cond = threading.Condition()
        self._version = 1000
        self._compacted = 0
        self._kinds: dict[ResourceKey, str] = {}
        self._objects: dict[ResourceKey, dict[tuple[str, str], dict[str, Any]]] = {}
        self._log: list[_Event] = []
        self._streams: list[_Stream] = []
        self._bookmark_generation = 0
        self._paused = False
        self._stopping = False
        self.requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeKubeAPIServer:
        fake = self

        class Handler(_Handler):
            server_state = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fake kube-apiserver", daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for stream in self._streams:
                stream.dropped = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeKubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state, for tests ----------------------------------------------------------------

    def install(self, group: str, version: str, plural: str, kind: str) -> None:
        with self._cond:
            key = (group, version, plural)
            self._kinds[key] = kind
            self._objects.setdefault(key, {})

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._version)

    def get(self, resource: ResourceKey, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._objects.get(resource, {}).get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _api_version(self, resource: ResourceKey) -> str:
        group, version, _ = resource
        return f"{group}/{version}" if group else version

    def _record(self, resource: ResourceKey, namespace: str, kind: str, obj: dict[str, Any]) -> None:
        """Called with the lock held."""
        self._log.append(_Event(self._version, resource, namespace, kind, copy.deepcopy(obj)))
        self._cond.notify_all()

    def create(self, resource: ResourceKey, obj: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            return self._create(resource, copy.deepcopy(obj))

    def _create(self, resource: ResourceKey, obj: dict[str, Any]) -> dict[str, Any]:
        if resource not in self._kinds:
            raise KeyError(f"{resource} is not installed")
        metadata = obj.setdefault("metadata", {})
        namespace = metadata.setdefault("namespace", "default")
        if not metadata.get("name"):
            prefix = metadata.get("generateName")
            if not prefix:
                raise ValueError("metadata.name or metadata.generateName is required")
            metadata["name"] = prefix + uuid.uuid4().hex[:5]
        if (namespace, metadata["name"]) in self._objects[resource]:
            raise FileExistsError(f"{namespace}/{metadata['name']} exists")
        self._version += 1
        obj["apiVersion"] = self._api_version(resource)
        obj["kind"] = self._kinds[resource]
        metadata.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._version),
            generation=1,
            creationTimestamp=metadata.get("creationTimestamp") or _now(),
        )
        self._objects[resource][(namespace, metadata["name"])] = obj
        self._record(resource, namespace, "ADDED", obj)
        return copy.deepcopy(obj)

    def replace(self, resource: ResourceKey, obj: dict[str, Any]) -> dict[str, Any]:
        """An update of the whole object; a changed spec bumps metadata.generation."""
        with self._cond:
            obj = copy.deepcopy(obj)
            metadata = obj["metadata"]
            namespace = metadata.setdefault("namespace", "default")
            current = self._objects[resource][(namespace, metadata["name"])]
            self._version += 1
            generation = current["metadata"]["generation"]
            if obj.get("spec") != current.get("spec"):
                generation += 1
            obj["apiVersion"] = current["apiVersion"]
            obj["kind"] = current["kind"]
            metadata.update(
                uid=current["metadata"]["uid"],
                creationTimestamp=current["metadata"]["creationTimestamp"],
                resourceVersion=str(self._version),
                generation=generation,
            )
            if "status" not in obj and "status" in current:
                obj["status"] = current["status"]
            self._objects[resource][(namespace, metadata["name"])] = obj
            self._record(resource, namespace, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, resource: ResourceKey, namespace: str, name: str) -> None:
        with self._cond:
            obj = self._objects[resource].pop((namespace, name))
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._record(resource, namespace, "DELETED", obj)

    def patch_status(self, resource: ResourceKey, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        with self._cond:
            return self._patch_status(resource, namespace, name, patch)

    def _patch_status(self, resource: ResourceKey, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        current = self._objects[resource][(namespace, name)]
        patched = merge_patch(current, {"status": patch.get("status")} if isinstance(patch, dict) else {})
        self._version += 1
        patched["metadata"]["resourceVersion"] = str(self._version)
        self._objects[resource][(namespace, name)] = patched
        self._record(resource, namespace, "MODIFIED", patched)
        return copy.deepcopy(patched)

    def objects(self, resource: ResourceKey, namespace: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects.get(resource, {}).items())
                if namespace is None or ns == namespace
            ]

    # --- protocol events, for tests ------------------------------------------------------

    def bookmark(self) -> str:
        """Every bookmark-allowing watch gets a BOOKMARK at the current resourceVersion."""
        with self._cond:
            self._bookmark_generation += 1
            self._cond.notify_all()
            return str(self._version)

    def touch(self) -> str:
        """Advance the resourceVersion, as a write to an object no watch here follows does."""
        with self._cond:
            self._version += 1
            return str(self._version)

    def compact(self) -> None:
        """Forget all history: a watch from any older resourceVersion gets 410 Gone."""
        with self._cond:
            self._compacted = self._version
            self._log = [event for event in self._log if event.version > self._compacted]

    def expire_watches(self) -> None:
        """Open watches end with an ERROR event of code 410, as when the watch cache falls behind."""
        with self._cond:
            for stream in self._streams:
                stream.expired = True
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch mid-body (no terminating chunk), as a dying connection does."""
        with self._cond:
            for stream in self._streams:
                stream.dropped = True
            self._cond.notify_all()

    def pause_watches(self) -> None:
        """Drop open watches and answer new ones 503 until ``resume_watches``."""
        with self._cond:
            self._paused = True
            for stream in self._streams:
                stream.dropped = True
            self._cond.notify_all()

    def resume_watches(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def open_watches(self, plural: str | None = None) -> int:
        with self._cond:
            return sum(1 for s in self._streams if not s.dropped and plural in (None, s.resource[2]))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` (evaluated under the server's lock after every change)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("condition not reached")
                self._cond.wait(remaining)

    def requests_to(self, method: str, path_part: str) -> list[RecordedRequest]:
        with self._cond:
            return [r for r in self.requests if r.method == method and path_part in r.path]

    # --- request handling (called from handler threads) ---------------------------------

    def _route(self, path: str) -> tuple[ResourceKey, str, str | None, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 4 and parts[0] == "api" and parts[2] == "namespaces":
            group, version, rest = "", parts[1], parts[3:]
        elif len(parts) >= 5 and parts[0] == "apis" and parts[3] == "namespaces":
            group, version, rest = parts[1], parts[2], parts[4:]
        else:
            return None
        if len(rest) < 2 or len(rest) > 4:
            return None
        namespace, plural = rest[0], rest[1]
        name = rest[2] if len(rest) > 2 else None
        sub = rest[3] if len(rest) > 3 else None
        return (group, version, plural), namespace, name, sub

    def handle(self, handler: _Handler, method: str) -> None:
        url = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        content_type = handler.headers.get("Content-Type", "")
        body = None
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            body = json.loads(handler.rfile.read(length))
        with self._cond:
            self.requests.append(RecordedRequest(method, url.path, query, content_type, body))
            self._cond.notify_all()
        route = self._route(url.path)
        if route is None or route[0] not in self._kinds:
            handler.send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        resource, namespace, name, sub = route
        if method == "GET" and name is None:
            if query.get("watch") in ("1", "true"):
                self._watch(handler, resource, namespace, query)
            else:
                self._list(handler, resource, namespace, query)
            return
        with self._cond:
            if method == "GET" and name is not None and sub is None:
                obj = self._objects[resource].get((namespace, name))
                if obj is None:
                    handler.send_json(404, _status(404, "NotFound", f"{name} not found"))
                else:
                    handler.send_json(200, obj)
                return
            if method == "PATCH" and name is not None and sub == "status":
                if content_type.split(";")[0].strip() != "application/merge-patch+json":
                    handler.send_json(415, _status(415, "UnsupportedMediaType", content_type))
                    return
                current = self._objects[resource].get((namespace, name))
                if current is None:
                    handler.send_json(404, _status(404, "NotFound", f"{name} not found"))
                    return
                # A resourceVersion in the patch is a precondition (optimistic concurrency).
                wanted = ((body or {}).get("metadata") or {}).get("resourceVersion")
                if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                    message = f"the object has been modified; resourceVersion {wanted} is not current"
                    handler.send_json(409, _status(409, "Conflict", message))
                    return
                handler.send_json(200, self._patch_status(resource, namespace, name, body))
                return
            if method == "POST" and name is None:
                obj = dict(body or {})
                obj.setdefault("metadata", {})["namespace"] = namespace
                try:
                    created = self._create(resource, obj)
                except FileExistsError as exc:
                    handler.send_json(409, _status(409, "AlreadyExists", str(exc)))
                    return
                except ValueError as exc:
                    handler.send_json(422, _status(422, "Invalid", str(exc)))
                    return
                handler.send_json(201, created)
                return
        handler.send_json(405, _status(405, "MethodNotAllowed", f"{method} {url.path}"))

    def _matches(self, obj: dict[str, Any], selector: str) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for term in filter(None, (t.strip() for t in selector.split(","))):
            key, sep, value = term.partition("=")
            if sep and labels.get(key.strip()) != value.strip().lstrip("="):
                return False
            if not sep and key not in labels:
                return False
        return True

    def _list(self, handler: _Handler, resource: ResourceKey, namespace: str, query: dict[str, str]) -> None:
        with self._cond:
            items = [
                obj
                for (ns, _), obj in sorted(self._objects[resource].items())
                if ns == namespace and self._matches(obj, query.get("labelSelector", ""))
            ]
            version = str(self._version)
            kind = self._kinds[resource]
        start = 0
        if query.get("continue"):
            token_version, _, offset = query["continue"].partition(":")
            if int(token_version) < self._compacted:
                handler.send_json(410, _status(410, "Expired", "the continue token has expired"))
                return
            start = int(offset)
        limit = int(query.get("limit") or 0)
        page = items[start : start + limit] if limit else items[start:]
        metadata: dict[str, Any] = {"resourceVersion": version}
        if limit and start + limit < len(items):
            metadata["continue"] = f"{version}:{start + limit}"
            metadata["remainingItemCount"] = len(items) - start - limit
        handler.send_json(
            200,
            {
                "kind": f"{kind}List",
                "apiVersion": self._api_version(resource),
                "metadata": metadata,
                "items": page,
            },
        )

    def _watch(self, handler: _Handler, resource: ResourceKey, namespace: str, query: dict[str, str]) -> None:
        version_text = query.get("resourceVersion", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._paused or self._stopping:
                handler.send_json(503, _status(503, "ServiceUnavailable", "watches paused"))
                return
            too_old = version_text not in ("", "0") and int(version_text) < self._compacted
            if too_old and self.gone_as == "status":
                message = f"too old resource version: {version_text} ({self._compacted})"
                handler.send_json(410, _status(410, "Expired", message))
                return
            stream = _Stream(
                resource,
                namespace,
                query.get("allowWatchBookmarks") == "true",
                bookmark_generation=self._bookmark_generation,
            )
            self._streams.append(stream)
            pending: list[dict[str, Any]] = []
            if too_old:
                pending.append(
                    {
                        "type": "ERROR",
                        "object": _status(
                            410, "Expired", f"too old resource version: {version_text} ({self._compacted})"
                        ),
                    }
                )
                position = len(self._log)
            elif version_text in ("", "0"):
                # No version: the current state as synthetic ADDED events, then changes.
                pending.extend(
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (ns, _), obj in sorted(self._objects[resource].items())
                    if ns == namespace
                )
                position = len(self._log)
            else:
                since = int(version_text)
                position = next((i for i, e in enumerate(self._log) if e.version > since), len(self._log))
        handler.start_chunked(200)
        try:
            for event in pending:
                handler.send_chunk(event)
            if pending and pending[0]["type"] == "ERROR":
                handler.end_chunked()
                return
            while True:
                with self._cond:
                    while True:
                        new = [
                            e
                            for e in self._log[position:]
                            if e.resource == resource and e.namespace == namespace
                        ]
                        position = len(self._log)
                        bookmark = (
                            stream.bookmarks and stream.bookmark_generation != self._bookmark_generation
                        )
                        stream.bookmark_generation = self._bookmark_generation
                        remaining = deadline - time.monotonic()
                        if new or bookmark or stream.dropped or stream.expired or remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    version_now = str(self._version)
                if stream.dropped:
                    handler.abort()
                    return
                for event in new:
                    handler.send_chunk({"type": event.type, "object": event.obj})
                if bookmark:
                    handler.send_chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": self._kinds[resource],
                                "apiVersion": self._api_version(resource),
                                "metadata": {"resourceVersion": version_now},
                            },
                        }
                    )
                if stream.expired:
                    handler.send_chunk(
                        {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                    )
                    handler.end_chunked()
                    return
                if remaining <= 0:
                    handler.end_chunked()
                    return
        except OSError:
            return  # the client went away
        finally:
            with self._cond:
                if stream in self._streams:
                    self._streams.remove(stream)
                self._cond.notify_all()

    def watch_requests(self, plural: str) -> Iterator[RecordedRequest]:
        with self._cond:
            requests = list(self.requests)
        return (
            r for r in requests if r.path.endswith(f"/{plural}") and r.query.get("watch") in ("1", "true")
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FakeKubeAPIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server_state.handle(self, "GET")

    def do_POST(self) -> None:
        self.server_state.handle(self, "POST")

    def do_PATCH(self) -> None:
        self.server_state.handle(self, "PATCH")

    def do_PUT(self) -> None:
        self.server_state.handle(self, "PUT")

    def do_DELETE(self) -> None:
        self.server_state.handle(self, "DELETE")

    def send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_chunked(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def abort(self) -> None:
        """Close the connection without ending the chunked body."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
