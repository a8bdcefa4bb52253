"""The prefix index facade: events in, per-worker per-tier prefix matches out."""

from __future__ import annotations

import json

import pytest

from scheduler.codec.kvevents import encode_batch
from scheduler.core import blockhash_ref
from scheduler.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier
from scheduler.core.index import IndexConfig, PrefixIndex, PrefixMatch

BLOCK = 4
BACKENDS = ["native", "reference"]


def _index(backend: str, **config: object) -> PrefixIndex:
    return PrefixIndex(IndexConfig(block_size=BLOCK, backend=backend, **config))  # type: ignore[arg-type]


def _stored(hashes: list[int], tokens: list[int], parent: int | None = None, **fields: object) -> BlockStored:
    return BlockStored(hashes, parent, tokens, BLOCK, **fields)  # type: ignore[arg-type]


def _apply(index: PrefixIndex, worker: str, *events: object) -> None:
    result = index.apply_batch(worker, EventBatch(0.0, list(events)))  # type: ignore[arg-type]
    assert result.errors == []


PROMPT = list(range(1, 4 * BLOCK + 1))  # four full blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_chained_stores_match_leading_blocks_per_worker(backend: str) -> None:
    index = _index(backend)
    _apply(
        index, "a", _stored([11, 12], PROMPT[: 2 * BLOCK]), _stored([13], PROMPT[2 * BLOCK : 3 * BLOCK], 12)
    )
    _apply(index, "b", _stored([11], PROMPT[:BLOCK]))
    matches = index.match_tokens([*PROMPT, 99])
    assert matches == {"a": PrefixMatch(3, 3, 0, 0), "b": PrefixMatch(1, 1, 0, 0)}
    # A different second block breaks the chain after block one.
    other = PROMPT[:BLOCK] + [7] * BLOCK
    assert index.match_tokens(other) == {"a": PrefixMatch(1, 1, 0, 0), "b": PrefixMatch(1, 1, 0, 0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiers_split_by_fastest_tier(backend: str) -> None:
    index = _index(backend)
    _apply(index, "a", _stored([1, 2], PROMPT[: 2 * BLOCK], medium=Tier.CPU))
    _apply(index, "a", _stored([1], PROMPT[:BLOCK], medium=Tier.GPU))
    _apply(index, "a", _stored([3], PROMPT[2 * BLOCK : 3 * BLOCK], 2, medium=Tier.STORAGE))
    assert index.match_tokens(PROMPT)["a"] == PrefixMatch(3, 1, 1, 1)
    _apply(index, "a", BlockRemoved([1], Tier.GPU))
    assert index.match_tokens(PROMPT)["a"] == PrefixMatch(3, 0, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_stores_are_reference_counted(backend: str) -> None:
    index = _index(backend)
    _apply(index, "a", _stored([1], PROMPT[:BLOCK]), _stored([1], PROMPT[:BLOCK]))
    _apply(index, "a", BlockRemoved([1]))
    assert index.match_tokens(PROMPT)["a"].total_blocks == 1
    _apply(index, "a", BlockRemoved([1]))
    assert index.match_tokens(PROMPT) == {}
    # A removal too many is counted, not fatal.
    _apply(index, "a", BlockRemoved([1]))
    assert index.unknown_removals >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_full_attention_groups_are_skipped(backend: str) -> None:
    index = _index(backend)
    window = _stored([1], PROMPT[:BLOCK], group_idx=1, kv_cache_spec_kind="sliding_window")
    full = _stored([1], PROMPT[:BLOCK], group_idx=0, kv_cache_spec_kind="full_attention")
    result = index.apply_batch("a", EventBatch(0.0, [window, full]))
    assert result.skipped == 1 and result.stored == 1
    # The sliding-window group's removal of the same bare hash must not touch group 0.
    index.apply_batch("a", EventBatch(0.0, [BlockRemoved([1], group_idx=1)]))
    assert index.match_tokens(PROMPT)["a"].total_blocks == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_remove_worker_and_orphans(backend: str) -> None:
    index = _index(backend)
    _apply(index, "a", _stored([1, 2], PROMPT[: 2 * BLOCK]))
    _apply(index, "b", _stored([1, 2], PROMPT[: 2 * BLOCK]))
    _apply(index, "a", AllBlocksCleared())
    assert set(index.match_tokens(PROMPT)) == {"b"}
    # After the clear, a block chained to a parent "a" no longer reports is an orphan.
    orphan = index.apply_batch("a", EventBatch(0.0, [_stored([3], PROMPT[2 * BLOCK : 3 * BLOCK], 2)]))
    assert orphan.orphans == 1 and orphan.stored == 0
    index.remove_worker("b")
    assert index.match_tokens(PROMPT) == {}
    assert index.num_blocks == 0
    assert "b" not in index.workers


HASH_MODES = ["own", "vllm"]


@pytest.mark.parametrize("hash_mode", HASH_MODES)
@pytest.mark.parametrize("path", ["codec", "kernel"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_chained_to_a_parent_the_worker_never_reported_is_an_orphan(
    backend: str, path: str, hash_mode: str
) -> None:
    """Both hash modes: a BlockStored whose parent this worker never reported (although
    another worker did) changes nothing and is counted, on the codec path and the kernel's."""
    if backend == "reference" and path == "kernel":
        pytest.skip("the reference backend has no kernel decoder")
    index = _index(backend, hash_mode=hash_mode)
    # vLLM-mode keys are the engine's hashes; own-mode keys come from the tokens.
    hashes = list(index.request_keys(PROMPT)) if hash_mode == "vllm" else [1, 2, 3, 4]

    def apply(worker: str, *events: object) -> tuple[int, int]:
        batch = EventBatch(0.0, list(events))  # type: ignore[arg-type]
        if path == "kernel":
            applied = index.apply_payload(worker, encode_batch(batch))
            assert applied is not None, "the kernel declined a well-formed batch"
            result = applied[0]
        else:
            result = index.apply_batch(worker, batch)
        assert result.errors == []
        return result.stored, result.orphans

    assert apply("a", _stored(hashes[:2], PROMPT[: 2 * BLOCK])) == (2, 0)
    assert apply("b", _stored(hashes[:1], PROMPT[:BLOCK])) == (1, 0)
    # "b" never reported block two, although "a" holds it.
    assert apply("b", _stored(hashes[2:3], PROMPT[2 * BLOCK : 3 * BLOCK], hashes[1])) == (0, 1)
    assert apply("a", AllBlocksCleared()) == (0, 0)
    assert apply("a", _stored(hashes[2:3], PROMPT[2 * BLOCK : 3 * BLOCK], hashes[1])) == (0, 1)
    assert index.match_tokens(PROMPT) == {"b": PrefixMatch(1, 1, 0, 0)}
    assert index.worker_blocks("a") == 0 and index.num_blocks == 1
    assert index.stats.orphans == 2
    # Chained onto a parent it did report, the same block is stored.
    assert apply("b", _stored(hashes[1:3], PROMPT[BLOCK : 3 * BLOCK], hashes[0])) == (2, 0)
    assert index.match_tokens(PROMPT) == {"b": PrefixMatch(3, 3, 0, 0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_size_mismatch_is_a_clear_error(backend: str) -> None:
    index = _index(backend)
    wrong = BlockStored([1], None, list(range(16)), 16)
    result = index.apply_batch("a", EventBatch(0.0, [wrong]))
    assert result.stored == 0
    assert "block_size 16" in result.errors[0] and "--block-size" in result.errors[0]
    assert index.stats.event_errors == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bound_evicts_least_recently_used(backend: str) -> None:
    index = _index(backend, max_blocks=4)
    _apply(index, "a", _stored([1, 2], PROMPT[: 2 * BLOCK]))
    other = [50 + t for t in PROMPT]
    _apply(index, "a", _stored([5, 6, 7], other[: 3 * BLOCK]))
    assert index.num_blocks <= 4
    assert index.evictions >= 1
    assert index.bytes_per_block() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vllm_hash_mode_matches_engine_hashes(backend: str, shared_dir) -> None:  # type: ignore[no-untyped-def]
    vectors = json.loads((shared_dir / "vectors" / "vllm_kv_events.json").read_text())
    case = vectors["sha256_cbor"][0]
    index = PrefixIndex(IndexConfig(block_size=16, hash_mode="vllm", backend=backend))  # type: ignore[arg-type]
    # Events without token ids, as from a pool that does not publish them.
    stored = BlockStored([case["block0_wire_int"], case["block1_wire_int"]], None, [], 16)
    assert index.apply_batch("a", EventBatch(0.0, [stored])).stored == 2
    assert index.match_tokens(list(range(1, 33)))["a"].total_blocks == 2
    assert index.match_tokens(list(range(1, 17)) + [0] * 16)["a"].total_blocks == 1


def test_own_keys_depend_on_lora_and_extra_keys() -> None:
    index = _index("native")
    plain = list(index.request_keys(PROMPT))
    assert list(index.request_keys(PROMPT, lora_id=3)) != plain
    assert list(index.request_keys(PROMPT, extra_keys=[("cache_salt", "t1")])) != plain
    ref = blockhash_ref.own_block_keys(PROMPT, BLOCK, blockhash_ref.own_root_key(0))
    assert plain == ref


def test_too_many_workers_is_a_clear_error() -> None:
    index = _index("native", max_workers=1)
    _apply(index, "a", _stored([1], PROMPT[:BLOCK]))
    with pytest.raises(ValueError, match="max_workers"):
        index.apply_batch("b", EventBatch(0.0, [_stored([1], PROMPT[:BLOCK])]))
