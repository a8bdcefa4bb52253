"""SchedulingPolicy (``kvsched.io/v1alpha1``): the CRD's spec as kvsched settings, and its watch.

Conversion. The CRD speaks camelCase and groups settings for users; ``SchedulerConfig``
speaks snake_case. A few CRD names are mapped by ``CRD_RENAMES`` (``scorerWeights`` ->
``scoring.weights``, the picker's fields -> ``scoring``, ``limits`` -> ``scoring.limits``,
``flowControl.maxKVUtilization`` -> ``flow_control.kv_cache_threshold``, ...). Everything
else converts generically, field by field, against the SchedulerConfig model itself:
``fooBar`` -> ``foo_bar``, ``fooSeconds`` -> ``foo_s``, ``fooMs`` -> ``foo_ms`` or, when the
model counts seconds, ``foo_s`` (value / 1000), and enum values the same way (``maxScore``
-> ``max_score``). A section SchedulerConfig does not have (yet) therefore maps onto its
future field name; until then pydantic rejects it and the policy is refused, naming the CRD
path of every such field. Scorer weights are keyed by registered scorer name
(``NAME_KEYED``): a scorer added to the registry is weighted by a policy with no change here.

Application. A policy's settings are laid over the configuration file's ``scheduler`` section
and validated as one SchedulerConfig, then swapped into the running Scheduler in one step
(``Scheduler.reload`` on the event loop, between two picks: no restart, no request lost).
Settings the process cannot change live are equality checks: ``kvEvents.blockSize``,
``hashMode`` and ``hashSeed`` must match the running index, and a policy that disagrees is
refused (reason ``IndexMismatch``), which surfaces the "prefix scoring silently matches
nothing" setup mistake instead of hiding it. ``kvEvents.port``/``replayPort``/``topic`` become
the pools' KV-event defaults, ``scrapeIntervalMs`` the scrape period.

Status. kvsched writes condition ``Accepted`` through the status subresource (a JSON merge
patch carrying ``metadata.resourceVersion``, so a concurrent writer makes it fail with 409
rather than be overwritten), with ``observedGeneration``, and records a core/v1 Event when the
outcome changes. Replicas compute the same outcome, and a status that already says it is not
written again, so active-active replicas do not fight.

Which policy: only policies whose ``spec.poolRef`` names a pool this kvsched serves. One
scoring configuration runs per process, so when several qualify the first served pool (in
configured order) wins, then the oldest policy; the others are reported ``Conflicted``. An
invalid winner keeps the last good settings in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from scheduler.adapters.discovery import EndpointDefaults, check_topic_template
from scheduler.adapters.kubernetes.client import EVENTS, KubeClient, KubeError, ResourceType
from scheduler.adapters.kubernetes.reflector import Backoff, Reflector, Snapshot
from scheduler.core.index import IndexConfig
from scheduler.core.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

SCHEDULING_POLICY = ResourceType("kvsched.io", "v1alpha1", "schedulingpolicies", "SchedulingPolicy")
CONDITION_ACCEPTED = "Accepted"
DEFAULT_POOL_GROUP = "inference.networking.k8s.io"

Path = tuple[str, ...]

# CRD paths whose SchedulerConfig path is not their generic conversion; a section entry
# maps the section's own fields (converted generically) under the target.
CRD_RENAMES: dict[Path, Path] = {
    ("scorerWeights",): ("scoring", "weights"),
    ("tierWeights",): ("scoring", "tiers"),
    ("picker",): ("scoring",),
    ("limits",): ("scoring", "limits"),
    ("sessionAffinity",): ("scoring", "session_affinity"),
    ("flowControl", "maxQueueDepthPerEndpoint"): ("flow_control", "queue_depth_threshold"),
    ("flowControl", "maxKVUtilization"): ("flow_control", "kv_cache_threshold"),
    ("predictor", "retrainIntervalSeconds"): ("predictor", "retrain_every_s"),
    ("kvEvents", "blockSize"): ("index", "block_size"),
    ("kvEvents", "hashMode"): ("index", "hash_mode"),
    ("kvEvents", "hashSeed"): ("index", "vllm_hash_seed"),
}
# SchedulerConfig mappings keyed by names of kvsched's own plug-ins (snake_case, e.g. registered
# scorers): the CRD writes each key camelCase like a field (``prefixOverlap``) or as the name
# itself (``prefix_overlap``); both convert to the name, and the settings model validates it.
NAME_KEYED: frozenset[Path] = frozenset({("scoring", "weights"), ("disaggregation", "decode_weights")})
# Spec fields that are not SchedulerConfig settings (handled by PolicySettings itself).
SERVE_FIELDS: frozenset[Path] = frozenset(
    {
        ("poolRef",),
        ("kvEvents", "port"),
        ("kvEvents", "replayPort"),
        ("kvEvents", "topic"),
        ("scrapeIntervalMs",),
    }
)


class PolicyError(ValueError):
    """A policy kvsched refuses; ``reason`` is the condition's CamelCase reason."""

    def __init__(self, reason: str, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.reason = reason
        self.problems = list(problems)


def snake(name: str) -> str:
    """``prefixOverlap`` -> ``prefix_overlap``; ``maxKVUtilization`` -> ``max_kv_utilization``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def crd_path_text(path: Path) -> str:
    return ".".join(("spec", *path))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _model_at(path: Path) -> type[BaseModel] | None:
    model: type[BaseModel] | None = SchedulerConfig
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = _model_of(model.model_fields[part].annotation)
    return model


def _literal_values(model: type[BaseModel] | None, name: str) -> tuple[Any, ...]:
    if model is None or name not in model.model_fields:
        return ()
    annotation = model.model_fields[name].annotation
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _field_for(key: str, model: type[BaseModel] | None) -> tuple[str, float]:
    """The model's field for CRD key ``key`` and the factor its value is scaled by."""
    candidates: list[tuple[str, float]] = [(snake(key), 1.0)]
    if key.endswith("Seconds"):
        candidates.insert(0, (snake(key[: -len("Seconds")]) + "_s", 1.0))
    if key.endswith("Ms"):
        candidates.append((snake(key[:-2]) + "_s", 0.001))
    if model is not None:
        for name, factor in candidates:
            if name in model.model_fields:
                return name, factor
    return candidates[0]


def _convert(value: Any, crd: Path, target: Path, out: dict[str, Any], origin: dict[Path, Path]) -> None:
    """Convert the CRD value at ``crd`` (already mapped to ``target``) into ``out``."""
    model = _model_at(target)
    parent = _model_at(target[:-1])
    known = parent is not None and target[-1] in parent.model_fields
    if target in NAME_KEYED and isinstance(value, Mapping):
        for key, sub in value.items():
            _convert(sub, (*crd, str(key)), (*target, snake(str(key))), out, origin)
        return
    # Into sections: the model's own, and ones it lacks (each field is then reported by
    # name); a known field that is not a section (a mapping value) is taken whole.
    if isinstance(value, Mapping) and (model is not None or not known):
        for key, sub in value.items():
            sub_crd = (*crd, str(key))
            if sub_crd in SERVE_FIELDS:
                continue
            if sub_crd in CRD_RENAMES:
                sub_target = CRD_RENAMES[sub_crd]
                factor = 1.0
            else:
                name, factor = _field_for(str(key), model)
                sub_target = (*target, name)
            if factor != 1.0 and isinstance(sub, int | float) and not isinstance(sub, bool):
                sub = sub * factor
            _convert(sub, sub_crd, sub_target, out, origin)
        return
    allowed = _literal_values(parent, target[-1])
    if isinstance(value, str) and allowed and value not in allowed and snake(value) in allowed:
        value = snake(value)
    node = out
    for part in target[:-1]:
        node = node.setdefault(part, {})
    node[target[-1]] = value
    origin[target] = crd


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """What one SchedulingPolicy sets, in kvsched's terms."""

    scheduler: Mapping[str, Any]
    # SchedulerConfig path -> the CRD path it came from (for error messages).
    origin: Mapping[Path, Path] = field(default_factory=dict)
    kv_port: int | None = None
    # None: not set; 0: the pods run without replay.
    kv_replay_port: int | None = None
    kv_topic: str | None = None
    scrape_interval_s: float | None = None
    source: str = ""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], source: str = "") -> PolicySettings:
        if not isinstance(spec, Mapping):
            raise PolicyError("InvalidSpec", ["spec: not an object"])
        overlay: dict[str, Any] = {}
        origin: dict[Path, Path] = {}
        problems: list[str] = []
        for key, value in spec.items():
            crd: Path = (str(key),)
            if crd in SERVE_FIELDS or key == "kvEvents":
                continue
            if isinstance(value, Mapping) and not value:
                continue  # an empty section (the CRD's `default: {}`) sets nothing
            target = CRD_RENAMES.get(crd) or (_field_for(str(key), SchedulerConfig)[0],)
            _convert(value, crd, target, overlay, origin)
        kv = spec.get("kvEvents") or {}
        if not isinstance(kv, Mapping):
            raise PolicyError("InvalidSpec", ["spec.kvEvents: not an object"])
        for key in ("blockSize", "hashMode", "hashSeed"):
            if key in kv:
                value = kv[key]
                if key == "hashSeed" and value == "":
                    # The CRD's "empty means unset": vLLM's own default seed.
                    value = IndexConfig().vllm_hash_seed
                _convert(value, ("kvEvents", key), CRD_RENAMES[("kvEvents", key)], overlay, origin)
        topic = kv.get("topic")
        if topic is not None:
            try:
                check_topic_template(str(topic))
            except ValueError as exc:
                problems.append(f"spec.kvEvents.topic: {exc}")
        ports = {}
        for key in ("port", "replayPort"):
            value = kv.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536
            ):
                problems.append(f"spec.kvEvents.{key}: {value!r} is not a port")
            else:
                ports[key] = value
        if ports.get("port") == 0:
            problems.append("spec.kvEvents.port: 0 is not a port")
        interval_ms = spec.get("scrapeIntervalMs")
        if interval_ms is not None and (
            isinstance(interval_ms, bool) or not isinstance(interval_ms, int | float) or interval_ms <= 0
        ):
            problems.append(f"spec.scrapeIntervalMs: {interval_ms!r} is not a positive number")
            interval_ms = None
        if problems:
            raise PolicyError("InvalidSpec", problems)
        return cls(
            scheduler=overlay,
            origin=origin,
            kv_port=ports.get("port"),
            kv_replay_port=ports.get("replayPort"),
            kv_topic=None if topic is None else str(topic),
            scrape_interval_s=None if interval_ms is None else interval_ms / 1000,
            source=source,
        )

    def scheduler_config(self, base: SchedulerConfig) -> SchedulerConfig:
        """``base`` with this policy laid over it, validated; the index must stay as it is."""
        data = _deep_merge(base.model_dump(), self.scheduler)
        try:
            config = SchedulerConfig.model_validate(data)
        except ValidationError as exc:
            raise PolicyError("InvalidSpec", self._describe(exc)) from None
        if config.index != base.index:
            running = base.index
            problems = []
            for name in type(running).model_fields:
                wanted, actual = getattr(config.index, name), getattr(running, name)
                if wanted != actual:
                    where = crd_path_text(self.origin.get(("index", name), ("index", name)))
                    problems.append(
                        f"{where}: {wanted!r} differs from the running index ({actual!r}); the index "
                        f"layout is fixed for the process: restart kvsched with scheduler.index.{name} "
                        "set to match, or correct the policy"
                    )
            raise PolicyError("IndexMismatch", problems)
        return config

    def endpoint_defaults(self, base: EndpointDefaults) -> EndpointDefaults:
        changes: dict[str, Any] = {}
        if self.kv_port is not None:
            changes["kv_port"] = self.kv_port
        if self.kv_replay_port is not None:
            changes["replay_port"] = self.kv_replay_port or None
        if self.kv_topic is not None:
            changes["kv_topic"] = self.kv_topic
        return EndpointDefaults(**{**_defaults_dict(base), **changes})

    def _describe(self, error: ValidationError) -> list[str]:
        problems = []
        for item in error.errors():
            loc: Path = tuple(str(part) for part in item["loc"])
            sources = sorted(
                {crd for target, crd in self.origin.items() if target[: len(loc)] == loc}
                or {crd for target, crd in self.origin.items() if loc[: len(target)] == target}
            )
            where = ", ".join(crd_path_text(crd) for crd in sources) or ".".join(loc)
            if item["type"] == "extra_forbidden":
                problems.append(f"{where}: not a setting of this kvsched version")
            else:
                problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        return problems


def _defaults_dict(defaults: EndpointDefaults) -> dict[str, Any]:
    return {name: getattr(defaults, name) for name in EndpointDefaults.__dataclass_fields__}


def _deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = value
    return merged


class PolicyTarget(Protocol):
    """What applies a policy: all of it or, raising PolicyError, none of it."""

    async def apply_policy(self, settings: PolicySettings | None) -> None:
        """``None``: no policy applies any more (back to the configuration file)."""


class SchedulerPolicyTarget:
    """Applies policies straight to a Scheduler (its scheduler settings only)."""

    def __init__(self, scheduler: Any, base: SchedulerConfig | None = None) -> None:
        self.scheduler = scheduler
        self.base = base or scheduler.config

    async def apply_policy(self, settings: PolicySettings | None) -> None:
        config = self.base if settings is None else settings.scheduler_config(self.base)
        if config != self.scheduler.config:
            self.scheduler.reload(config)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Literal["True", "False"]
    reason: str
    message: str


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


def _generation(obj: Mapping[str, Any]) -> int:
    generation = (obj.get("metadata") or {}).get("generation")
    return generation if isinstance(generation, int) else 0


class SchedulingPolicyWatcher:
    """Watches SchedulingPolicies of one namespace and applies the one for the served pools."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pools: Sequence[str],
        target: PolicyTarget,
        *,
        pool_group: str = DEFAULT_POOL_GROUP,
        instance: str | None = None,
        backoff: Backoff | None = None,
        watch_timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.pools = tuple(pools)
        self.pool_group = pool_group
        self.target = target
        self.instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        options: dict[str, Any] = {"backoff": backoff}
        if watch_timeout_s is not None:
            options["watch_timeout_s"] = watch_timeout_s
        self.reflector = Reflector(client, SCHEDULING_POLICY, namespace, self._on_change, **options)
        self._snapshot: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        # (policy key, generation) of the settings in force; None: the configuration file's.
        self.applied: tuple[str, int] | None = None
        self.verdicts: dict[str, Verdict] = {}
        self.reconciled = asyncio.Event()
        self.status_writes = 0
        self.events_posted = 0

    def start(self) -> None:
        self.reflector.start()

    async def stop(self) -> None:
        await self.reflector.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_change(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reconcile_loop(), name="SchedulingPolicy reconcile")

    async def _reconcile_loop(self) -> None:
        while self._dirty:
            self._dirty = False
            snapshot = self._snapshot or {}
            try:
                await self.reconcile(snapshot)
            except Exception:
                log.exception("reconciling SchedulingPolicies failed")
            self.reconciled.set()

    def _pool_rank(self, policy: Mapping[str, Any]) -> int | None:
        ref = (policy.get("spec") or {}).get("poolRef") or {}
        if not isinstance(ref, Mapping):
            return None
        if ref.get("group", DEFAULT_POOL_GROUP) != self.pool_group:
            return None
        if ref.get("kind", "InferencePool") != "InferencePool":
            return None
        name = ref.get("name")
        return self.pools.index(name) if name in self.pools else None

    async def reconcile(self, snapshot: Snapshot) -> None:
        ranked = []
        for policy in snapshot.values():
            rank = self._pool_rank(policy)
            if rank is not None:
                created = str((policy.get("metadata") or {}).get("creationTimestamp", ""))
                ranked.append((rank, created, _key(policy), policy))
        ranked.sort(key=lambda entry: entry[:3])
        verdicts: dict[str, Verdict] = {}
        if not ranked:
            if self.applied is not None:
                await self.target.apply_policy(None)
                log.info("SchedulingPolicy %s gone; the configuration file's settings apply", self.applied[0])
                self.applied = None
        else:
            _, _, key, winner = ranked[0]
            verdicts[key] = await self._apply(key, winner)
            pool = (winner.get("spec") or {}).get("poolRef", {}).get("name")
            for _, _, other, _policy in ranked[1:]:
                verdicts[other] = Verdict(
                    "False",
                    "Conflicted",
                    f"kvsched applies SchedulingPolicy {key} (pool {pool}): it runs one policy at a "
                    "time; the first served pool's oldest policy wins",
                )
        self.verdicts = verdicts
        for _, _, key, policy in ranked:
            await self._report(policy, verdicts[key])

    async def _apply(self, key: str, policy: Mapping[str, Any]) -> Verdict:
        generation = _generation(policy)
        pool = (policy.get("spec") or {}).get("poolRef", {}).get("name")
        try:
            settings = PolicySettings.from_spec(policy.get("spec") or {}, source=key)
            if self.applied != (key, generation):
                await self.target.apply_policy(settings)
                log.info("SchedulingPolicy %s (generation %d) applied", key, generation)
                self.applied = (key, generation)
        except PolicyError as exc:
            kept = (
                f"the settings of {self.applied[0]} generation {self.applied[1]} stay in force"
                if self.applied is not None
                else "the configuration file's settings stay in force"
            )
            log.warning("SchedulingPolicy %s (generation %d) refused: %s; %s", key, generation, exc, kept)
            return Verdict("False", exc.reason, f"{exc}; {kept}")
        return Verdict("True", "Accepted", f"applied to InferencePool {self.namespace}/{pool}")

    async def _report(self, policy: Mapping[str, Any], verdict: Verdict) -> None:
        """Write the condition (and an Event) when the object does not already say it."""
        metadata = policy.get("metadata") or {}
        generation = _generation(policy)
        status = policy.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
        current = next((c for c in conditions if c.get("type") == CONDITION_ACCEPTED), None)
        if (
            current is not None
            and status.get("observedGeneration") == generation
            and current.get("observedGeneration") == generation
            and (current.get("status"), current.get("reason"), current.get("message"))
            == (verdict.status, verdict.reason, verdict.message)
        ):
            return
        transition = (
            current.get("lastTransitionTime")
            if current is not None
            and current.get("status") == verdict.status
            and current.get("lastTransitionTime")
            else _now()
        )
        condition = {
            "type": CONDITION_ACCEPTED,
            "status": verdict.status,
            "reason": verdict.reason,
            "message": verdict.message[:32768],
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
        others = [dict(c) for c in conditions if c.get("type") != CONDITION_ACCEPTED]
        patch = {
            # The resourceVersion makes the patch conditional: a concurrent writer's change is
            # not overwritten (409), and the next watch event brings a fresh object to retry on.
            "metadata": {"resourceVersion": metadata.get("resourceVersion")},
            "status": {"observedGeneration": generation, "conditions": [*others, condition]},
        }
        name = str(metadata.get("name"))
        path = SCHEDULING_POLICY.object_path(self.namespace, name, "status")
        try:
            await asyncio.to_thread(
                self.client.request, "PATCH", path, body=patch, content_type="application/merge-patch+json"
            )
        except KubeError as exc:
            if exc.status != 409:
                log.warning("SchedulingPolicy %s/%s: status not written: %s", self.namespace, name, exc)
            return
        self.status_writes += 1
        if current is None or (current.get("status"), current.get("reason"), current.get("message")) != (
            verdict.status,
            verdict.reason,
            verdict.message,
        ):
            await self._post_event(policy, verdict)

    async def _post_event(self, policy: Mapping[str, Any], verdict: Verdict) -> None:
        metadata = policy.get("metadata") or {}
        now = _now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata.get('name')}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": SCHEDULING_POLICY.api_version,
                "kind": SCHEDULING_POLICY.kind,
                "name": metadata.get("name"),
                "namespace": self.namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "reason": "Applied" if verdict.status == "True" else verdict.reason,
            "message": verdict.message[:1024],
            "type": "Normal" if verdict.status == "True" else "Warning",
            "source": {"component": "kvsched"},
            "reportingComponent": "kvsched.io/kvsched",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(
                self.client.request, "POST", EVENTS.collection_path(self.namespace), body=event
            )
        except KubeError as exc:
            log.warning("event for SchedulingPolicy %s not recorded: %s", metadata.get("name"), exc)
            return
        self.events_posted += 1
