"""SchedulingPolicy hot reload and InferenceObjective priorities, against the fake API server.

tests/fake_kube_apiserver.py stands in for a kube-apiserver (none exists on these machines;
its docstring says what it does and does not implement). The Scheduler here is built once and
never rebuilt: every change below reaches it while it keeps its endpoints, index and
in-flight requests. Waits are on conditions (the watcher's reconcile event, the server's
recorded state), with timeouts only as a safety net.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fake_kube_apiserver import FakeKubeAPIServer

from scheduler.adapters.kubernetes.client import KubeClient
from scheduler.adapters.kubernetes.objectives import InferenceObjectiveWatcher, objective_table
from scheduler.adapters.kubernetes.policy import (
    PolicyError,
    PolicySettings,
    SchedulerPolicyTarget,
    SchedulingPolicyWatcher,
    snake,
)
from scheduler.adapters.kubernetes.reflector import Backoff
from scheduler.core.events import BlockStored, EventBatch, Tier
from scheduler.core.objectives import ObjectiveTable
from scheduler.core.scheduler import (
    Endpoint,
    EndpointMetrics,
    Scheduler,
    SchedulerConfig,
    SchedulingRequest,
)

NS = "llm"
POLICIES = ("kvsched.io", "v1alpha1", "schedulingpolicies")
EVENTS = ("", "v1", "events")
OBJECTIVES_LLMD = ("llm-d.ai", "v1alpha2", "inferenceobjectives")
OBJECTIVES_X_K8S = ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives")
FAST = Backoff(initial_s=0.01, max_s=0.05)
BLOCK = 16
PROMPT = list(range(1, 8 * BLOCK + 1))


def policy(
    name: str, spec: dict[str, Any], *, pool: str = "llama", created: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS}
    if created is not None:
        metadata["creationTimestamp"] = created
    return {"metadata": metadata, "spec": {"poolRef": {"name": pool}, **spec}}


def accepted(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Accepted"), None)


def two_endpoint_scheduler() -> Scheduler:
    """A holds the prompt's prefix but has a queue; B is idle and cold. Default weights pick B
    (A's 5 waiting requests are estimated at 40 ms, recomputing the 130-token prompt on B at
    5 ms, counted twice); with prefixOverlap 3 the cached prefix wins and A is picked."""
    scheduler = Scheduler(SchedulerConfig())
    endpoints = [
        Endpoint(name=f"10.0.0.{i}:8000", address=f"10.0.0.{i}:8000", kv_events=f"tcp://10.0.0.{i}:5557")
        for i in (1, 2)
    ]
    scheduler.set_endpoints(endpoints, 0.0)
    scheduler.update_metrics(endpoints[0].name, EndpointMetrics(waiting=5, running=4, kv_usage=0.3), 0.0)
    scheduler.update_metrics(endpoints[1].name, EndpointMetrics(waiting=0, running=0, kv_usage=0.3), 0.0)
    stored = BlockStored(list(range(100, 108)), None, PROMPT, BLOCK, medium=Tier.GPU)
    scheduler.index.apply_batch(endpoints[0].name, EventBatch(0.0, [stored]))
    return scheduler


def primary(scheduler: Scheduler, request_id: str) -> str:
    """Where the policy sends the prompt now. The probe is then dropped (as a request that
    failed), so neither its load nor its speculative placement sways the next probe."""
    result = scheduler.pick(SchedulingRequest(request_id, [*PROMPT, 7, 7]), now=0.5)
    assert result.status == "ok"
    scheduler.on_failed(request_id, now=0.5)
    return result.endpoints[0]


@pytest.fixture
def server() -> Iterator[FakeKubeAPIServer]:
    with FakeKubeAPIServer() as fake:
        fake.install(*POLICIES, "SchedulingPolicy")
        fake.install(*EVENTS, "Event")
        fake.install(*OBJECTIVES_LLMD, "InferenceObjective")
        fake.install(*OBJECTIVES_X_K8S, "InferenceObjective")
        yield fake


class Harness:
    def __init__(
        self, server: FakeKubeAPIServer, scheduler: Scheduler, pools: tuple[str, ...] = ("llama",)
    ) -> None:
        self.server = server
        self.scheduler = scheduler
        self.watcher = SchedulingPolicyWatcher(
            KubeClient.connect(api_server=server.url),
            NS,
            pools,
            SchedulerPolicyTarget(scheduler),
            backoff=FAST,
            instance="kvsched-test-0",
        )

    async def reconciled(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait for a reconcile after which ``predicate`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.watcher.reconciled.clear()
                await self.watcher.reconciled.wait()

    def condition(self, name: str) -> dict[str, Any] | None:
        return accepted(self.server.get(POLICIES, NS, name))

    async def wait_condition(self, name: str, status: str, generation: int) -> dict[str, Any]:
        def done() -> bool:
            # Called under the server's lock: read its store directly.
            obj = self.server._objects[POLICIES].get((NS, name))
            condition = accepted(obj)
            return (
                condition is not None
                and condition["status"] == status
                and condition["observedGeneration"] == generation
                and obj is not None
                and obj["status"]["observedGeneration"] == generation
            )

        # In a thread: the watcher that writes the status runs on this loop.
        await asyncio.to_thread(self.server.wait_for, done)
        condition = self.condition(name)
        assert condition is not None
        return condition

    def events_for(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.server.objects(EVENTS, NS) if e["involvedObject"]["name"] == name]


@pytest.fixture
async def harness(server: FakeKubeAPIServer) -> AsyncIterator[Harness]:
    h = Harness(server, two_endpoint_scheduler())
    yield h
    await h.watcher.stop()


async def test_policy_change_changes_picks_without_restart(
    server: FakeKubeAPIServer, harness: Harness
) -> None:
    scheduler = harness.scheduler
    assert primary(scheduler, "before") == "10.0.0.2:8000"
    server.create(POLICIES, policy("llama", {"scorerWeights": {"prefixOverlap": 3}}))
    harness.watcher.start()
    await harness.reconciled(lambda: harness.watcher.applied == ("llm/llama", 1))
    condition = await harness.wait_condition("llama", "True", 1)
    assert condition["reason"] == "Accepted"
    assert primary(scheduler, "r1") == "10.0.0.1:8000"

    # A request in flight across the change is still accounted for after it.
    in_flight = scheduler.pick(SchedulingRequest("long", PROMPT), now=0.6).endpoints[0]
    changed = policy("llama", {"scorerWeights": {"prefixOverlap": 0, "inflightLoad": 0}})
    server.replace(POLICIES, changed)
    await harness.reconciled(lambda: harness.watcher.applied == ("llm/llama", 2))
    assert scheduler.config.scoring.weights["prefix_overlap"] == 0
    assert primary(scheduler, "r2") == "10.0.0.2:8000"
    assert scheduler.inflight(in_flight)[0] >= 1
    assert scheduler.on_completed("long", now=1.0) is not None
    await harness.wait_condition("llama", "True", 2)
    # The index survived: restoring the weight brings the cached endpoint back.
    server.replace(POLICIES, policy("llama", {"scorerWeights": {"prefixOverlap": 3}}))
    await harness.reconciled(lambda: harness.watcher.applied == ("llm/llama", 3))
    assert primary(scheduler, "r3") == "10.0.0.1:8000"


async def test_invalid_policy_keeps_the_last_good_one(server: FakeKubeAPIServer, harness: Harness) -> None:
    scheduler = harness.scheduler
    server.create(POLICIES, policy("llama", {"picker": {"mode": "softmax", "temperature": 0.2}}))
    harness.watcher.start()
    await harness.reconciled(lambda: harness.watcher.applied == ("llm/llama", 1))
    good = scheduler.config
    assert (good.scoring.mode, good.scoring.temperature) == ("softmax", 0.2)
    await harness.wait_condition("llama", "True", 1)

    server.replace(POLICIES, policy("llama", {"picker": {"mode": "softmax", "temperature": 0}}))
    condition = await harness.wait_condition("llama", "False", 2)
    assert condition["reason"] == "InvalidSpec"
    assert "spec.picker.temperature" in condition["message"]
    assert "generation 1 stay in force" in condition["message"]
    assert scheduler.config is good
    assert harness.watcher.applied == ("llm/llama", 1)
    await asyncio.to_thread(
        server.wait_for, lambda: any(e["reason"] == "InvalidSpec" for e in server._objects[EVENTS].values())
    )
    (event,) = [e for e in harness.events_for("llama") if e["type"] == "Warning"]
    assert event["reason"] == "InvalidSpec"
    assert event["involvedObject"]["kind"] == "SchedulingPolicy"
    assert event["involvedObject"]["apiVersion"] == "kvsched.io/v1alpha1"
    assert event["involvedObject"]["uid"] == server.get(POLICIES, NS, "llama")["metadata"]["uid"]  # type: ignore[index]
    assert event["reportingInstance"] == "kvsched-test-0"
    assert event["metadata"]["name"].startswith("llama.")

    # A section this kvsched does not have is refused by name.
    server.replace(POLICIES, policy("llama", {"scorerWeights": {"sloUrgency": 2}}))
    condition = await harness.wait_condition("llama", "False", 3)
    assert "spec.scorerWeights.sloUrgency: no scorer named 'slo_urgency'" in condition["message"]

    # Fixed: applied, and Accepted again.
    server.replace(POLICIES, policy("llama", {"picker": {"mode": "maxScore"}}))
    await harness.wait_condition("llama", "True", 4)
    assert scheduler.config.scoring.mode == "max_score"


async def test_index_settings_must_match_the_running_index(
    server: FakeKubeAPIServer, harness: Harness
) -> None:
    server.create(
        POLICIES, policy("llama", {"kvEvents": {"blockSize": 64}, "scorerWeights": {"queueDepth": 9}})
    )
    harness.watcher.start()
    condition = await harness.wait_condition("llama", "False", 1)
    assert condition["reason"] == "IndexMismatch"
    assert "spec.kvEvents.blockSize: 64 differs from the running index (16)" in condition["message"]
    # Nothing of the policy applies: the configuration file's settings stay.
    assert harness.scheduler.config == SchedulerConfig()
    server.replace(
        POLICIES, policy("llama", {"kvEvents": {"blockSize": 16}, "scorerWeights": {"queueDepth": 9}})
    )
    await harness.wait_condition("llama", "True", 2)
    assert harness.scheduler.config.scoring.weights["queue_depth"] == 9


async def test_only_served_pools_and_one_policy_at_a_time(server: FakeKubeAPIServer) -> None:
    scheduler = two_endpoint_scheduler()
    harness = Harness(server, scheduler, pools=("llama", "mistral"))
    server.create(POLICIES, policy("other", {"scorerWeights": {"queueDepth": 7}}, pool="not-mine"))
    old_group = policy("legacy", {"scorerWeights": {"queueDepth": 6}})
    old_group["spec"]["poolRef"]["group"] = "inference.networking.x-k8s.io"
    server.create(POLICIES, old_group)
    server.create(POLICIES, policy("second", {"scorerWeights": {"queueDepth": 2}}, pool="mistral"))
    server.create(
        POLICIES, policy("newer", {"scorerWeights": {"queueDepth": 4}}, created="2026-01-02T00:00:00Z")
    )
    server.create(
        POLICIES, policy("older", {"scorerWeights": {"queueDepth": 3}}, created="2026-01-01T00:00:00Z")
    )
    harness.watcher.start()
    try:
        await harness.reconciled(lambda: harness.watcher.applied == ("llm/older", 1))
        assert scheduler.config.scoring.weights["queue_depth"] == 3
        await harness.wait_condition("older", "True", 1)
        for loser in ("newer", "second"):
            condition = await harness.wait_condition(loser, "False", 1)
            assert condition["reason"] == "Conflicted" and "llm/older" in condition["message"]
        # Policies of pools kvsched does not serve are another kvsched's business.
        assert "status" not in server.get(POLICIES, NS, "other")  # type: ignore[operator]
        assert "status" not in server.get(POLICIES, NS, "legacy")  # type: ignore[operator]

        # The winner goes: the next in line applies.
        server.delete(POLICIES, NS, "older")
        await harness.reconciled(lambda: harness.watcher.applied == ("llm/newer", 1))
        assert scheduler.config.scoring.weights["queue_depth"] == 4
        await harness.wait_condition("newer", "True", 1)
        server.delete(POLICIES, NS, "newer")
        await harness.reconciled(lambda: harness.watcher.applied == ("llm/second", 1))
        # No policy left for a served pool: back to the configuration file's settings.
        server.delete(POLICIES, NS, "second")
        await harness.reconciled(lambda: harness.watcher.applied is None)
        assert scheduler.config == SchedulerConfig()
    finally:
        await harness.watcher.stop()


async def test_status_is_written_once_and_keeps_other_conditions(
    server: FakeKubeAPIServer, harness: Harness
) -> None:
    obj = policy("llama", {})
    server.create(POLICIES, obj)
    other = {
        "type": "example.com/Custom",
        "status": "Unknown",
        "reason": "Pending",
        "message": "",
        "lastTransitionTime": "2026-01-05T10:00:00Z",
    }
    server.patch_status(POLICIES, NS, "llama", {"status": {"conditions": [other]}})
    harness.watcher.start()
    await harness.wait_condition("llama", "True", 1)
    status = server.get(POLICIES, NS, "llama")["status"]  # type: ignore[index]
    assert other in status["conditions"] and len(status["conditions"]) == 2
    patches = len(server.requests_to("PATCH", "/schedulingpolicies/llama/status"))
    assert patches == 1
    # A change that is not the spec (labels) brings a new object but no new verdict: no write.
    labelled = server.get(POLICIES, NS, "llama")
    assert labelled is not None
    labelled["metadata"]["labels"] = {"team": "ml"}
    server.replace(POLICIES, labelled)

    def relabelled() -> bool:
        seen = (harness.watcher._snapshot or {}).get("llm/llama") or {}
        return (seen.get("metadata") or {}).get("labels") == {"team": "ml"}

    await harness.reconciled(relabelled)
    assert len(server.requests_to("PATCH", "/schedulingpolicies/llama/status")) == patches
    assert [e["type"] for e in harness.events_for("llama")] == ["Normal"]


def test_conversion_names_and_units() -> None:
    assert snake("prefixOverlap") == "prefix_overlap"
    assert snake("maxKVUtilization") == "max_kv_utilization"
    settings = PolicySettings.from_spec(
        {
            "poolRef": {"name": "p"},
            "picker": {"mode": "softmax", "numFallbacks": 1},
            "limits": {"metricsStaleAfterSeconds": 5},
            "flowControl": {"maxWaitMs": 1500, "maxKVUtilization": 0.7},
            "approximate": {"ttlSeconds": 60},
            "health": {"failOpen": False, "scrapeTimeoutGraceSeconds": 2.5},
            "kvEvents": {"port": 6000, "replayPort": 0, "topic": "kv@{host}"},
            "scrapeIntervalMs": 250,
        }
    )
    config = settings.scheduler_config(SchedulerConfig())
    assert config.health.fail_open is False and config.health.scrape_timeout_grace_s == 2.5
    assert config.scoring.mode == "softmax" and config.scoring.num_fallbacks == 1
    assert config.scoring.limits.metrics_stale_after_s == 5
    assert config.flow_control.max_wait_s == 1.5 and config.flow_control.kv_cache_threshold == 0.7
    assert config.approximate.ttl_s == 60
    assert settings.scrape_interval_s == 0.25
    from scheduler.adapters.discovery import EndpointDefaults

    defaults = settings.endpoint_defaults(EndpointDefaults())
    assert (defaults.kv_port, defaults.replay_port, defaults.kv_topic) == (6000, None, "kv@{host}")
    with pytest.raises(PolicyError, match=r"spec\.kvEvents\.topic"):
        PolicySettings.from_spec({"kvEvents": {"topic": "kv@{pod}"}})
    with pytest.raises(PolicyError, match=r"spec\.predictor\.colour: not a setting"):
        PolicySettings.from_spec({"predictor": {"colour": "blue"}}).scheduler_config(SchedulerConfig())


# --- InferenceObjective -------------------------------------------------------------------------


def objective(name: str, priority: int | None, pool: str = "llama") -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": {"name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"metadata": {"name": name, "namespace": NS}, "spec": spec}


async def test_objectives_set_priorities(server: FakeKubeAPIServer) -> None:
    scheduler = Scheduler(SchedulerConfig())
    tables: asyncio.Queue[ObjectiveTable] = asyncio.Queue()

    def set_objectives(table: ObjectiveTable) -> None:
        scheduler.set_objectives(table)
        tables.put_nowait(table)

    server.create(OBJECTIVES_LLMD, objective("chat", 10))
    server.create(OBJECTIVES_LLMD, objective("batch", -1))
    server.create(OBJECTIVES_X_K8S, objective("chat", 99))  # the older group loses to llm-d.ai
    server.create(OBJECTIVES_X_K8S, objective("legacy", 5))
    server.create(OBJECTIVES_X_K8S, objective("default-priority", None))
    server.create(OBJECTIVES_LLMD, objective("elsewhere", 50, pool="not-mine"))
    watcher = InferenceObjectiveWatcher(
        KubeClient.connect(api_server=server.url), NS, ["llama"], set_objectives, backoff=FAST
    )
    watcher.start()

    async def table_where(predicate: Callable[[ObjectiveTable], bool]) -> ObjectiveTable:
        async with asyncio.timeout(10):
            while True:
                table = await tables.get()
                if predicate(table):
                    return table

    def priorities(table: ObjectiveTable) -> dict[str, int]:
        return {name: o.priority for name, o in table.objectives.items()}

    try:
        expected = {"chat": 10, "batch": -1, "legacy": 5, "default-priority": 0}
        await table_where(lambda t: priorities(t) == expected)
        resolved = scheduler.resolve_objective(SchedulingRequest("r", [1], objective="batch"))
        assert resolved.priority == -1 and resolved.sheddable and resolved.known
        assert not scheduler.resolve_objective(SchedulingRequest("r", [1], objective="elsewhere")).known
        assert scheduler.objectives.objectives["chat"].pool == "llm/llama"

        changed = copy.deepcopy(server.get(OBJECTIVES_LLMD, NS, "batch"))
        assert changed is not None
        changed["spec"]["priority"] = 2
        server.replace(OBJECTIVES_LLMD, changed)
        await table_where(lambda t: priorities(t).get("batch") == 2)
        server.delete(OBJECTIVES_LLMD, NS, "chat")
        # The older group's namesake takes over.
        await table_where(lambda t: priorities(t).get("chat") == 99)
        assert scheduler.resolve_objective(SchedulingRequest("r", [1], objective="chat")).priority == 99
    finally:
        await watcher.stop()


def test_objective_table_skips_unusable_objects() -> None:
    snapshot = {
        "llm/a": objective("a", 1),
        "llm/b": {
            "metadata": {"name": "b", "namespace": NS},
            "spec": {"poolRef": {"name": "llama"}, "priority": "high"},
        },
        "llm/c": {"metadata": {"name": "c", "namespace": NS}, "spec": {}},
    }
    table = objective_table([snapshot], ["llama"])
    assert list(table.objectives) == ["a"]
