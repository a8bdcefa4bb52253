"""A simulated vLLM worker: the engine model behind vLLM's HTTP API, metrics and KV events.

Speaks what a real vLLM 0.33 pod exposes to a gateway, an Endpoint Picker or another router
(llm-d's ``llm-d-inference-sim`` is the reference for what a vLLM stand-in offers):

* ``POST /v1/completions`` (prompt as text, token ids, or a list of either) and
  ``POST /v1/chat/completions``, streaming (SSE ``data: {...}`` chunks, ``data: [DONE]``,
  optional usage chunk via ``stream_options.include_usage``) or not, with
  ``usage.prompt_tokens_details.cached_tokens``; chunked request bodies are accepted; chat
  ``tools`` are rendered by the chat template;
* ``POST /v1/messages`` (Anthropic) and ``POST /v1/responses`` (OpenAI): the prompt is the
  chat conversation vLLM converts them to (``codec/openai.py`` cites the conversions) and
  generation runs as for a chat request; the answer keeps the chat completion's layout (the
  engine model is what these simulate, not the two APIs' response schemas);
* vLLM's tokenizer API: ``POST /tokenize`` and ``/detokenize``
  (``vllm/entrypoints/serve/tokenize/protocol.py``) and the render API,
  ``POST /v1/completions/render`` (a list of ``GenerateRequest``, one per prompt) and
  ``/v1/chat/completions/render`` (one ``GenerateRequest``), whose ``token_ids`` are the ids
  generation would use (``vllm/entrypoints/serve/render/api_router.py``,
  ``vllm/entrypoints/serve/disagg/protocol.py``); routers such as vllm-router and llm-d's
  token producer read ``token_ids`` from them;
* ``GET /v1/models`` (with ``max_model_len``), ``/health``, ``/ready``, ``/version``;
  ``/server_info`` and ``/model_info`` (and their older ``/get_*`` names) with the fields
  sgl-router reads when it registers a worker (``model_path``, ``served_model_name``,
  ``dp_size``, ``tokenizer_path``, ``model_type``, ``architectures``: sgl-router
  ``src/core/workflow/steps/worker_registration.rs``); ``model_path`` and ``tokenizer_path``
  are the local directory of the model's files, as SGLang reports ``--model-path`` beside
  ``--served-model-name`` (sglang-router 0.3.2 loads its tokenizer from ``model_path``: a
  model name there sends it to the Hugging Face hub);
* ``GET /metrics`` with vLLM's Prometheus names (shared PROTOCOLS.md §3), written from the
  engine's state at scrape time (``worker_metrics.py``);
* KV events on ZMQ (``publisher.py``), one batch per engine step that changed the cache,
  under vLLM's default topic (the empty string) unless ``topic`` names another, for
  example llm-d's convention ``kv@{address}@{model}`` (``LLMD_TOPIC``).

The settings a real pod can get wrong are options here, so that ``kvsched doctor`` can be
tested against each mistake: the block size, the prefix-cache hash algorithm and seed
(``EngineConfig``), the topic, KV and replay ports (``replay_port=None``: no replay socket,
vLLM's default), BlockStored without token ids (vLLM releases before they were added), and
metric names left off the page (``omit_metrics``).

Text is tokenised by the simulated model's tokenizer (``tokenizer.py``: a byte-level BPE
with a chat template, the files ``kvsched serve`` loads too); generated text is filler words
that tokenise back to the generated ids. Every response carries ``x-kvsched-sim-worker: <name>``,
and ``x-kvsched-sim-prefiller`` with the ``x-prefiller-host-port`` the request came with, if any;
every usage reports the request's TTFT as the worker measured it (``TIMING_KEY``).

An asyncio task drives the engine in real time scaled by ``speed``: engine time is
``(loop.time() - start) * speed``; it steps whenever the engine has work, sleeps until
the step's end, then hands out the step's tokens and publishes its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from scheduler.codec.openai import BadRequestBody, chat_tools, parse_request_body_carefully
from scheduler.core.events import BlockStored, KVEvent
from scheduler.sim.engine import Engine, EngineConfig, GeneratedToken, RequestRejected, SimRequest
from scheduler.sim.publisher import DEFAULT_BUFFER_STEPS, KVEventPublisher
from scheduler.sim.tokenizer import PromptError, SimTokenizer, filler_text, load
from scheduler.sim.worker_metrics import WorkerMetricsPage

log = logging.getLogger(__name__)

WORKER_HEADER = "x-kvsched-sim-worker"
# The prefill pod a gateway named for a disaggregated request, in the header llm-d's routing
# sidecar reads (llm-d/llm-d-inference-scheduler pkg/common/common.go, PrefillPodHeader); the
# worker echoes what it received in PREFILLER_SEEN_HEADER, so a test sees what a sidecar
# on this pod would have read. The worker still computes the prompt itself.
PREFILLER_HEADER = "x-prefiller-host-port"
PREFILLER_SEEN_HEADER = "x-kvsched-sim-prefiller"
DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
# The vLLM release whose API the workers speak, reported by /version.
VLLM_VERSION = "0.33.0"
# llm-d's KV-event topic convention; vLLM's own default topic is the empty string.
LLMD_TOPIC = "kv@{address}@{model}"
_TOPIC_FIELDS = {"host": "h", "port": 1, "address": "h:1", "model": "m"}
# OpenAI's and vLLM's default for /v1/completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16
# The workers' extension of a completion's usage report (the body's, or the usage chunk's
# of a stream), read by benchmark clients: this request's TTFT as the worker saw it, from
# the HTTP request's arrival to its first token (``ttft_ms``), and as the engine saw it,
# from its arrival in the engine (``engine_ttft_ms``, what ``vllm:time_to_first_token_seconds``
# counts). A client's TTFT minus ``ttft_ms`` is what the path in front of the worker took.
# Clients that do not know the key ignore it, as OpenAI clients ignore unknown fields.
TIMING_KEY = "kvsched_sim_timing"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TIMER_TICK_S = 0.001
_MIN_SLEEP_S = 0.001
_LATE_TOLERANCE_S = 0.005


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    name: str = "sim-0"
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    http_port: int = 0  # 0 = ephemeral
    kv_port: int = 0
    replay_port: int | None = 0  # None = no replay socket
    speed: float = 1.0  # engine seconds per real second
    legacy_events: bool = False
    buffer_steps: int = DEFAULT_BUFFER_STEPS
    # KV-event topic; may name {host}, {port}, {address} (host:http_port) and {model}.
    topic: str = ""
    # A Hugging Face tokenizer directory; None = the simulated model's own files.
    tokenizer_dir: str | None = None
    # BlockStored events carry the blocks' token ids (vLLM since they were added to the event).
    events_with_token_ids: bool = True
    # Metric families left off /metrics (a model server that does not export them).
    omit_metrics: tuple[str, ...] = ()
    # vLLM lets chat requests without max_tokens run to the context limit; the simulator
    # caps them so a forgotten parameter does not occupy a worker for minutes.
    default_chat_max_tokens: int = 256
    engine: EngineConfig = field(default_factory=EngineConfig)
    # LoRA adapters served beside the model, by name (vLLM's --lora-modules); a request
    # naming one runs with it. Needs engine.max_loras > 0.
    lora_adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError("speed must be positive")
        if self.default_chat_max_tokens < 1:
            raise ValueError("default_chat_max_tokens must be at least 1")
        check_topic(self.topic)
        if self.lora_adapters and not self.engine.max_loras:
            raise ValueError("lora_adapters need engine.max_loras > 0")


def check_topic(topic: str) -> str:
    """A topic template may name {host}, {port}, {address} and {model}; anything else is an error."""
    try:
        topic.format(**_TOPIC_FIELDS)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"topic {topic!r}: bad placeholder {exc} (known: {{host}}, {{port}}, {{address}}, {{model}})"
        ) from None
    return topic


def advertised_host(host: str) -> str:
    """Where clients on this machine reach a socket bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "*", "::") else host


@dataclass(frozen=True, slots=True)
class WorkerDescriptor:
    """How to reach one simulated worker."""

    name: str
    model: str
    host: str
    http_port: int
    kv_port: int
    replay_port: int | None
    topic: str
    tokenizer_dir: str = ""

    @property
    def address(self) -> str:
        """``ip:port`` as an Endpoint Picker names the pod."""
        return f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def kv_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.kv_port}"

    @property
    def replay_endpoint(self) -> str | None:
        return None if self.replay_port is None else f"tcp://{self.host}:{self.replay_port}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "address": self.address,
            "http_url": self.http_url,
            "kv_endpoint": self.kv_endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.topic,
            "tokenizer_dir": self.tokenizer_dir,
        }


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def _error_response(status: int, message: str, kind: str) -> web.Response:
    # vLLM's ErrorResponse shape (OpenAI-compatible).
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def sse_event(chunk: dict[str, Any]) -> bytes:
    """One server-sent event of a streamed answer: ``data: <compact JSON>`` and a blank line."""
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def token_event_prefix(head: dict[str, Any]) -> bytes:
    """What every token event of one answer starts with: ``head``'s fields, then the choices."""
    return b"data: " + json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"choices":['


def token_event(prefix: bytes, choice: int, text: str, finished: bool, *, chat: bool) -> bytes:
    """``sse_event`` of one generated token's chunk, byte for byte, without building the chunk:
    a streamed answer sends one per token, and the dictionaries and ``json.dumps`` of each were
    a fifth of the simulated pool's busy time under ``kvsched demo`` (py-spy)."""
    reason = b'"length"' if finished else b"null"
    body = json.dumps(text).encode()
    if chat:
        entry = b'{"index":%d,"delta":{"content":%b},"logprobs":null' % (choice, body)
    else:
        entry = b'{"index":%d,"text":%b,"logprobs":null' % (choice, body)
    return prefix + entry + b',"finish_reason":' + reason + b',"stop_reason":null}]}\n\n'


@dataclass(slots=True)
class _Call:
    """One HTTP call's engine requests and the queue their tokens arrive on."""

    requests: list[SimRequest]
    queue: asyncio.Queue[tuple[int, GeneratedToken]] = field(default_factory=asyncio.Queue)


class SimWorker:
    def __init__(self, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig()
        self.tokenizer: SimTokenizer = load(self.config.tokenizer_dir)
        self.engine = Engine(self.config.engine, output_token=self.tokenizer.filler_token_id)
        self.metrics_page = WorkerMetricsPage(self.config.model, self.config.omit_metrics)
        self.publisher: KVEventPublisher | None = None
        self.http_port = 0
        self.bad_requests = 0
        self._runner: web.AppRunner | None = None
        self._driver: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Set while the engine has nothing to do; arrivals wait on ``_admitting`` while an
        # engine restart drains what is running.
        self._idle = asyncio.Event()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._calls: dict[str, tuple[_Call, int]] = {}
        self._ids = itertools.count()
        self._anchor_real = 0.0
        self._anchor_engine = 0.0
        self._last_stamp = 0.0
        self._latest_arrival = 0.0
        self._created = int(time.time())

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/messages", self._converted_chat)
        app.router.add_post("/v1/responses", self._converted_chat)
        app.router.add_post("/v1/completions/render", self._completions_render)
        app.router.add_post("/v1/chat/completions/render", self._chat_render)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._health)
        app.router.add_get("/version", self._version)
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self._server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self._model_info)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/metrics", self._metrics)
        app.on_response_prepare.append(self._tag_response)
        # A client that goes away cancels its handler, which aborts its engine requests.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.http_port)
        await site.start()
        self._runner = runner
        self.http_port = int(runner.addresses[0][1])
        host = advertised_host(cfg.host)
        topic = cfg.topic.format(
            host=host, port=self.http_port, address=f"{host}:{self.http_port}", model=cfg.model
        )
        self.publisher = KVEventPublisher(
            topic=topic,
            host=cfg.host,
            port=cfg.kv_port,
            replay_port=cfg.replay_port,
            legacy=cfg.legacy_events,
            buffer_steps=cfg.buffer_steps,
        )
        await self.publisher.start()
        self._anchor_real = asyncio.get_running_loop().time()
        self._start_driver()

    def _start_driver(self) -> None:
        self._driver = asyncio.create_task(self._drive(), name=f"sim-engine-{self.config.name}")
        self._driver.add_done_callback(self._driver_ended)

    def _driver_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: engine driver stopped", self.name, exc_info=task.exception())

    async def _stop_driver(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None

    async def restart_engine(self) -> None:
        """The engine process starts again while the HTTP server stays up (vLLM's engine core
        restarted): its prefix cache is empty and its KV-event publisher starts again at
        ``seq`` 0 with nothing to replay, on the same ports. Requests in flight finish first and
        new ones wait meanwhile, so no client sees the restart; subscribers see the publisher's
        connection drop and its sequence go back."""
        if self.publisher is None:
            raise RuntimeError("worker is not started")
        self._admitting.clear()
        try:
            while self.engine.has_work:
                self._idle.clear()
                await self._idle.wait()
            await self._stop_driver()
            self.engine = Engine(self.config.engine, output_token=self.tokenizer.filler_token_id)
            await self.publisher.restart()
            self._start_driver()
        finally:
            self._admitting.set()

    async def stop(self) -> None:
        await self._stop_driver()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.publisher is not None:
            await self.publisher.close()

    async def __aenter__(self) -> SimWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def descriptor(self) -> WorkerDescriptor:
        if self.publisher is None:
            raise RuntimeError("worker is not started")
        return WorkerDescriptor(
            name=self.config.name,
            model=self.config.model,
            host=advertised_host(self.config.host),
            http_port=self.http_port,
            kv_port=self.publisher.port,
            replay_port=self.publisher.replay_port,
            topic=self.publisher.topic,
            tokenizer_dir=str(self.tokenizer.directory),
        )

    # -- engine driver -----------------------------------------------------------------

    # Engine time maps to loop time at ``speed`` through an anchor that moves to each
    # step's end when the step is delivered (to where that end should have been in loop
    # time, so oversleeping by a timer tick is made up by the next sleep). Steps run back
    # to back in engine time, so timer granularity (epoll sleeps in whole milliseconds)
    # never stretches them; arrivals are stamped from the anchored clock. Sustained
    # lateness (an overloaded loop) re-anchors at the real time: the simulation then runs
    # slower than ``speed`` instead of producing longer steps.

    def engine_time(self) -> float:
        """The engine clock now; never decreases."""
        loop_now = asyncio.get_running_loop().time()
        now = self._anchor_engine + (loop_now - self._anchor_real) * self.config.speed
        if now < self._last_stamp:
            now = self._last_stamp
        self._last_stamp = now
        return now

    def _loop_time_of(self, engine_t: float) -> float:
        return self._anchor_real + (engine_t - self._anchor_engine) / self.config.speed

    async def _pace(self, engine_t: float) -> None:
        # The event loop waits in whole milliseconds, rounded up (selectors' epoll timeout), so
        # a sleep ends up to a tick late, half a tick on average: aimed half a tick early, a
        # step's tokens are handed out centred on the step's end instead of after it. Shorter
        # sleeps would round up to the tick; the lead is kept for later.
        delay = self._loop_time_of(engine_t) - asyncio.get_running_loop().time() - _TIMER_TICK_S / 2
        await asyncio.sleep(delay if delay >= _MIN_SLEEP_S else 0)

    def _reanchor(self, step_end: float) -> None:
        ideal = self._loop_time_of(step_end)
        loop_now = asyncio.get_running_loop().time()
        floor = max(step_end, self._last_stamp)
        if loop_now - ideal > _LATE_TOLERANCE_S:
            self._anchor_real, self._anchor_engine = loop_now, floor
        else:
            self._anchor_real = ideal + (floor - step_end) / self.config.speed
            self._anchor_engine = floor

    async def _drive(self) -> None:
        engine = self.engine
        publisher = self.publisher
        assert publisher is not None
        while True:
            start = engine.next_step_time()
            if start is None:
                self._wake.clear()
                self._idle.set()
                await self._wake.wait()
                continue
            self._idle.clear()
            # Back to back while busy: the next step starts where the last one ended,
            # unless a request arrived later than that (then it starts at the arrival).
            result = engine.step(max(start, self._latest_arrival))
            # The step's tokens exist only once the (simulated) forward pass is over; first
            # tokens come with the step's first iteration (earlier when token_scale
            # stretches the step with more decoding).
            firsts = [token for token in result.tokens if token.index == 0]
            if firsts and result.first_token_at < result.end:
                await self._pace(result.first_token_at)
                self._deliver(firsts)
            else:
                firsts = []
            await self._pace(result.end)
            self._deliver([token for token in result.tokens if token.index != 0] if firsts else result.tokens)
            if result.events:
                try:
                    await publisher.publish(self._as_published(result.events))
                except Exception:
                    log.exception("%s: publishing %d KV events failed", self.name, len(result.events))
            self._reanchor(result.end)

    def _as_published(self, events: list[KVEvent]) -> list[KVEvent]:
        if self.config.events_with_token_ids:
            return events
        return [
            dataclasses.replace(event, token_ids=[]) if isinstance(event, BlockStored) else event
            for event in events
        ]

    def _deliver(self, tokens: list[GeneratedToken]) -> None:
        for token in tokens:
            entry = self._calls.get(token.request.request_id)
            if entry is not None:
                call, choice = entry
                call.queue.put_nowait((choice, token))

    def _submit(self, prompts: list[list[int]], max_tokens: int, lora: str | None = None) -> _Call:
        now = self.engine_time()
        self._latest_arrival = now
        base = f"{self.config.name}-{next(self._ids)}"
        call = _Call(requests=[])
        try:
            for index, prompt in enumerate(prompts):
                request_id = f"{base}-{index}"
                call.requests.append(self.engine.add_request(request_id, prompt, max_tokens, now, lora=lora))
                self._calls[request_id] = (call, index)
        except RequestRejected:
            self._forget(call)
            raise
        self._wake.set()
        return call

    def _forget(self, call: _Call) -> None:
        now = self.engine_time()
        for request in call.requests:
            self._calls.pop(request.request_id, None)
            if not request.done:
                self.engine.abort(request.request_id, now)

    # -- HTTP --------------------------------------------------------------------------

    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = self.config.name
        prefiller = request.headers.get(PREFILLER_HEADER)
        if prefiller is not None:
            response.headers[PREFILLER_SEEN_HEADER] = prefiller

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            # msgspec reads a 17 KB token-id body in 0.08 ms where json takes 0.18-0.24; what
            # it refuses (NaN, integers past 64 bits, bad JSON) json reads or explains as before.
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _HTTPError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model and model not in self.config.lora_adapters:
            raise _HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    def _adapter(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        return model if isinstance(model, str) and model in self.config.lora_adapters else None

    @staticmethod
    def _max_tokens(body: dict[str, Any], default: int, *keys: str) -> int:
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _HTTPError(400, f"{key} must be a positive integer")
            return value
        return default

    @staticmethod
    def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage", False))
        return stream, include_usage

    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except _HTTPError as exc:
            self.bad_requests += 1
            log.debug("%s: %s %s -> %d %s", self.name, request.method, request.path, exc.status, exc.message)
            return _error_response(exc.status, exc.message, exc.kind)
        except (PromptError, RequestRejected) as exc:
            self.bad_requests += 1
            log.debug("%s: %s %s -> 400 %s", self.name, request.method, request.path, exc)
            return _error_response(400, str(exc), "BadRequestError")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        received = asyncio.get_running_loop().time()
        return await self._guard(request, lambda r: self._completions_inner(r, received))

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        received = asyncio.get_running_loop().time()
        return await self._guard(request, lambda r: self._chat_inner(r, received))

    async def _converted_chat(self, request: web.Request) -> web.StreamResponse:
        received = asyncio.get_running_loop().time()
        return await self._guard(request, lambda r: self._converted_chat_inner(r, received))

    async def _converted_chat_inner(self, request: web.Request, received: float) -> web.StreamResponse:
        document = await self._body(request)
        try:
            body = parse_request_body_carefully(json.dumps(document).encode(), request.path)
        except BadRequestBody as exc:
            raise _HTTPError(400, str(exc)) from exc
        prompt = self.tokenizer.hf.chat_token_ids(body.messages, tools=body.tools)
        max_tokens = body.max_tokens if body.max_tokens is not None else self.config.default_chat_max_tokens
        stream, include_usage = self._stream_flags(document)
        await self._admitting.wait()
        call = self._submit([prompt], max_tokens, self._adapter(document))
        return await self._respond(
            request, call, received, chat=True, stream=stream, include_usage=include_usage
        )

    async def _completions_inner(self, request: web.Request, received: float) -> web.StreamResponse:
        body = await self._body(request)
        prompts = self._completion_prompts(body)
        max_tokens = self._max_tokens(body, COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens")
        stream, include_usage = self._stream_flags(body)
        await self._admitting.wait()
        call = self._submit(prompts, max_tokens, self._adapter(body))
        return await self._respond(
            request, call, received, chat=False, stream=stream, include_usage=include_usage
        )

    async def _chat_inner(self, request: web.Request, received: float) -> web.StreamResponse:
        body = await self._body(request)
        prompt = self._chat_prompt(body)
        max_tokens = self._max_tokens(
            body, self.config.default_chat_max_tokens, "max_completion_tokens", "max_tokens"
        )
        stream, include_usage = self._stream_flags(body)
        await self._admitting.wait()
        call = self._submit([prompt], max_tokens, self._adapter(body))
        return await self._respond(
            request, call, received, chat=True, stream=stream, include_usage=include_usage
        )

    @staticmethod
    def _usage(requests: list[SimRequest]) -> dict[str, Any]:
        prompt = sum(r.prompt_tokens for r in requests)
        completion = sum(r.completion_tokens for r in requests)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.num_cached_tokens for r in requests)},
        }

    def _timing(self, call: _Call, received: float, first_token_at: float | None) -> dict[str, float | None]:
        """``TIMING_KEY``'s value: the call's first token, from the HTTP request's arrival
        (loop clock) and from the engine's arrival (engine clock, in real time)."""
        engine_ttft = call.requests[0].ttft if call.requests else None
        return {
            "ttft_ms": None if first_token_at is None else (first_token_at - received) * 1e3,
            "engine_ttft_ms": None if engine_ttft is None else engine_ttft / self.config.speed * 1e3,
        }

    async def _respond(
        self,
        request: web.Request,
        call: _Call,
        received: float,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.config.model,
        }
        loop = asyncio.get_running_loop()
        first_token_at: float | None = None
        try:
            if not stream:
                texts = ["" for _ in call.requests]
                remaining = len(call.requests)
                while remaining:
                    choice, token = await call.queue.get()
                    first_token_at = first_token_at or loop.time()
                    texts[choice] += filler_text(token.index)
                    remaining -= token.finished
                body = self._full_body(call, texts, head, chat)
                body[TIMING_KEY] = self._timing(call, received, first_token_at)
                return web.json_response(body)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                await self._send(response, {**head, "choices": [{**first, "finish_reason": None}]})
            remaining = len(call.requests)
            prefix = token_event_prefix(head)
            while remaining:
                choice, token = await call.queue.get()
                first_token_at = first_token_at or loop.time()
                event = token_event(prefix, choice, filler_text(token.index), token.finished, chat=chat)
                await response.write(event)
                remaining -= token.finished
            if include_usage:
                usage: dict[str, Any] = {**head, "choices": [], "usage": self._usage(call.requests)}
                usage[TIMING_KEY] = self._timing(call, received, first_token_at)
                await self._send(response, usage)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self._forget(call)

    @staticmethod
    async def _send(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
        await response.write(sse_event(chunk))

    def _full_body(self, call: _Call, texts: list[str], head: dict[str, Any], chat: bool) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            if chat:
                message = {"role": "assistant", "content": text, "tool_calls": []}
                choices.append(
                    {"index": index, "message": message, "logprobs": None, "finish_reason": "length"}
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": "length"})
            choices[-1]["stop_reason"] = None
        kind = "chat.completion" if chat else "text_completion"
        return {**head, "object": kind, "choices": choices, "usage": self._usage(call.requests)}

    async def _models(self, request: web.Request) -> web.Response:
        model = self.config.model
        card = {
            "id": model,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": model,
            "parent": None,
            "max_model_len": self.engine.config.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    # -- prompts and vLLM's tokenizer API ------------------------------------------------

    @staticmethod
    def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
        value = body.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _HTTPError(400, f"{key} must be a boolean")
        return value

    def _completion_prompts(self, body: dict[str, Any]) -> list[list[int]]:
        if "prompt" not in body:
            raise _HTTPError(400, "prompt is required")
        return self.tokenizer.completion_prompts(body["prompt"], self._flag(body, "add_special_tokens", True))

    def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        try:
            tools = chat_tools(body.get("tools"))
        except BadRequestBody as exc:
            raise _HTTPError(400, str(exc)) from exc
        ids = self.tokenizer.chat_ids(
            body.get("messages"), self._flag(body, "add_generation_prompt", True), tools
        )
        if self._flag(body, "add_special_tokens", False):
            # On top of what the template holds, as vLLM does when asked.
            ids = [*self.tokenizer.encode("", add_special_tokens=True), *ids]
        return ids

    def _generate_request(
        self, token_ids: list[int], max_tokens: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """vLLM's ``GenerateRequest`` (the render API's answer); ``sampling_params`` carries
        the fields this engine models."""
        return {
            "request_id": uuid.uuid4().hex,
            "token_ids": token_ids,
            "features": None,
            "sampling_params": {
                "n": 1,
                "max_tokens": max_tokens,
                "temperature": body.get("temperature", 1.0),
            },
            "model": body.get("model") or self.config.model,
            "stream": bool(body.get("stream", False)),
            "stream_options": body.get("stream_options"),
            "cache_salt": body.get("cache_salt"),
            "priority": body.get("priority", 0),
            "kv_transfer_params": None,
        }

    async def _completions_render(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._completions_render_inner)

    async def _completions_render_inner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        prompts = self._completion_prompts(body)
        max_tokens = self._max_tokens(body, COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens")
        return web.json_response([self._generate_request(ids, max_tokens, body) for ids in prompts])

    async def _chat_render(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._chat_render_inner)

    async def _chat_render_inner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids = self._chat_prompt(body)
        max_tokens = self._max_tokens(
            body, self.config.default_chat_max_tokens, "max_completion_tokens", "max_tokens"
        )
        return web.json_response(self._generate_request(ids, max_tokens, body))

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._tokenize_inner)

    async def _tokenize_inner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if "messages" in body:
            tokens = self._chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            tokens = self.tokenizer.encode(body["prompt"], self._flag(body, "add_special_tokens", True))
        else:
            raise _HTTPError(400, "tokenize needs a text prompt or messages")
        wants_strings = self._flag(body, "return_token_strs", False)
        strings = self.tokenizer.token_strings(tokens) if wants_strings else None
        return web.json_response(
            {
                "count": len(tokens),
                "max_model_len": self.engine.config.max_model_len,
                "tokens": tokens,
                "token_strs": strings,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(request, self._detokenize_inner)

    async def _detokenize_inner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise _HTTPError(400, "detokenize needs tokens, a list of token ids")
        return web.json_response({"prompt": self.tokenizer.decode(self.tokenizer.token_list(tokens))})

    # -- server identity -----------------------------------------------------------------

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def _server_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": str(self.tokenizer.directory),
                "served_model_name": self.config.model,
                "tokenizer_path": str(self.tokenizer.directory),
                "dp_size": 1,
                "tp_size": 1,
                "version": VLLM_VERSION,
                "max_total_tokens": cfg.capacity_blocks * cfg.block_size,
                "max_prefill_tokens": cfg.max_num_batched_tokens,
                "max_running_requests": cfg.max_num_seqs,
                "context_length": cfg.max_model_len,
                "page_size": cfg.block_size,
            }
        )

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": str(self.tokenizer.directory),
                "tokenizer_path": str(self.tokenizer.directory),
                "is_generation": True,
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "max_model_len": self.engine.config.max_model_len,
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_page.render(self.engine), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )
