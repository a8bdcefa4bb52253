"""``kvsched bench peers``: kvsched and the peers' routers on the same pool, side by side.

For each workload and load, every router gets a fresh simulated pool (``kvsched sim`` in its
own process: empty caches) and the same text requests on the same arrival schedule
(``peer_workloads.py``), sent by kvsched's replay client (streamed ``/v1/completions``).
What each row reports, and where it comes from:

* requests answered and failed, at the client;
* TTFT p50/p99 at the client (first content chunk);
* the worker's own TTFT for each request (the simulated workers report it beside the usage:
  HTTP arrival to first token), and the data path: client TTFT minus worker TTFT, request by
  request, which is what the router and the hops around it cost;
* the hit ratio from the workers' own counters: the run's increase of
  ``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries``, summed over the workers;
* requests per worker (``vllm:request_success``), to show how evenly load was spread;
* router CPU seconds over the run, from /proc, of the router's processes and their
  descendants (for kvsched: ``kvsched serve`` and Envoy).

The floor row is computed, not run (``peer_workloads.floor``): no queueing and one infinite
cache shared by the pool. The goal (``judge``): kvsched's TTFT p50 at most the best peer's and
its p99 at most 0.9x the best peer's, where the peers are sglang-router and vllm-router.

A load is how busy the pool is: load L replays the workload at its own rate (times
``rate``) on simulated GPUs L times slower (``peer_names.py`` says why, and how
``NEAR_SATURATION`` was chosen). ``DEFAULT_LOADS``: 1 (moderate) and ``NEAR_SATURATION``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from scheduler.bench.epp_bench import cpu_seconds
from scheduler.bench.peer_names import (
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_LOADS,
    DEFAULT_WORKERS,
    DEFAULT_WORKLOAD,
    FLOOR_ROUTER,
)
from scheduler.bench.peer_routers import ROUTERS, Pool, RouterSpec, simulated_pool, tree_cpu_seconds
from scheduler.bench.peer_workloads import (
    at_rate,
    floor,
    load_workload,
    offered_rate,
    prompt_stats,
)
from scheduler.replay.live import replay_live
from scheduler.replay.text import ClientTokenizer
from scheduler.sim.engine import EngineConfig
from scheduler.sim.tokenizer import MODEL_DIR
from scheduler.workloads.model import RequestOutcome, Workload

log = logging.getLogger(__name__)

PEER_GOAL_P99_RATIO = 0.9
_HITS, _QUERIES, _SUCCESS = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:request_success"
_VERSIONED = {"sglang": "sglang-router", "vllm": "vllm-router"}


# --- measuring one run --------------------------------------------------------------------------


async def worker_counters(session: aiohttp.ClientSession, pool: Pool) -> dict[str, dict[str, float]]:
    """Each worker's prefix-cache and request counters, from its own ``/metrics``."""
    counters: dict[str, dict[str, float]] = {}
    for worker in pool.workers:
        async with session.get(f"{worker['http_url']}/metrics") as response:
            page = await response.text()
        values = {_HITS: 0.0, _QUERIES: 0.0, _SUCCESS: 0.0}
        for family in text_string_to_metric_families(page):
            if family.name in values:
                values[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        counters[str(worker["name"])] = values
    return counters


def _percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    array = np.asarray(values_ms)
    return {
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "mean": float(array.mean()),
    }


def session_affinity(
    outcomes: Sequence[RequestOutcome], sessions: dict[str, str], labels: dict[str, str]
) -> float | None:
    """Share of a session's requests (a tenant's, a conversation's, an agent's) served by the
    worker that served most of them, over all requests of sessions: 1 = every session stayed
    on one worker. None for workloads without sessions."""
    served: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        session = sessions.get(outcome.request_id)
        if session is not None and outcome.ok and outcome.endpoint is not None:
            served.setdefault(session, Counter())[labels.get(outcome.endpoint, outcome.endpoint)] += 1
    total = sum(sum(c.values()) for c in served.values())
    return sum(max(c.values()) for c in served.values()) / total if total else None


def summarize(
    outcomes: Sequence[RequestOutcome],
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    cpu_s: dict[str, float],
    wall_s: float,
) -> dict[str, Any]:
    """One row of the table from a run's outcomes and the workers' counters around it."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s * 1e3 for o in ok if o.ttft_s is not None]
    reported = [o for o in ok if o.ttft_s is not None and o.worker_ttft_s is not None]
    worker = [(o.worker_ttft_s or 0.0) * 1e3 for o in reported]
    engine = [o.engine_ttft_s * 1e3 for o in reported if o.engine_ttft_s is not None]
    path = [((o.ttft_s or 0.0) - (o.worker_ttft_s or 0.0)) * 1e3 for o in reported]
    delta = {
        name: {key: after[name][key] - before.get(name, {}).get(key, 0.0) for key in after[name]}
        for name in after
    }
    hits = sum(d[_HITS] for d in delta.values())
    queries = sum(d[_QUERIES] for d in delta.values())
    usage_prompt = sum(o.prompt_tokens for o in ok if o.cached_tokens is not None)
    usage_cached = sum(o.cached_tokens or 0 for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": dict(Counter(o.error.split(":")[0] for o in outcomes if not o.ok)),
        "ttft_ms": _percentiles(ttft),
        "worker_ttft_ms": _percentiles(worker),
        "engine_ttft_ms": _percentiles(engine),
        "data_path_ms": _percentiles(path),
        "worker_ttft_reported": len(reported),
        "hit_ratio": hits / queries if queries else None,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        # The same ratio from the responses' usage: a cross-check of the counters.
        "usage_hit_ratio": usage_cached / usage_prompt if usage_prompt else None,
        "requests_per_worker": {name: d[_SUCCESS] for name, d in sorted(delta.items())},
        "cpu_s": cpu_s,
        "router_cpu_s": sum(cpu_s.values()),
        "wall_s": wall_s,
    }


async def run_router(
    spec: RouterSpec,
    workload: Workload,
    *,
    workers: int,
    capacity_blocks: int,
    max_model_len: int,
    speed: float,
    workdir: Path,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """One router in front of a fresh pool, the workload replayed through it."""
    begun = time.perf_counter()
    async with (
        simulated_pool(
            workdir,
            workers=workers,
            capacity_blocks=capacity_blocks,
            max_model_len=max_model_len,
            speed=speed,
        ) as pool,
        spec.start(pool, workdir, extra_args) as router,
        aiohttp.ClientSession() as session,
    ):
        log.debug("%s: pool and router up in %.1fs", spec.name, time.perf_counter() - begun)
        before = await worker_counters(session, pool)
        # The pool's and the client's CPU too: a busy pool or client inflates every figure.
        # (The client's alone: the other processes are its descendants.)
        watched = {**router.pids, **{f"pool-{i}": pid for i, pid in enumerate(pool.pids)}}
        cpu_before = {**tree_cpu_seconds(watched), "client": cpu_seconds(os.getpid())}
        started = time.perf_counter()
        outcomes = await replay_live(workload, router.url, model=pool.model, route=router.route)
        wall = time.perf_counter() - started
        cpu_after = {**tree_cpu_seconds(watched), "client": cpu_seconds(os.getpid())}
        after = await worker_counters(session, pool)
        diagnostics = await router.diagnostics() if router.diagnostics is not None else None
        command, labels = router.command, pool.labels
        stopping = time.perf_counter()
    log.debug("%s: replay %.1fs, stop %.1fs", spec.name, wall, time.perf_counter() - stopping)
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    pool_cpu = sum(cpu.pop(name) for name in list(cpu) if name.startswith("pool-"))
    client_cpu = cpu.pop("client")
    row = summarize(outcomes, before, after, cpu, wall)
    row["pool_cpu_s"], row["client_cpu_s"] = pool_cpu, client_cpu
    sessions = {r.request_id: r.session_id for r in workload.requests if r.session_id is not None}
    row["session_affinity"] = session_affinity(outcomes, sessions, labels)
    row.update(router=spec.name, description=spec.description, command=command)
    if spec.name in _VERSIONED:
        row["version"] = importlib.metadata.version(_VERSIONED[spec.name])
    if diagnostics is not None:
        row["router_status"] = diagnostics
    return row


# --- the comparison -------------------------------------------------------------------------------


def judge(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kvsched against the best peer on one workload and load: p50 <= best p50, p99 <= 0.9x best p99."""
    peers = [name for name, spec in ROUTERS.items() if spec.is_peer and name in rows]
    kvsched = rows.get("kvsched")
    if kvsched is None or not peers:
        return {"judged": False, "why": "needs kvsched and at least one peer router"}
    if "error" in kvsched or any("error" in rows[p] for p in peers):
        return {"judged": False, "why": "a router did not run to the end (see its error)"}
    if kvsched["failed"] or any(rows[p]["failed"] for p in peers):
        return {"judged": False, "why": "a router lost requests; latency percentiles are not comparable"}
    best_p50 = min(rows[p]["ttft_ms"]["p50"] for p in peers)
    best_p99 = min(rows[p]["ttft_ms"]["p99"] for p in peers)
    p50, p99 = kvsched["ttft_ms"]["p50"], kvsched["ttft_ms"]["p99"]
    return {
        "judged": True,
        "peers": peers,
        "p50_vs_best_peer": p50 / best_p50,
        "p99_vs_best_peer": p99 / best_p99,
        "p50_met": p50 <= best_p50,
        "p99_met": p99 <= PEER_GOAL_P99_RATIO * best_p99,
    }


def data_path_vs_floor(rows: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """kvsched's data path (client TTFT minus the worker's) over the protocol-only ext_proc's
    behind the same Envoy (the ``envoy-floor`` row), at p50 and p99; None without both rows
    run to the end."""
    kvsched, floor_row = rows.get("kvsched"), rows.get(FLOOR_ROUTER)
    if kvsched is None or floor_row is None or "error" in kvsched or "error" in floor_row:
        return None
    mine, floor_path = kvsched["data_path_ms"], floor_row["data_path_ms"]
    if not all(mine.get(q) and floor_path.get(q) for q in ("p50", "p99")):
        return None
    return {q: mine[q] / floor_path[q] for q in ("p50", "p99")}


def max_model_len_for(workload: Workload) -> int:
    """Room for the workload's longest prompt and answer (the workers refuse longer ones)."""
    longest = max((len(r.prompt_token_ids) + r.max_tokens for r in workload.requests), default=0)
    return max(8192, longest + 16)


async def compare(
    workload: Workload,
    routers: Sequence[str],
    *,
    workers: int,
    capacity_blocks: int,
    load: float,
    workdir: Path,
    router_args: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every router on ``workload`` at ``load``, one after another, each on a fresh pool."""
    max_model_len = max_model_len_for(workload)
    speed = 1.0 / load
    rows: dict[str, dict[str, Any]] = {}
    for name in routers:
        log.info(
            "%s x%g: %s, %d requests at %.1f req/s",
            workload.name,
            load,
            name,
            len(workload.requests),
            offered_rate(workload),
        )
        # A directory per run: its logs, and files like kvsched's ready file, start empty.
        rundir = workdir / f"{workload.name}-x{load:g}-{name}"
        rundir.mkdir(parents=True, exist_ok=False)
        try:
            rows[name] = await run_router(
                ROUTERS[name],
                workload,
                workers=workers,
                capacity_blocks=capacity_blocks,
                max_model_len=max_model_len,
                speed=speed,
                workdir=rundir,
                extra_args=(router_args or {}).get(name, ()),
            )
        except (RuntimeError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            # One router failing to start or run leaves the others' rows standing.
            log.error("%s: %s", name, exc)
            rows[name] = {"router": name, "error": f"{type(exc).__name__}: {exc}"}
    engine = EngineConfig(capacity_blocks=capacity_blocks, max_model_len=max_model_len)
    return {
        "workload": workload.name,
        "load": load,
        "engine_speed": speed,
        "workers": workers,
        "capacity_blocks": capacity_blocks,
        "requests": len(workload.requests),
        "offered_rps": offered_rate(workload),
        "prompts": prompt_stats(workload),
        "rows": rows,
        "floor": floor(workload, engine, speed),
        "goal": judge(rows),
        "data_path_vs_floor": data_path_vs_floor(rows),
    }


def run(
    *,
    workloads: Sequence[str] = (DEFAULT_WORKLOAD,),
    loads: Sequence[float] = DEFAULT_LOADS,
    routers: Sequence[str] | None = None,
    workers: int = DEFAULT_WORKERS,
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
    requests: int | None = None,
    rate: float = 1.0,
    seed: int = 0,
    workdir: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    router_args: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The whole comparison: every workload at every load, every router; one JSON report.
    ``on_result`` sees each workload-and-load result as soon as it is complete."""
    from scheduler.bench.peer_routers import available_routers

    ready, missing = available_routers()
    chosen = [r for r in (routers or ready) if r in ready]
    skipped = {r: missing[r] for r in (routers or ROUTERS) if r in missing}
    tokenizer = ClientTokenizer(MODEL_DIR)
    results = []
    with tempfile.TemporaryDirectory(prefix="kvsched-peers-", dir=workdir) as scratch:
        for name in workloads:
            workload = at_rate(load_workload(name, tokenizer, seed=seed, requests=requests), rate)
            for load in loads:
                result = asyncio.run(
                    compare(
                        workload,
                        chosen,
                        workers=workers,
                        capacity_blocks=capacity_blocks,
                        load=load,
                        workdir=Path(scratch),
                        router_args=router_args,
                    )
                )
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return {
        "routers": chosen,
        "skipped": skipped,
        "workers": workers,
        "capacity_blocks": capacity_blocks,
        "seed": seed,
        "rate_factor": rate,
        "cores": os.cpu_count(),
        "results": results,
    }


# --- the table --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


_HEADER = (
    "| router | ok / failed | TTFT p50 | TTFT p99 | worker TTFT p50 | worker TTFT p99 | data path p50 "
    "| data path p99 | hit ratio | router CPU s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_result(result: dict[str, Any]) -> str:
    """One workload at one load: its table and the goal's verdict."""
    slower = "" if result["load"] == 1 else f" (simulated GPUs {result['load']:g}x slower)"
    lines = [
        f"{result['workload']}, load x{result['load']:g}{slower}: {result['requests']} requests at "
        f"{result['offered_rps']:.1f} req/s, {result['workers']} workers of "
        f"{result['capacity_blocks']:,} blocks (ms)\n",
        _HEADER,
    ]
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:200]} |")
            continue
        cells = [name, f"{row['ok']} / {row['failed']}"]
        for key in ("ttft_ms", "worker_ttft_ms", "data_path_ms"):
            cells += [_ms(row[key]["p50"]), _ms(row[key]["p99"])]
        cells += [_ratio(row["hit_ratio"]), f"{row['router_cpu_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    f = result["floor"]
    cells = ["floor (computed)", "-", _ms(f["ttft_ms"]["p50"]), _ms(f["ttft_ms"]["p99"]), *["-"] * 4]
    lines.append("| " + " | ".join([*cells, _ratio(f["hit_ratio"]), "-"]) + " |")
    goal = result["goal"]
    if goal["judged"]:
        lines.append(
            f"\nkvsched vs the best peer: TTFT p50 {goal['p50_vs_best_peer']:.2f}x "
            f"({'met' if goal['p50_met'] else 'NOT met'}: <= 1), p99 {goal['p99_vs_best_peer']:.2f}x "
            f"({'met' if goal['p99_met'] else 'NOT met'}: <= {PEER_GOAL_P99_RATIO})"
        )
    else:
        lines.append(f"\ngoal not judged: {goal['why']}")
    versus_floor = result.get("data_path_vs_floor")
    if versus_floor is not None:
        lines.append(
            f"kvsched's data path vs the protocol's own floor behind the same Envoy ({FLOOR_ROUTER}): "
            f"p50 {versus_floor['p50']:.2f}x, p99 {versus_floor['p99']:.2f}x"
        )
    return "\n".join(lines)


def format_skipped(report: dict[str, Any]) -> str:
    return "\n".join(f"skipped {name}: {why}" for name, why in report["skipped"].items())


def format_report(report: dict[str, Any]) -> str:
    """The tables ``kvsched bench peers`` prints: one per workload and load."""
    parts = [format_result(result) for result in report["results"]]
    return "\n\n".join([*parts, format_skipped(report)]).rstrip()
