"""Text workloads: inference-perf's shared_prefix shape, built from a tokenizer's single-token
words, replayed live against simulated workers with the client counting tokens itself."""

from __future__ import annotations

from collections import Counter

from scheduler.replay.live import replay_live
from scheduler.replay.text import ClientTokenizer, text_workload
from scheduler.sim.pool import PoolConfig, SimPool
from scheduler.sim.tokenizer import MODEL_DIR
from scheduler.workloads.generators import shared_prefix
from scheduler.workloads.oracle import oracle_hit_ratio


def test_shared_prefix_has_inference_perfs_shape() -> None:
    workload = shared_prefix(seed=3, groups=8, prompts_per_group=4, system_tokens=64, question_tokens=8)
    assert len(workload.requests) == 32  # 240 asked, 32 prompts: each sent once
    assert [r.arrival_s for r in workload.requests[:3]] == [0.0, 0.25, 0.5]  # 4 req/s, constant
    prefixes = Counter(tuple(r.prompt_token_ids[:64]) for r in workload.requests)
    assert sorted(prefixes.values()) == [4] * 8
    assert all(len(r.prompt_token_ids) == 72 and r.prompt_text is None for r in workload.requests)
    again = shared_prefix(seed=3, groups=8, prompts_per_group=4, system_tokens=64, question_tokens=8)
    assert [r.prompt_token_ids for r in again.requests] == [r.prompt_token_ids for r in workload.requests]
    assert workload.requests[0].max_tokens == 64


def test_text_prompts_are_exactly_as_long_as_asked() -> None:
    tokenizer = ClientTokenizer(MODEL_DIR)
    words = tokenizer.single_token_words()
    assert len(words) > 5000
    workload = text_workload("shared_prefix", tokenizer, seed=1, requests=40)
    assert len(workload.requests) == 40
    for request in workload.requests:
        assert request.prompt_text is not None
        # <s>, then one token per word: 800 shared, 64 own.
        assert len(request.prompt_token_ids) == 1 + 800 + 64
    by_group = Counter(tuple(r.prompt_token_ids[:801]) for r in workload.requests)
    assert len(by_group) < 40 and max(by_group.values()) > 1
    # The best any router can do on the default run: each group's first prompt misses.
    full = text_workload("shared_prefix", tokenizer, seed=0)
    assert 0.6 < oracle_hit_ratio(full.requests, 16) < 0.75


async def test_client_counts_agree_with_the_workers_usage() -> None:
    tokenizer = ClientTokenizer(MODEL_DIR)
    workload = text_workload("shared_prefix", tokenizer, seed=2, requests=12).time_scaled(0.01)
    async with SimPool(1, PoolConfig(speed=1000.0)) as pool:
        url = pool.descriptors[0].http_url
        outcomes = await replay_live(workload, url, count_tokens=tokenizer.count)
        wrong = await replay_live(workload.limited(3), url, count_tokens=lambda text: 2)
    assert all(o.ok for o in outcomes)
    assert [o.prompt_tokens for o in outcomes] == [len(r.prompt_token_ids) for r in workload.requests]
    assert all(o.client_completion_tokens == o.completion_tokens == 64 for o in outcomes)
    assert not any(o.token_count_mismatch for o in outcomes)
    # Same prefix, same worker: the later prompts of a group are served from cache.
    assert sum(o.cached_tokens or 0 for o in outcomes) > 0
    assert all(o.token_count_mismatch for o in wrong)
