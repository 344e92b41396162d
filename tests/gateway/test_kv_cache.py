"""The paged KV cache: block bookkeeping on its own, then the embedded engine on the real model
(float32, greedy) under prefix reuse, forked choices, memory pressure and wide batches."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.backends.base import GenerationParams, GenerationRequest
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.kv_blocks import NULL_BLOCK, BlockPool, block_hashes
from gateway.config import EmbeddedModelConfig

SYSTEM = (
    "You are the help desk of a small public library. Answer in one or two short sentences, "
    "politely, and never invent opening hours or prices you were not given. "
) * 3
QUESTIONS = [
    "Can I renew a book online?",
    "Do you have books for children?",
    "How do I get a library card?",
    "Is there a quiet room for studying?",
]
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, 3 kv heads of 64, float32


# -- bookkeeping -------------------------------------------------------------------------------


def test_blocks_are_handed_out_once_and_come_back() -> None:
    pool = BlockPool(5, 4)
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4] and NULL_BLOCK not in got  # type: ignore[comparison-overlap]
    assert pool.allocate() is None and pool.available == 0 and pool.in_use == 4
    pool.release([got[0], got[1]])
    assert pool.available == 2 and pool.in_use == 2
    pool.share(got[2])  # a second owner: one release does not free it
    pool.release([got[2]])
    assert pool.refs(got[2]) == 1 and pool.available == 2


def test_prefix_hits_follow_the_chain_and_evict_least_recent_tails_first() -> None:
    pool = BlockPool(5, 2)
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = block_hashes(tokens, 2, b"0")
    assert len(hashes) == 3
    table = [pool.allocate() for _ in hashes]
    for block, digest in zip(table, hashes, strict=True):
        assert block is not None
        pool.register(block, digest)
    assert pool.lookup(block_hashes([1, 2, 3, 4, 9, 9], 2, b"0")) == table[:2]  # diverges
    assert pool.lookup(block_hashes(tokens, 2, b"1")) == []  # another adapter: no hit
    assert pool.lookup(block_hashes([3, 4, 5, 6], 2, b"0")) == []  # same block, other prefix
    pool.release(table)  # type: ignore[arg-type]
    assert pool.cached == 3 and pool.in_use == 0 and pool.available == 4
    fresh = pool.allocate()  # the free block goes first, cached content stays
    assert fresh not in table and pool.lookup(hashes) == table
    tail = pool.allocate()  # then the chain's tail is evicted, its head kept
    assert tail == table[2] and pool.lookup(hashes) == table[:2]


def test_caching_off_never_hits() -> None:
    pool = BlockPool(4, 2, prefix_caching=False)
    block = pool.allocate()
    assert block is not None
    digest = block_hashes([1, 2], 2, b"0")
    pool.register(block, digest[0])
    assert pool.lookup(digest) == []


# -- the engine --------------------------------------------------------------------------------


def config(**kwargs: object) -> EmbeddedModelConfig:
    base: dict[str, object] = {"name": "m", "dtype": "float32", "max_model_len": 256}
    return EmbeddedModelConfig(**(base | kwargs))  # type: ignore[arg-type]


def request(question: str, tokens: int, n: int = 1, system: str = SYSTEM) -> GenerationRequest:
    return GenerationRequest(
        request_id="t",
        model="m",
        params=GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        messages=({"role": "system", "content": system}, {"role": "user", "content": question}),
        n=n,
    )


async def texts(backend: EmbeddedBackend, req: GenerationRequest) -> list[str]:
    result = await asyncio.wait_for(backend.generate(req), timeout=300)
    return [c.text for c in result.choices]


async def test_prefix_hits_give_the_output_of_no_caching(model_path: Path) -> None:
    on = EmbeddedBackend(config(), model_path)
    off = EmbeddedBackend(config(prefix_caching=False), model_path)
    await on.start()
    await off.start()
    try:
        for question in QUESTIONS[:3]:
            assert await texts(on, request(question, 24)) == await texts(off, request(question, 24))
        stats_on, stats_off = on.stats(), off.stats()
        # the shared system prompt (well over 3 blocks) was computed once
        assert int(stats_on["prefix_hit_tokens"]) >= 2 * 3 * 16
        assert stats_off["prefix_hit_tokens"] == 0
        assert stats_on["kv_blocks_used"] == 0 and int(stats_on["kv_blocks_cached"]) > 0
        assert stats_off["kv_blocks_used"] == 0 and stats_off["kv_blocks_cached"] == 0
    finally:
        await on.aclose()
        await off.aclose()


async def test_choices_share_the_prompt_and_blocks_come_back(model_path: Path) -> None:
    backend = EmbeddedBackend(config(prefix_caching=False), model_path)
    await backend.start()
    try:
        one = await texts(backend, request(QUESTIONS[0], 40))
        assert await texts(backend, request(QUESTIONS[0], 40, n=3)) == one * 3  # greedy choices
        assert backend.stats()["kv_blocks_used"] == 0
    finally:
        await backend.aclose()


async def test_memory_pressure_preempts_and_loses_nothing(model_path: Path) -> None:
    """Four sequences of ~120 tokens (8 blocks each) in a cache of 23 blocks: they cannot all
    run at once; the engine preempts and resumes, and every output equals its unpressed run."""
    blocks = 24  # 23 usable: one full-length (256-token) sequence and 7 more
    small = EmbeddedBackend(
        config(kv_cache_gib=blocks * 16 * KV_BYTES_PER_TOKEN / 2**30, prefix_caching=False),
        model_path,
    )
    await small.start()
    try:
        alone = [await texts(small, request(q, 96, system="Be brief.")) for q in QUESTIONS]
        assert small.stats()["preemptions"] == 0
        together = await asyncio.gather(
            *(texts(small, request(q, 96, system="Be brief.")) for q in QUESTIONS)
        )
        stats = small.stats()
        assert stats["kv_blocks"] == blocks - 1
        assert int(stats["preemptions"]) >= 1
        assert list(together) == alone
        assert stats["kv_blocks_used"] == 0
    finally:
        await small.aclose()


async def test_batches_are_bounded_by_memory_not_the_old_slot_count(model_path: Path) -> None:
    """Twenty short sequences decode together in the memory sixteen full-length slots took."""
    backend = EmbeddedBackend(config(max_batch=24), model_path)
    await backend.start()
    try:
        outs = await asyncio.gather(
            *(texts(backend, request(f"Say a word about the number {i}.", 32)) for i in range(20))
        )
        assert all(len(o) == 1 and o[0] for o in outs)
        assert backend._scheduler is not None and backend._scheduler.peak_batch == 20
        assert backend.stats()["kv_blocks_used"] == 0
    finally:
        await backend.aclose()


async def test_a_cache_too_small_for_one_sequence_is_refused(model_path: Path) -> None:
    backend = EmbeddedBackend(config(kv_cache_gib=4 * 16 * KV_BYTES_PER_TOKEN / 2**30), model_path)
    with pytest.raises(ValueError, match="cannot hold one sequence of 256 tokens"):
        await backend.start()
    assert backend.load_error is not None and "cannot hold" in backend.load_error


async def test_a_key_scoped_cache_shares_nothing_between_keys(model_path: Path) -> None:
    """``prefix_cache_scope: key``: a key reuses its own prompt blocks, never another key's
    (so no key can time whether another sent a prompt); the default shares them."""
    backend = EmbeddedBackend(config(prefix_cache_scope="key"), model_path)
    await backend.start()

    def hits() -> int:
        return int(backend.stats()["prefix_hit_tokens"])

    try:
        alone = request(QUESTIONS[0], 4)
        await texts(backend, replace(alone, tenant="key-a"))
        assert hits() == 0
        await texts(backend, replace(request(QUESTIONS[1], 4), tenant="key-b"))
        assert hits() == 0  # the same system prompt, another key: computed again
        await texts(backend, replace(request(QUESTIONS[2], 4), tenant="key-a"))
        assert hits() >= 3 * 16  # key-a's own blocks
    finally:
        await backend.aclose()
