"""The checks of one endpoint: reachable, metrics, KV events end to end, replay, clocks.

The KV-event check is end to end. A probe prompt that no pod has seen (a fresh nonce at its
start, so every block is new) is sent to the pod itself as token ids with ``max_tokens`` 1, and
the events that follow are captured on every topic. The pod's events, filtered by the topic
kvsched subscribes to, are then fed into a fresh ``PrefixIndex`` built from kvsched's own index
settings; the probe's blocks are either all found there (precise routing works) or not, and
then the capture says why: no events, another topic, another block size, events without token
ids, or block hashes of another algorithm or seed. For the last, the probe's blocks are hashed
the ways vLLM can hash them (``sha256_cbor`` and ``sha256``; the configured seed and vLLM's
default one) and compared with the BlockStored hashes: a match names the algorithm and seed the
pod uses.

Endpoints without KV events, and everything after a failed step, are reported, not guessed.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zmq.asyncio

from scheduler.adapters.kv_subscriber import with_port_offset
from scheduler.adapters.tokenizer import PromptTokenizer
from scheduler.adapters.tokenizer_probe import PROBE_TEXT
from scheduler.codec.prom import MetricsSpec, PromMetricsError, parse_endpoint_metrics
from scheduler.core import blockhash_ref
from scheduler.core.events import BlockStored, EventBatch
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.core.scheduler import Endpoint
from scheduler.doctor.findings import Check, EndpointReport, Status
from scheduler.doctor.kvwire import EventCapture, Message, ask_replay

# Blocks the probe prompt spans at least, at the largest block size in play: enough that a
# partial match (a lost first batch) is told apart from a full one.
PROBE_BLOCKS = 4


@dataclass(frozen=True, slots=True)
class DoctorSettings:
    """What kvsched would run with (from the serve configuration) and the diagnosis's limits."""

    index: IndexConfig
    metrics: MetricsSpec
    kv_events: bool = True
    wait_s: float = 3.0  # per step that waits on the pod (handshake, events after a probe, replay)
    attempts: int = 3  # probe requests before concluding that no events come
    max_clock_skew_s: float = 2.0


@dataclass(slots=True)
class HashScheme:
    algo: blockhash_ref.VllmHashAlgo
    seed: str
    block_size: int

    def describe(self) -> str:
        return f"{self.algo} with seed {self.seed!r} in blocks of {self.block_size}"


@dataclass(slots=True)
class Probe:
    """One probe prompt and what was recognised of it in the captured events."""

    ids: list[int]
    by_tokens: int = 0  # BlockStored events recognised by their token ids
    schemes: list[HashScheme] = field(default_factory=list)  # hash schemes its blocks matched

    @property
    def seen(self) -> bool:
        return bool(self.by_tokens or self.schemes)


@dataclass(slots=True)
class EndpointProbe:
    """What one endpoint's diagnosis kept for the pool-wide comparison."""

    endpoint: Endpoint
    probes: list[Probe] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- HTTP ----------------------------------------------------------------------------------


async def check_reachable(session: aiohttp.ClientSession, endpoint: Endpoint, report: EndpointReport) -> bool:
    url = f"http://{endpoint.address}/health"
    try:
        async with session.get(url) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.add(
            Check.REACHABLE,
            Status.FAIL,
            f"no answer from http://{endpoint.address} ({_describe(exc)})",
            "check the address and port (the pod's serving port, the pool's targetPorts), that the pod is "
            "Ready, and that no network policy blocks kvsched",
        )
        return False
    report.add(Check.REACHABLE, Status.OK, f"GET /health answered HTTP {status}")
    return True


async def _text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return await response.text()


def cache_config_labels(page: str, spec: MetricsSpec) -> dict[str, str] | None:
    """The labels of the page's cache-config info gauge (vLLM's ``vllm:cache_config_info``)."""
    from prometheus_client.parser import text_string_to_metric_families

    name = (spec.names.cache_info if spec.names is not None else None) or "vllm:cache_config_info"
    try:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == name:
                    return dict(sample.labels)
    except ValueError:
        return None
    return None


async def check_metrics(
    session: aiohttp.ClientSession, endpoint: Endpoint, spec: MetricsSpec, report: EndpointReport
) -> dict[str, str] | None:
    """The scraper's own parse of the page; returns the cache-config labels when there are some."""
    url = endpoint.metrics_url or f"http://{endpoint.address}/metrics"
    try:
        page = await _text(session, url)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        report.add(
            Check.METRICS,
            Status.FAIL,
            f"{url} did not answer ({_describe(exc)})",
            "serve Prometheus metrics there, or give the endpoint's metrics_url",
        )
        return None
    try:
        metrics = parse_endpoint_metrics(page, spec)
    except PromMetricsError as exc:
        engine = spec.engine if spec.names is None else "replaced by scrape_metric_names"
        report.add(
            Check.METRICS,
            Status.FAIL,
            f"{url}: {exc}; without them kvsched marks the endpoint unhealthy after a few scrapes",
            f"kvsched reads these names (scrape_engine: {engine}): export them, or set scrape_engine / "
            "scrape_metric_names to the names this server uses",
        )
        return None
    report.add(
        Check.METRICS,
        Status.OK,
        f"{url}: waiting {metrics.waiting}, running {metrics.running}, KV usage {metrics.kv_usage:.0%}",
    )
    labels = cache_config_labels(page, spec)
    if labels is None:
        report.add(Check.PREFIX_CACHING, Status.SKIP, "the page has no cache-config info gauge to read")
    elif labels.get("enable_prefix_caching", "True").lower() == "false":
        report.add(
            Check.PREFIX_CACHING,
            Status.FAIL,
            "prefix caching is off on the pod (enable_prefix_caching=False): it caches nothing to route to",
            "run vLLM with --enable-prefix-caching",
        )
    else:
        report.add(
            Check.PREFIX_CACHING,
            Status.OK,
            f"on, blocks of {labels.get('block_size', '?')} tokens, hash "
            f"{labels.get('prefix_caching_hash_algo', '?')}",
        )
    return labels


async def _model(session: aiohttp.ClientSession, address: str) -> str | None:
    try:
        async with session.get(f"http://{address}/v1/models") as response:
            answer = await response.json(content_type=None)
        return str(answer["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
        return None


async def probe_ids(
    session: aiohttp.ClientSession, address: str, tokenizer: PromptTokenizer | None, min_tokens: int
) -> list[int]:
    """Ids of a fresh probe text of at least ``min_tokens`` tokens: the pod's own tokenisation
    (``/tokenize``), else kvsched's tokenizer's."""
    head = f"kvsched doctor probe {uuid.uuid4().hex}: "
    repeats = 1
    while True:
        text = head + " ".join([PROBE_TEXT] * repeats)
        try:
            async with session.post(f"http://{address}/tokenize", json={"prompt": text}) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                ids = [int(i) for i in (await response.json(content_type=None))["tokens"]]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            if tokenizer is None:
                raise
            ids = tokenizer.text_token_ids(text)
        if len(ids) >= min_tokens or repeats >= 64:
            return ids
        repeats = max(repeats + 1, repeats * min_tokens // max(len(ids), 1) + 1)


async def send_probe(session: aiohttp.ClientSession, address: str, ids: list[int], model: str | None) -> None:
    body: dict[str, Any] = {"prompt": ids, "max_tokens": 1, "temperature": 0}
    if model is not None:
        body["model"] = model
    async with session.post(f"http://{address}/v1/completions", json=body) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {(await response.text())[:200]}")
        await response.read()


# --- recognising the probe -----------------------------------------------------------------


def hash_schemes(index: IndexConfig, block_sizes: Sequence[int]) -> list[HashScheme]:
    """The ways vLLM may have hashed the probe's blocks: the configured one first."""
    seeds = [index.vllm_hash_seed]
    if blockhash_ref.VLLM_DEFAULT_SEED not in seeds:
        seeds.append(blockhash_ref.VLLM_DEFAULT_SEED)
    sizes = [index.block_size, *(size for size in block_sizes if size != index.block_size)]
    return [
        HashScheme(algo, seed, size)
        for size in sizes
        for algo in blockhash_ref.VLLM_HASH_ALGOS
        for seed in seeds
    ]


def scheme_hashes(ids: Sequence[int], scheme: HashScheme) -> set[int]:
    root = blockhash_ref.vllm_none_hash(scheme.seed, scheme.algo)
    digests = blockhash_ref.vllm_block_digests(ids, scheme.block_size, root, algo=scheme.algo)
    return {blockhash_ref.wire_hash(d) for d in digests}


def aligned_slice(ids: Sequence[int], tokens: Sequence[int], block_size: int) -> bool:
    """``tokens`` is a run of whole blocks of ``ids``, starting at a block boundary."""
    if not tokens or block_size <= 0:
        return False
    for start in range(0, len(ids) - len(tokens) + 1, block_size):
        if ids[start : start + len(tokens)] == list(tokens):
            return True
    return False


def stored_events(messages: Sequence[Message]) -> list[BlockStored]:
    return [
        event
        for message in messages
        if message.batch is not None
        for event in message.batch.events
        if isinstance(event, BlockStored)
    ]


class ProbeMatcher:
    """Recognises one probe in the captured messages, reading each message once: on a busy pod
    hundreds of batches arrive while a probe is awaited, and the probe's hashes are computed
    once per scheme, not once per arrival."""

    def __init__(self, probe: Probe, schemes: Sequence[HashScheme]) -> None:
        self.probe = probe
        self._hashes = [(scheme, scheme_hashes(probe.ids, scheme)) for scheme in schemes]
        self._read = 0

    def update(self, messages: Sequence[Message]) -> bool:
        probe = self.probe
        for event in stored_events(messages[self._read :]):
            if aligned_slice(probe.ids, event.token_ids, event.block_size):
                probe.by_tokens += 1
            hashes = set(event.block_hashes)
            for scheme, expected in self._hashes:
                if scheme not in probe.schemes and expected & hashes:
                    probe.schemes.append(scheme)
        self._read = len(messages)
        return probe.seen


# --- the KV-event checks -------------------------------------------------------------------


def _rank_addresses(endpoint: Endpoint) -> list[str]:
    assert endpoint.kv_events is not None
    return [with_port_offset(endpoint.kv_events, rank) for rank in range(endpoint.data_parallel_size)]


def _rank_of(endpoint: Endpoint, address: str) -> int:
    addresses = _rank_addresses(endpoint)
    return addresses.index(address) if address in addresses else 0


def index_match(
    endpoint: Endpoint, messages: Sequence[Message], ids: Sequence[int], index_config: IndexConfig
) -> tuple[int, int]:
    """(blocks of ``ids`` kvsched's index holds for the endpoint after these messages, blocks
    of ``ids`` there are): the index built from kvsched's own settings, fed in sequence order."""
    index = PrefixIndex(index_config)
    ordered = sorted(
        (m for m in messages if m.batch is not None),
        key=lambda m: (m.address, m.seq if m.seq is not None else -1),
    )
    for message in ordered:
        rank = _rank_of(endpoint, message.address)
        worker = endpoint.name if rank == 0 else f"{endpoint.name}#dp{rank}"
        batch: EventBatch = message.batch  # type: ignore[assignment]
        index.apply_batch(worker, batch)
    matches = index.match_tokens(ids)
    return max((m.total_blocks for m in matches.values()), default=0), len(ids) // index_config.block_size


class KVDiagnosis:
    """The KV-event checks of one endpoint (ZMQ connection, events, topic, block size, hash,
    prefix match, sequence, clock, replay), each added to ``report``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: Endpoint,
        settings: DoctorSettings,
        report: EndpointReport,
        *,
        tokenizer: PromptTokenizer | None,
        pod_block_size: int | None,
        context: zmq.asyncio.Context | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.session = session
        self.endpoint = endpoint
        self.settings = settings
        self.report = report
        self.tokenizer = tokenizer
        self.pod_block_size = pod_block_size
        self.context = context
        self.wall_clock = wall_clock
        self.result = EndpointProbe(endpoint)

    async def run(self) -> EndpointProbe:
        endpoint = self.endpoint
        capture_options: dict[str, Any] = {"context": self.context}
        if self.wall_clock is not None:
            capture_options["wall_clock"] = self.wall_clock
        async with EventCapture(_rank_addresses(endpoint), **capture_options) as capture:
            connected = await capture.connected(self.settings.wait_s)
            if not self._connections(connected):
                return self.result
            probes = await self._probe(capture)
            self.result.probes = probes
            self.result.messages = list(capture.messages)
        if probes:
            self._analyse(self.result.messages, probes)
            await self._replay(self.result.messages)
        return self.result

    def _connections(self, connected: dict[str, str | None]) -> bool:
        failed = {address: problem for address, problem in connected.items() if problem is not None}
        for address, problem in failed.items():
            self.report.add(
                Check.KV_CONNECT,
                Status.FAIL,
                f"no KV-event publisher answers at {address} ({problem}, {self.settings.wait_s:g} s)",
                "the pod publishes elsewhere or not at all: the port of the endpoint in its "
                "--kv-events-config (vLLM: tcp://*:5557) must be the one kvsched connects to "
                "(kv_events.port, the endpoint's kv_events, or the pod annotation kvsched.io/kv-events-port)",
            )
        if len(failed) < len(connected):
            ok = [address for address, problem in connected.items() if problem is None]
            self.report.add(Check.KV_CONNECT, Status.OK, f"ZMQ handshake with {', '.join(ok)}")
        return not failed

    async def _probe(self, capture: EventCapture) -> list[Probe]:
        sizes = [self.settings.index.block_size, self.pod_block_size or 0]
        min_tokens = PROBE_BLOCKS * max(sizes) + 1
        schemes = hash_schemes(self.settings.index, [s for s in sizes if s])
        model = await _model(self.session, self.endpoint.address)
        probes: list[Probe] = []
        matchers: list[ProbeMatcher] = []
        for _ in range(self.settings.attempts):
            try:
                ids = await probe_ids(self.session, self.endpoint.address, self.tokenizer, min_tokens)
                await send_probe(self.session, self.endpoint.address, ids, model)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.report.add(
                    Check.KV_EVENTS,
                    Status.FAIL,
                    f"the probe request (max_tokens 1) to {self.endpoint.address} failed: {_describe(exc)}",
                    "the pod must serve /v1/completions with token-id prompts",
                )
                return []
            probe = Probe(ids)
            probes.append(probe)
            matcher = ProbeMatcher(probe, schemes)
            matchers.append(matcher)
            # A subscription reaches the publisher a moment after the handshake: the first
            # probe's events may go out before it does, hence a fresh probe per attempt.
            if await capture.wait_until(matcher.update, self.settings.wait_s):
                break
        # Every probe against every message, the later ones too (a slow chunk of a prompt).
        for matcher in matchers:
            matcher.update(capture.messages)
        return probes

    # --- analysis ------------------------------------------------------------------------

    def _analyse(self, messages: list[Message], probes: list[Probe]) -> None:
        report, settings = self.report, self.settings
        waited = settings.attempts * settings.wait_s
        if not messages:
            report.add(
                Check.KV_EVENTS,
                Status.FAIL,
                f"ZMQ connected, but no KV event arrived after {len(probes)} probe request(s) ({waited:g} s)",
                'the pod does not publish: its --kv-events-config needs "enable_kv_cache_events": true and '
                '"publisher": "zmq" (older vLLM defaults to a publisher that sends nothing), and vLLM '
                "needs --enable-prefix-caching",
            )
            return
        probe = next((p for p in probes if p.seen), probes[-1])
        report.add(
            Check.KV_EVENTS,
            Status.OK,
            f"{len(messages)} batch(es) after the probe request(s)"
            + ("; the probe's blocks among them" if probe.seen else "; none recognisably the probe's"),
        )
        subscribed = self._topic(messages)
        size_ok = self._block_size(messages)
        hash_ok = self._hash(messages, probe)
        self._prefix_match(
            subscribed, probe, topic_ok=len(subscribed) == len(messages), size_ok=size_ok, hash_ok=hash_ok
        )
        self._sequence(messages)
        self._clock(messages)

    def _topic(self, messages: list[Message]) -> list[Message]:
        """The messages kvsched's subscription (a topic prefix) lets through."""
        prefix = self.endpoint.kv_topic.encode("utf-8")
        topics = sorted({m.topic for m in messages})
        kept = [m for m in messages if m.topic.startswith(prefix)]
        shown = ", ".join(repr(t.decode("utf-8", "replace")) for t in topics[:3])
        if not kept:
            self.report.add(
                Check.KV_TOPIC,
                Status.FAIL,
                f"events arrive under topic {shown}, but kvsched subscribes to the prefix "
                f"{self.endpoint.kv_topic!r}: it receives none of them",
                "set kv_events.topic (or the endpoint's kv_topic) to '' (every topic) or a prefix of "
                f'{shown}, or change "topic" in the pod\'s --kv-events-config',
            )
        else:
            self.report.add(
                Check.KV_TOPIC, Status.OK, f"topic {shown} (kvsched subscribes to {self.endpoint.kv_topic!r})"
            )
        return kept

    def _block_size(self, messages: list[Message]) -> bool:
        configured = self.settings.index.block_size
        sizes = sorted({event.block_size for event in stored_events(messages)})
        if not sizes and self.pod_block_size is not None:
            sizes = [self.pod_block_size]
        other = [size for size in sizes if size != configured]
        if other:
            self.report.add(
                Check.BLOCK_SIZE,
                Status.FAIL,
                f"the pod's KV blocks are {other[0]} tokens (vLLM --block-size {other[0]}), kvsched's index "
                f"uses {configured}: no block the pod reports can match a request",
                f"set scheduler.index.block_size: {other[0]} (and a SchedulingPolicy's kvEvents.blockSize), "
                f"or run the pods with --block-size {configured}",
            )
            return False
        if sizes:
            self.report.add(Check.BLOCK_SIZE, Status.OK, f"{configured} tokens, as the index's")
        return True

    def _hash(self, messages: list[Message], probe: Probe) -> bool:
        index = self.settings.index
        events = stored_events(messages)
        with_ids = [e for e in events if e.token_ids]
        if index.hash_mode == "own":
            if events and not with_ids:
                self.report.add(
                    Check.HASH,
                    Status.FAIL,
                    "BlockStored events carry no token ids, and hash_mode 'own' computes kvsched's keys "
                    "from them",
                    "run a vLLM whose KV events carry token_ids, or set scheduler.index.hash_mode: vllm "
                    "with vllm_hash_seed equal to the pods' PYTHONHASHSEED (and --prefix-caching-hash-algo "
                    "sha256_cbor)",
                )
                return False
            self.report.add(
                Check.HASH,
                Status.OK,
                "hash_mode 'own': keys from the token ids the events carry (the pod's hash algorithm and "
                "seed do not matter)",
            )
            return True
        wanted = HashScheme("sha256_cbor", index.vllm_hash_seed, index.block_size)
        found = probe.schemes
        # A scheme found at another block size is the block size's fault (its own check).
        as_configured = [s for s in found if (s.algo, s.seed) == (wanted.algo, wanted.seed)]
        if wanted in found or as_configured:
            self.report.add(
                Check.HASH,
                Status.OK,
                f"the pod's block hashes are {(as_configured or [wanted])[0].describe()}",
            )
            return True
        if found:
            self.report.add(Check.HASH, Status.FAIL, *self._hash_cause(found[0], wanted))
            return False
        tokens = " (the events carry token ids: hash_mode 'own' would not depend on it)" if with_ids else ""
        self.report.add(
            Check.HASH,
            Status.FAIL,
            f"the pod's block hashes are not {wanted.describe()}, nor vLLM's default seed, nor the sha256 "
            "algorithm: its PYTHONHASHSEED differs from vllm_hash_seed, or is unset on a vLLM that then "
            f"draws a random root per process, which no router can reproduce{tokens}",
            "set PYTHONHASHSEED to one value on every pod and scheduler.index.vllm_hash_seed to the same, or "
            "use hash_mode 'own'",
        )
        return False

    @staticmethod
    def _hash_cause(found: HashScheme, wanted: HashScheme) -> tuple[str, str]:
        if found.algo != wanted.algo:
            return (
                f"the pod hashes blocks with {found.algo} (--prefix-caching-hash-algo {found.algo}); "
                f"kvsched's hash_mode 'vllm' reproduces {wanted.algo} only",
                f"run the pods with --prefix-caching-hash-algo {wanted.algo}, or use hash_mode 'own'",
            )
        return (
            f"the pod's block hashes chain from seed {found.seed!r} (its PYTHONHASHSEED), kvsched's "
            f"vllm_hash_seed is {wanted.seed!r}",
            f"set scheduler.index.vllm_hash_seed: {found.seed!r} (and a SchedulingPolicy's "
            f"kvEvents.hashSeed), or PYTHONHASHSEED={wanted.seed} on every pod",
        )

    def _prefix_match(
        self, subscribed: list[Message], probe: Probe, *, topic_ok: bool, size_ok: bool, hash_ok: bool
    ) -> None:
        matched, blocks = index_match(self.endpoint, subscribed, probe.ids, self.settings.index)
        if blocks and matched == blocks:
            self.report.add(
                Check.PREFIX_MATCH,
                Status.OK,
                f"kvsched's index, fed this pod's events, holds all {blocks} blocks of the probe prompt: "
                "requests that share a prefix with what the pod caches are routed to it",
                matched=matched,
                blocks=blocks,
            )
            return
        causes = [
            name
            for name, ok in (
                ("the topic", topic_ok),
                ("the block size", size_ok),
                ("the block hashes", hash_ok),
            )
            if not ok
        ]
        if not causes and not probe.seen:
            causes = ["the probe's events never arrived on this address (does it belong to another pod?)"]
        cause = (
            " and ".join([", ".join(causes[:-1]), causes[-1]] if len(causes) > 1 else causes)
            if causes
            else "an unknown cause (see the events in --json)"
        )
        status = Status.WARN if matched else Status.FAIL
        self.report.add(
            Check.PREFIX_MATCH,
            status,
            f"kvsched's index, fed this pod's events, holds {matched} of the probe prompt's {blocks} blocks "
            f"because of {cause}: cache-aware scores for this pod are {'partly ' if matched else ''}blind",
            "fix the FAIL lines above"
            if causes
            else "run again; if it persists, look at the events (--json)",
            matched=matched,
            blocks=blocks,
        )

    def _sequence(self, messages: list[Message]) -> None:
        problems = []
        ranges = []
        for address in sorted({m.address for m in messages}):
            seqs = [m.seq for m in messages if m.address == address and m.seq is not None]
            if not seqs:
                continue
            gaps = sum(max(b - a - 1, 0) for a, b in itertools.pairwise(seqs))
            backwards = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
            ranges.append(f"{address} {seqs[0]}..{seqs[-1]}")
            if backwards:
                a, b = backwards[0]
                problems.append(
                    f"{address}: the sequence went back from {a} to {b} (the publisher restarted)"
                )
            if gaps:
                problems.append(
                    f"{address}: {gaps} batch(es) missing from the sequence (dropped by the PUB socket)"
                )
        if problems:
            self.report.add(
                Check.SEQUENCE,
                Status.WARN,
                "; ".join(problems),
                "a gap costs a replay (or a reset of the pod's index entries without one): raise the pod's "
                "KV-event hwm and make sure kvsched keeps up (its kvsched_kv_gaps_total)",
            )
        else:
            self.report.add(Check.SEQUENCE, Status.OK, f"no gaps ({'; '.join(ranges)})")

    def _clock(self, messages: list[Message]) -> None:
        offsets = [m.received_at - m.batch.ts for m in messages if m.batch is not None]
        if not offsets:
            return
        offset = statistics.median(offsets)
        if abs(offset) > self.settings.max_clock_skew_s:
            direction = "behind" if offset > 0 else "ahead of"
            self.report.add(
                Check.CLOCK,
                Status.WARN,
                f"the events' timestamps are {abs(offset):.1f} s {direction} this machine's clock",
                "synchronise the pods' and kvsched's clocks (NTP); kvsched does not route on event times, "
                "but event ages and logs will mislead",
            )
        else:
            self.report.add(
                Check.CLOCK, Status.OK, f"event timestamps within {abs(offset) * 1000:.0f} ms of ours"
            )

    async def _replay(self, messages: list[Message]) -> None:
        endpoint, report = self.endpoint, self.report
        if endpoint.kv_replay is None:
            report.add(
                Check.REPLAY,
                Status.WARN,
                "no replay socket configured: a lost batch cannot be recovered, so kvsched drops the pod's "
                "index entries and rebuilds them from new events",
                'add "replay_endpoint": "tcp://*:5558" to the pod\'s --kv-events-config and give kvsched its '
                "address (kv_events.replay_port, the endpoint's kv_replay, or kvsched.io/kv-replay-port)",
            )
            return
        for rank in range(endpoint.data_parallel_size):
            address = with_port_offset(endpoint.kv_replay, rank)
            live = _rank_addresses(endpoint)[rank]
            seqs = [m.seq for m in messages if m.address == live and m.seq is not None]
            start = min(seqs) if seqs else 0
            answer = await ask_replay(address, start, timeout_s=self.settings.wait_s, context=self.context)
            if answer.outcome == "answered":
                report.add(
                    Check.REPLAY,
                    Status.OK,
                    f"{address} replayed {answer.batches} batch(es) from sequence {start}",
                )
                continue
            heard = "no replay socket answers" if answer.outcome == "no_connection" else "no replay came back"
            report.add(
                Check.REPLAY,
                Status.FAIL,
                f"{heard} at {address} ({answer.detail}): after a gap kvsched waits for a replay that never "
                "comes, then resets the pod's index entries",
                'add "replay_endpoint" on that port to the pod\'s --kv-events-config, or tell kvsched there '
                "is none (kv_events.replay_port: null, the endpoint's kv_replay: false, or the annotation "
                'kvsched.io/kv-replay-port: "0")',
            )


async def diagnose_endpoint(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    settings: DoctorSettings,
    report: EndpointReport,
    *,
    tokenizer: PromptTokenizer | None,
    context: zmq.asyncio.Context | None = None,
    wall_clock: Callable[[], float] | None = None,
) -> EndpointProbe:
    """Every check of one endpoint, in order; later ones are skipped when an earlier one fails."""
    if not await check_reachable(session, endpoint, report):
        report.add(Check.KV_EVENTS, Status.SKIP, "not checked: the endpoint is unreachable")
        return EndpointProbe(endpoint)
    labels = await check_metrics(session, endpoint, settings.metrics, report)
    if not settings.kv_events or endpoint.kv_events is None:
        report.add(
            Check.KV_EVENTS,
            Status.WARN,
            "no KV events configured for this endpoint: kvsched routes it in approximate mode (its own "
            "routing history), not on what the pod caches",
            "publish KV events from the pod (--kv-events-config) and give kvsched the endpoint's "
            "kv_events address",
        )
        return EndpointProbe(endpoint)
    pod_block_size = None
    if labels is not None and labels.get("block_size", "").isdigit():
        pod_block_size = int(labels["block_size"])
    diagnosis = KVDiagnosis(
        session,
        endpoint,
        settings,
        report,
        tokenizer=tokenizer,
        pod_block_size=pod_block_size,
        context=context,
        wall_clock=wall_clock,
    )
    return await diagnosis.run()


def cross_check(probes: Sequence[EndpointProbe], reports: dict[str, EndpointReport]) -> None:
    """A probe that came back on another endpoint's KV address: the addresses are mixed up."""
    for mine in probes:
        report = reports[mine.endpoint.name]
        if report.status_of(Check.PREFIX_MATCH) is not Status.FAIL or any(p.seen for p in mine.probes):
            continue
        for other in probes:
            if other is mine:
                continue
            events = stored_events(other.messages)
            if any(aligned_slice(p.ids, e.token_ids, e.block_size) for p in mine.probes for e in events):
                addresses = ", ".join(sorted({m.address for m in other.messages}))
                report.add(
                    Check.KV_EVENTS,
                    Status.FAIL,
                    f"the probe sent to {mine.endpoint.address} came back on {other.endpoint.name}'s KV "
                    f"address ({addresses}): the endpoints' KV addresses are mixed up",
                    "give each endpoint its own pod's kv_events address",
                )
                break


async def run_all(tasks: Sequence[Callable[[], Any]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(task: Callable[[], Any]) -> Any:
        async with gate:
            return await task()

    return list(await asyncio.gather(*(one(task) for task in tasks)))
