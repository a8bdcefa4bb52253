"""Simulated vLLM workers over real sockets: HTTP API, /metrics, ZMQ KV events and replay."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families
from zmq.utils.monitor import parse_monitor_message

from scheduler.adapters.kv_subscriber import KVEventSubscriber, SubscriberConfig
from scheduler.codec.kvevents import REPLAY_END_FRAME, decode_batch, decode_seq
from scheduler.core.events import BlockRemoved, BlockStored
from scheduler.core.index import IndexConfig, PrefixIndex
from scheduler.sim.engine import EngineConfig
from scheduler.sim.latency import LatencyModel
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.tokenizer import load
from scheduler.sim.worker import (
    LLMD_TOPIC,
    TIMING_KEY,
    WORKER_HEADER,
    SimWorker,
    WorkerDescriptor,
    sse_event,
    token_event,
    token_event_prefix,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
DEADLINE_S = 20.0


def words(tag: str, count: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def pool_config(**engine: Any) -> PoolConfig:
    fields: dict[str, Any] = {"capacity_blocks": 256}
    fields.update(engine)
    return PoolConfig(speed=1000.0, engine=EngineConfig(**fields))


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    async with SimPool(2, pool_config()) as started:
        yield started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any, str]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json(), response.headers.get(WORKER_HEADER, "")


async def sse_chunks(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    chunks: list[Any] = []
    async with session.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    for event in raw.split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: ")
        data = event[len("data: ") :]
        chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


# -- HTTP API --------------------------------------------------------------------------


async def test_completion_text_reports_cached_tokens_on_repeat(
    pool: SimPool, http: aiohttp.ClientSession
) -> None:
    worker = pool.descriptors[0]
    body = {"model": MODEL, "prompt": words("w", 40), "max_tokens": 4}
    prompt_ids = load().encode(words("w", 40))
    assert prompt_ids[0] == 1 and len(prompt_ids) > 41  # <s>, and "w12" is more than one token
    status, first, served_by = await post(http, worker.http_url + "/v1/completions", body)
    assert status == 200 and served_by == worker.name
    assert first["object"] == "text_completion"
    assert first["choices"][0]["text"] == "the model answers with"
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "total_tokens": len(prompt_ids) + 4,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    _, second, _ = await post(http, worker.http_url + "/v1/completions", body)
    # Every full block but the one holding the last prompt token (always recomputed).
    full_blocks = (len(prompt_ids) - 1) // 16
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * full_blocks


async def test_completion_token_ids_and_prompt_lists(pool: SimPool, http: aiohttp.ClientSession) -> None:
    url = pool.descriptors[1].http_url + "/v1/completions"
    status, single, served_by = await post(http, url, {"prompt": list(range(100, 140)), "max_tokens": 2})
    assert status == 200 and served_by == pool.descriptors[1].name
    assert single["usage"]["prompt_tokens"] == 40
    status, batch, _ = await post(http, url, {"prompt": [list(range(100, 140)), "a b c"], "max_tokens": 3})
    assert status == 200
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["usage"]["prompt_tokens"] == 40 + len(load().encode("a b c"))
    assert batch["usage"]["completion_tokens"] == 6
    assert batch["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


async def test_chat_streaming_matches_non_streaming(pool: SimPool, http: aiohttp.ClientSession) -> None:
    url = pool.descriptors[0].http_url + "/v1/chat/completions"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words("q", 10)}]
    status, full, _ = await post(http, url, {"messages": messages, "max_tokens": 5})
    assert status == 200 and full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["role"] == "assistant"
    body = {"messages": messages, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    chunks = await sse_chunks(http, url, body)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in content)
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in content)
        == full["choices"][0]["message"]["content"]
    )
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"] == len(load().chat_ids(messages))
    # Without include_usage there is no usage chunk.
    plain = await sse_chunks(http, url, {"messages": messages, "max_tokens": 2, "stream": True})
    assert all("usage" not in c for c in plain[:-1])


async def test_completion_streaming_text(pool: SimPool, http: aiohttp.ClientSession) -> None:
    url = pool.descriptors[0].http_url + "/v1/completions"
    chunks = await sse_chunks(http, url, {"prompt": "x y z", "max_tokens": 3, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "the model answers"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_usage_reports_the_workers_own_ttft(http: aiohttp.ClientSession) -> None:
    # Real time (speed 1), so the engine's TTFT and the HTTP one are on one clock.
    async with SimPool(1, PoolConfig(engine=EngineConfig(capacity_blocks=256))) as real_time:
        url = real_time.descriptors[0].http_url + "/v1/completions"
        body = {"prompt": words("w", 300), "max_tokens": 2}
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        chunks = await sse_chunks(http, url, stream)
        _, plain, _ = await post(http, url, body)
    for timing in (chunks[-2][TIMING_KEY], plain[TIMING_KEY]):
        # The worker's TTFT holds the engine's (prefill of ~300 tokens: milliseconds) and
        # its own HTTP handling before it.
        assert 0 < timing["engine_ttft_ms"] <= timing["ttft_ms"] < 1000
    assert all(TIMING_KEY not in c for c in chunks[:-2])  # only with the usage report


async def test_follow_up_turn_hits_the_previous_answer(pool: SimPool, http: aiohttp.ClientSession) -> None:
    url = pool.descriptors[0].http_url + "/v1/chat/completions"
    turn = [{"role": "user", "content": words("t", 30)}]
    _, first, _ = await post(http, url, {"messages": turn, "max_tokens": 20})
    answer = first["choices"][0]["message"]["content"]
    follow = [*turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then"}]
    _, second, _ = await post(http, url, {"messages": follow, "max_tokens": 1})
    # The answer re-sent tokenises to the ids generated: turn two's prompt starts with turn one's
    # prompt and the 20 answer ids, whose KV (all but the last answer token's) is cached.
    first_ids, second_ids = load().chat_ids(turn), load().chat_ids(follow)
    answer_ids = [load().filler_token_id(i) for i in range(20)]
    assert second_ids[: len(first_ids) + 20] == first_ids + answer_ids
    cached = (len(first_ids) + 19) // 16 * 16
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


async def test_chunked_request_body_is_accepted(pool: SimPool) -> None:
    worker = pool.descriptors[0]
    body = json.dumps({"prompt": words("c", 20), "max_tokens": 2}).encode()
    reader, writer = await asyncio.open_connection(worker.host, worker.http_port)
    head = (
        "POST /v1/completions HTTP/1.1\r\n"
        f"Host: {worker.address}\r\n"
        "Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode())
    for start in range(0, len(body), 17):
        piece = body[start : start + 17]
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), DEADLINE_S)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert f"{WORKER_HEADER}: {worker.name}".encode() in headers
    assert json.loads(payload)["usage"]["prompt_tokens"] == len(load().encode(words("c", 20)))


async def test_models_health_tokenize(pool: SimPool, http: aiohttp.ClientSession) -> None:
    base = pool.descriptors[0].http_url
    for path in ("/health", "/ready"):
        async with http.get(base + path) as response:
            assert response.status == 200 and response.headers[WORKER_HEADER] == "sim-0"
    async with http.get(base + "/v1/models") as response:
        models = await response.json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 8192
    async with http.get(base + "/version") as response:
        assert (await response.json())["version"] == "0.33.0"
    tokenizer = load()
    status, tokens, _ = await post(http, base + "/tokenize", {"prompt": "one two three"})
    # <s> then one token per common word, as a Llama tokenizer counts them.
    assert status == 200 and tokens["tokens"] == tokenizer.encode("one two three")
    assert tokens["count"] == 4 and tokens["tokens"][0] == 1 and tokens["token_strs"] is None
    assert tokens["max_model_len"] == 8192
    _, bare, _ = await post(
        http,
        base + "/tokenize",
        {"prompt": "one two", "add_special_tokens": False, "return_token_strs": True},
    )
    assert bare["token_strs"] == ["one", "Ġtwo"]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    _, chat_tokens, _ = await post(http, base + "/tokenize", chat)
    # <s> <|user|> \n hi <|end|> \n <|assistant|> \n
    assert chat_tokens["count"] == 8 and chat_tokens["tokens"][:2] == [1, 4]
    _, text, _ = await post(http, base + "/detokenize", {"tokens": tokens["tokens"][1:]})
    assert text == {"prompt": "one two three"}


async def test_render_endpoints_give_the_ids_generation_uses(
    pool: SimPool, http: aiohttp.ClientSession
) -> None:
    base = pool.descriptors[0].http_url
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words("r", 20)}]
    status, rendered, _ = await post(http, base + "/v1/chat/completions/render", {"messages": messages})
    assert status == 200 and rendered["token_ids"] == load().chat_ids(messages)
    assert rendered["sampling_params"]["max_tokens"] == 256 and rendered["model"] == MODEL
    status, batch, _ = await post(
        http, base + "/v1/completions/render", {"prompt": ["a b", words("s", 5)], "max_tokens": 3}
    )
    assert status == 200 and [item["token_ids"] for item in batch] == [
        load().encode("a b"),
        load().encode(words("s", 5)),
    ]
    # What the render API said is what the engine counts.
    _, served, _ = await post(http, base + "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert served["usage"]["prompt_tokens"] == len(rendered["token_ids"])
    status, error, _ = await post(http, base + "/v1/completions/render", {"max_tokens": 3})
    assert status == 400 and "prompt" in error["error"]["message"]


async def test_server_and_model_info_name_the_model_and_its_tokenizer(
    pool: SimPool, http: aiohttp.ClientSession
) -> None:
    base = pool.descriptors[0].http_url
    for path in ("/server_info", "/get_server_info"):
        async with http.get(base + path) as response:
            info = await response.json()
        assert info["served_model_name"] == MODEL and info["dp_size"] == 1
        # The model's files are local: a router loading its tokenizer from here needs no hub.
        assert info["model_path"] == pool.descriptors[0].tokenizer_dir
    for path in ("/model_info", "/get_model_info"):
        async with http.get(base + path) as response:
            info = await response.json()
        assert info["model_path"] == pool.descriptors[0].tokenizer_dir and info["is_generation"] is True
        assert info["architectures"] == ["LlamaForCausalLM"]
        assert Path(info["tokenizer_path"], "tokenizer.json").is_file()
        assert info["tokenizer_path"] == pool.descriptors[0].tokenizer_dir


async def test_bad_requests_are_answered_like_vllm(pool: SimPool, http: aiohttp.ClientSession) -> None:
    url = pool.descriptors[0].http_url + "/v1/completions"
    async with http.post(url, data=b"{not json") as response:
        assert response.status == 400 and response.headers[WORKER_HEADER] == "sim-0"
        assert (await response.json())["error"]["code"] == 400
    status, error, _ = await post(http, url, {"model": "other", "prompt": "x"})
    assert status == 404 and "does not exist" in error["error"]["message"]
    status, error, _ = await post(http, url, {"prompt": "x", "max_tokens": 9000})
    assert status == 400 and "maximum context length" in error["error"]["message"]
    status, error, _ = await post(http, url, {"prompt": "x", "max_tokens": 0})
    assert status == 400
    status, error, _ = await post(http, url, {"prompt": [1, "a"]})
    assert status == 400
    # Token ids: booleans, floats, negative ids and ids past the vocabulary are refused.
    for prompt in ([1, True, 3], [1, 2.0], [5, -1], [3, 32_000], [[1, 2], [False]]):
        status, error, _ = await post(http, url, {"prompt": prompt, "max_tokens": 1})
        assert status == 400, prompt
    status, error, _ = await post(http, url, {"prompt": [1, 31_999], "max_tokens": 1})
    assert status == 200
    # What msgspec refuses and json reads (NaN) is read as before; bad JSON is explained.
    async with http.post(url, data=b'{"prompt": [1, 2], "max_tokens": 1, "temperature": NaN}') as response:
        assert response.status == 200
    async with http.post(url, data=b'{"prompt": [1, 2],') as response:
        assert response.status == 400 and "not JSON" in (await response.json())["error"]["message"]
    _, text, _ = await post(http, pool.descriptors[0].http_url + "/detokenize", {"tokens": []})
    assert text == {"prompt": ""}
    status, _, _ = await post(http, url, {"prompt": "still fine", "max_tokens": 1})
    assert status == 200


@pytest.mark.parametrize("chat", [True, False])
def test_token_events_are_what_json_dumps_writes(chat: bool) -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 17, "model": 'm\u00e9"x'}
    prefix = token_event_prefix(head)
    for text, finished in ((" word", False), ('a "quoted"\\ é 😀\n', True), ("", False)):
        entry: dict[str, object] = (
            {"index": 3, "delta": {"content": text}, "logprobs": None}
            if chat
            else {"index": 3, "text": text, "logprobs": None}
        )
        entry["finish_reason"] = "length" if finished else None
        entry["stop_reason"] = None
        assert token_event(prefix, 3, text, finished, chat=chat) == sse_event({**head, "choices": [entry]})


async def test_metrics_exposition_parses_with_vllm_names(pool: SimPool, http: aiohttp.ClientSession) -> None:
    base = pool.descriptors[0].http_url
    usages = []
    for _ in range(3):
        _, reply, _ = await post(http, base + "/v1/completions", {"prompt": words("m", 50), "max_tokens": 6})
        usages.append(reply["usage"])
    async with http.get(base + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, sample: str) -> float:
        return next(s.value for s in families[name].samples if s.name == sample)

    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge"
        assert families[name].samples[0].labels == {"model_name": MODEL, "engine": "0"}
    assert value("vllm:num_requests_running", "vllm:num_requests_running") == 0
    assert 0 <= value("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") <= 1
    info = families["vllm:cache_config_info"].samples[0].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "256")
    assert families["vllm:prefix_cache_queries"].type == "counter"
    prompt = len(load().encode(words("m", 50)))
    assert value("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 3 * prompt
    hits = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    cached_per_repeat = (prompt - 1) // 16 * 16
    assert value("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == hits == 2 * cached_per_repeat
    assert value("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 3 * prompt
    assert value("vllm:generation_tokens", "vllm:generation_tokens_total") == 18
    for name, count in (
        ("vllm:time_to_first_token_seconds", 3),
        ("vllm:inter_token_latency_seconds", 15),
        ("vllm:e2e_request_latency_seconds", 3),
    ):
        assert families[name].type == "histogram"
        assert value(name, name + "_count") == count
        buckets = [s for s in families[name].samples if s.name == name + "_bucket"]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count


async def test_step_times_follow_the_latency_model_not_the_timer(http: aiohttp.ClientSession) -> None:
    config = PoolConfig(speed=50.0, engine=EngineConfig(capacity_blocks=64))
    async with SimPool(1, config) as single:
        base = single.descriptors[0].http_url
        await post(http, base + "/v1/completions", {"prompt": "a b c d", "max_tokens": 21})
        itl = single.workers[0].engine.metrics.itl
    # 20 back-to-back batch-1 decode steps at contexts prompt + 1 .. prompt + 20.
    prompt = len(load().encode("a b c d"))
    expected = sum(LatencyModel().decode_time(1, ctx) for ctx in range(prompt + 1, prompt + 21))
    assert itl.count == 20
    assert itl.sum == pytest.approx(expected, rel=1e-6)


async def test_client_disconnect_aborts_and_frees_the_request() -> None:
    config = PoolConfig(speed=1.0, engine=EngineConfig(capacity_blocks=64))
    async with SimPool(1, config) as single, aiohttp.ClientSession() as session:
        engine = single.workers[0].engine
        body = {"prompt": words("d", 20), "max_tokens": 500, "stream": True}
        async with session.post(single.descriptors[0].http_url + "/v1/completions", json=body) as response:
            assert (await response.content.readline()).startswith(b"data: ")
            assert engine.num_running == 1 and engine.pool.num_used > 0
            response.connection.close()  # type: ignore[union-attr]
        async with asyncio.timeout(DEADLINE_S):
            while engine.metrics.requests_aborted == 0:
                await asyncio.sleep(0.01)
        assert engine.num_running == 0 and engine.pool.num_used == 0
        assert engine.metrics.requests_finished == 0


# -- KV events -------------------------------------------------------------------------


class Subscriber:
    """A real SUB consumer: decodes with the codec, reference-counts hashes, fills gaps by replay."""

    def __init__(self, context: zmq.asyncio.Context, worker: WorkerDescriptor, legacy: bool) -> None:
        self.worker = worker
        self.legacy = legacy
        self.context = context
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.batches: dict[int, bytes] = {}
        self.live_seqs: list[int] = []
        self.topics: set[bytes] = set()

    async def connect(self) -> None:
        monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.socket.subscribe(b"")
        self.socket.connect(self.worker.kv_endpoint)
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), DEADLINE_S))
        assert event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        self.socket.disable_monitor()
        monitor.close(linger=0)

    async def drain_until(self, last_seq: int) -> None:
        """Receive live batches until ``last_seq`` arrived or the stream went quiet after a gap."""
        while last_seq not in self.batches:
            try:
                frames = await asyncio.wait_for(self.socket.recv_multipart(), 0.5)
            except TimeoutError:
                return  # the rest was lost; replay fills it
            topic, seq_frame, payload = frames
            self.topics.add(topic)
            seq = decode_seq(seq_frame)
            self.live_seqs.append(seq)
            self.batches[seq] = payload

    def missing(self, last_seq: int) -> list[int]:
        return [seq for seq in range(last_seq + 1) if seq not in self.batches]

    async def replay(self, start: int) -> list[int]:
        assert self.worker.replay_endpoint is not None
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.worker.replay_endpoint)
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        got: list[int] = []
        try:
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), DEADLINE_S)
                if self.legacy:
                    empty, seq_frame, payload = frames
                else:
                    empty, topic, seq_frame, payload = frames
                    assert topic == self.worker.topic.encode()
                assert empty == b""
                if seq_frame == REPLAY_END_FRAME:
                    assert payload == b""
                    return got
                seq = decode_seq(seq_frame)
                got.append(seq)
                self.batches.setdefault(seq, payload)
        finally:
            dealer.close(linger=0)

    def held_hashes(self) -> tuple[Counter[int], int, int]:
        held: Counter[int] = Counter()
        stored = removed = 0
        for seq in sorted(self.batches):
            decoded = decode_batch(self.batches[seq])
            assert decoded.bad_events == []
            for event in decoded.batch.events:
                if isinstance(event, BlockStored):
                    held.update(event.block_hashes)
                    stored += len(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    for h in event.block_hashes:
                        held[h] -= 1
                        assert held[h] >= 0
                        if held[h] == 0:
                            del held[h]
                    removed += len(event.block_hashes)
        return held, stored, removed

    def close(self) -> None:
        self.socket.close(linger=0)


async def evicting_workload(session: aiohttp.ClientSession, url: str, rounds: range = range(4)) -> None:
    """4-block prompts (some sharing a 2-block prefix, some repeated) through a 24-block cache.

    Each request also fills a fifth block while decoding; three run at a time.
    """
    shared = words("shared", 32)
    for round_ in rounds:
        batch = [
            {"prompt": words(f"p{(round_ * 2) % 7}x", 64), "max_tokens": 24},
            {"prompt": words(f"p{(round_ * 2 + 1) % 7}x", 64), "max_tokens": 24},
            {"prompt": f"{shared} {words(f'r{round_}x', 32)}", "max_tokens": 24},
        ]
        replies = await asyncio.gather(*(post(session, url, body) for body in batch))
        assert all(status == 200 for status, _, _ in replies)
        await post(session, url, {"prompt": words(f"s{round_}x", 40), "max_tokens": 20})


async def wait_idle(worker: SimWorker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while worker.engine.has_work:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("legacy", [False, True], ids=["tagged", "legacy"])
async def test_event_stream_reproduces_the_cached_hash_set(legacy: bool, http: aiohttp.ClientSession) -> None:
    config = PoolConfig(speed=1000.0, legacy_events=legacy, engine=EngineConfig(capacity_blocks=24))
    context = zmq.asyncio.Context()
    async with SimPool(1, config) as single:
        worker = single.workers[0]
        subscriber = Subscriber(context, single.descriptors[0], legacy)
        try:
            await subscriber.connect()
            await evicting_workload(http, single.descriptors[0].http_url + "/v1/completions")
            await wait_idle(worker)
            assert worker.publisher is not None
            last = worker.publisher.next_seq - 1
            await subscriber.drain_until(last)
            # After the subscription took effect nothing is lost live; batches published
            # before that (ZMQ's slow joiner) come from replay, as a real consumer does it.
            live = subscriber.live_seqs
            assert live == list(range(live[0], last + 1))
            if live[0] > 0:
                assert await subscriber.replay(0) == list(range(last + 1))
            assert subscriber.missing(last) == []
            assert subscriber.topics == {single.descriptors[0].topic.encode()}
            assert subscriber.live_seqs == sorted(subscriber.live_seqs)
            held, stored, removed = subscriber.held_hashes()
            assert last >= 10
            assert removed > 20 and stored > 48  # the cache turned over twice
            assert held == worker.engine.cached_wire_hashes()
        finally:
            subscriber.close()
    context.term()


@pytest.mark.parametrize("legacy", [False, True], ids=["tagged", "legacy"])
async def test_dropped_batch_is_recovered_by_replay(legacy: bool, http: aiohttp.ClientSession) -> None:
    config = PoolConfig(speed=1000.0, legacy_events=legacy, engine=EngineConfig(capacity_blocks=24))
    context = zmq.asyncio.Context()
    async with SimPool(1, config) as single:
        worker = single.workers[0]
        assert worker.publisher is not None
        subscriber = Subscriber(context, single.descriptors[0], legacy)
        try:
            await subscriber.connect()
            url = single.descriptors[0].http_url + "/v1/completions"
            await evicting_workload(http, url, range(1))
            await wait_idle(worker)
            joined = worker.publisher.next_seq - 1
            await subscriber.drain_until(joined)
            if subscriber.missing(joined):
                await subscriber.replay(0)
            dropped = worker.publisher.next_seq + 1
            worker.publisher.drop_seq(dropped)
            await evicting_workload(http, url, range(1, 4))
            await wait_idle(worker)
            last = worker.publisher.next_seq - 1
            await subscriber.drain_until(last)
            assert dropped not in subscriber.live_seqs and dropped + 1 in subscriber.live_seqs
            assert subscriber.missing(last) == [dropped]
            replayed = await subscriber.replay(dropped)
            assert replayed == list(range(dropped, last + 1))
            assert subscriber.missing(last) == []
            held, _, removed = subscriber.held_hashes()
            assert removed > 0
            assert held == worker.engine.cached_wire_hashes()
            # A malformed replay request is counted and ignored; the same connection is
            # served again afterwards (one connection keeps its order).
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(single.descriptors[0].replay_endpoint or "")
            await dealer.send_multipart([b"", b"short"])
            await dealer.send_multipart([b"", last.to_bytes(8, "big")])
            answer = await asyncio.wait_for(dealer.recv_multipart(), DEADLINE_S)
            dealer.close(linger=0)
            assert decode_seq(answer[-2]) == last
            assert worker.publisher.bad_replay_requests == 1
        finally:
            subscriber.close()
    context.term()


# -- pool and CLI ----------------------------------------------------------------------


async def test_pool_workers_have_distinct_endpoints(pool: SimPool, http: aiohttp.ClientSession) -> None:
    first, second = pool.descriptors
    assert len({first.http_port, first.kv_port, first.replay_port, second.http_port, second.kv_port}) == 5
    # vLLM's default topic is the empty string.
    assert first.topic == "" and second.topic == ""
    for descriptor in pool.descriptors:
        _, _, served_by = await post(
            http, descriptor.http_url + "/v1/completions", {"prompt": "a", "max_tokens": 1}
        )
        assert served_by == descriptor.name
    assert pool.worker("sim-1").engine.metrics.requests_finished == 1


async def test_llm_d_topic_convention_is_an_option() -> None:
    async with SimPool(1, PoolConfig(speed=1000.0, topic=LLMD_TOPIC)) as single:
        descriptor = single.descriptors[0]
        assert descriptor.topic == f"kv@127.0.0.1:{descriptor.http_port}@{MODEL}"
    with pytest.raises(ValueError, match="placeholder"):
        PoolConfig(topic="kv@{pod}").worker_config(0)


def test_cli_serves_until_interrupted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        # --served-model-name: vLLM's own flag for the name clients ask for.
        [
            sys.executable,
            "-m",
            "scheduler",
            "sim",
            "--workers",
            "2",
            "--speed",
            "100",
            "--json",
            "--served-model-name",
            "team-llama",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        workers = json.loads(line)["workers"]
        assert [w["name"] for w in workers] == ["sim-0", "sim-1"]
        assert all(w["kv_endpoint"].startswith("tcp://127.0.0.1:") for w in workers)

        async def health() -> tuple[list[int], list[str]]:
            async with aiohttp.ClientSession() as session:
                statuses, models = [], []
                for w in workers:
                    async with session.get(w["http_url"] + "/health") as response:
                        statuses.append(response.status)
                    async with session.get(w["http_url"] + "/v1/models") as response:
                        models += [m["id"] for m in (await response.json())["data"]]
                return statuses, models

        assert asyncio.run(health()) == ([200, 200], ["team-llama", "team-llama"])
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_engine_restart_starts_empty_and_the_production_subscriber_follows(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM's engine core restarted under a live HTTP server: an empty cache, the KV-event
    sequence from 0 on the same ports. A request arriving meanwhile waits and is served, and
    kvsched's subscriber sees the restart and ends with exactly the new cache."""
    config = PoolConfig(speed=1000.0, engine=EngineConfig(capacity_blocks=24))
    context = zmq.asyncio.Context()
    async with SimPool(1, config) as single:
        worker, descriptor = single.workers[0], single.descriptors[0]
        assert worker.publisher is not None
        publisher = worker.publisher
        index = PrefixIndex(IndexConfig(block_size=worker.config.engine.block_size))
        subscriber = KVEventSubscriber(
            SubscriberConfig("w", descriptor.kv_endpoint, descriptor.replay_endpoint),
            index,
            context=context,
        )
        await subscriber.start()

        async def caught_up() -> None:
            async with asyncio.timeout(DEADLINE_S):
                while subscriber.snapshot()["ranks"][0]["next_seq"] != publisher.next_seq:
                    await asyncio.sleep(0.01)

        try:
            url = descriptor.http_url + "/v1/completions"
            joins = itertools.count()

            async def until_seen(restarts: int, applied: int = 0) -> None:
                # ZMQ's slow joiner: a PUB drops what it sends before a subscription reaches
                # it and gives no sign of one (after a restart too, until the SUB reconnects);
                # new prompts until a batch got through, replay recovers the rest.
                async with asyncio.timeout(DEADLINE_S):
                    while (
                        subscriber.snapshot()["ranks"][0]["next_seq"] is None
                        or subscriber.stats.restarts + subscriber.stats.disconnects < restarts
                        or subscriber.stats.batches_applied <= applied
                    ):
                        await post(http, url, {"prompt": words(f"join{next(joins)}x", 32), "max_tokens": 1})

            await until_seen(restarts=0)
            await evicting_workload(http, url, range(2))
            await wait_idle(worker)
            await caught_up()
            before = len(worker.engine.cached_wire_hashes())
            assert before > 0 and index.worker_blocks("w") == before
            restart = asyncio.create_task(worker.restart_engine())
            status, reply, _ = await post(http, url, {"prompt": words("during", 64), "max_tokens": 4})
            await restart
            applied = subscriber.stats.batches_applied
            assert status == 200 and reply["usage"]["completion_tokens"] == 4
            assert worker.engine.has_work or len(worker.engine.cached_wire_hashes()) < before
            await until_seen(restarts=1, applied=applied)
            await evicting_workload(http, url, range(5, 6))
            await wait_idle(worker)
            await caught_up()
            # Seen as the connection dropping, or as the sequence going back if a batch of the
            # new process arrived first.
            assert subscriber.stats.disconnects + subscriber.stats.restarts >= 1
            held = len(worker.engine.cached_wire_hashes())
            assert held > 0 and index.worker_blocks("w") == held
        finally:
            await subscriber.stop()
    context.term()
