"""What kvsched believes, asked over HTTP on the metrics port (beside /metrics and /debug/status).

* ``POST /debug/lookup``: which leading blocks of a prompt every endpoint holds, per
  data-parallel rank and tier (``Scheduler.lookup``: nothing reserved, queued or learned).
  Body: ``{"model": ..., "prompt": "text" | [ids]}``, ``{"model": ..., "messages": [...]}``
  or ``{"model": ..., "prompt_token_ids": [...]}``; 400 with ``{"error": ...}`` when it
  names no usable prompt.
* ``GET /debug/kv-ingest``: every endpoint's KV-event view per rank (``PublisherView``):
  exact / degraded / fallback with the reason, the next sequence number, the replay in
  flight, buffered batches, the age of the last event and the ingest counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from scheduler.adapters.extproc.lookup import BadLookup, PromptLookup
from scheduler.core.kvingest import VIEW_STATES, PublisherView, ViewState
from scheduler.core.scheduler import Endpoint

log = logging.getLogger(__name__)

LOOKUP_PATH = "/debug/lookup"
KV_INGEST_PATH = "/debug/kv-ingest"


def debug_routes(lookup: PromptLookup, kv_ingest: Callable[[], dict[str, Any]]) -> list[web.RouteDef]:
    logged: set[str] = set()

    def failed(what: str, exc: Exception) -> web.Response:
        # Traceback once per kind of failure; the client gets the message every time.
        key = f"{what}:{type(exc).__name__}"
        if key not in logged:
            logged.add(key)
            log.error("%s failed", what, exc_info=exc)
        return web.json_response({"error": f"{what} failed: {type(exc).__name__}: {exc}"}, status=500)

    async def post_lookup(request: web.Request) -> web.Response:
        try:
            document = await lookup.lookup_json(await request.read())
        except BadLookup as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Exception as exc:
            return failed("lookup", exc)
        return web.json_response(document)

    async def get_kv_ingest(_: web.Request) -> web.Response:
        try:
            return web.json_response(kv_ingest())
        except Exception as exc:
            return failed("kv-ingest status", exc)

    return [web.post(LOOKUP_PATH, post_lookup), web.get(KV_INGEST_PATH, get_kv_ingest)]


def endpoint_state(views: Sequence[PublisherView]) -> ViewState:
    """An endpoint is as good as its worst rank (a pick scores its best rank's blocks, but a
    rank kvsched is wrong about attracts or repels requests all the same)."""
    states = {view.state for view in views}
    if not states or "fallback" in states:
        return "fallback"
    return "degraded" if "degraded" in states else "exact"


def kv_ingest_document(endpoints: Sequence[Endpoint], views: Sequence[PublisherView]) -> dict[str, Any]:
    by_endpoint: dict[str, list[PublisherView]] = {}
    for view in views:
        by_endpoint.setdefault(view.endpoint, []).append(view)
    listed = []
    summary = dict.fromkeys(VIEW_STATES, 0)
    for endpoint in sorted(endpoints, key=lambda e: e.name):
        ranks = by_endpoint.get(endpoint.name, [])
        state = endpoint_state(ranks)
        summary[state] += 1
        listed.append(
            {
                "name": endpoint.name,
                "address": endpoint.address,
                "kv_events": endpoint.kv_events,
                "kv_replay": endpoint.kv_replay,
                "state": state,
                "publishers": [view.as_dict() for view in ranks],
            }
        )
    return {"endpoints_by_state": summary, "endpoints": listed}
