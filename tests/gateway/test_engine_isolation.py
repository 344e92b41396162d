"""One bad request fails alone: a request whose settings the sampler refuses (a seed past what
torch takes; the API refuses it earlier, this is the engine's own guard) gets its 400 while a
request already decoding beside it finishes normally."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.backends.base import Chunk, GenerationParams, GenerationRequest, Usage
from gateway.backends.embedded import EmbeddedBackend
from gateway.config import EmbeddedModelConfig
from gateway.errors import InvalidRequest


def request(seed: int | None, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r{seed}",
        model="smollm2",
        params=GenerationParams(max_tokens=max_tokens, temperature=0.7, seed=seed, ignore_eos=True),
        messages=({"role": "user", "content": "Count to twenty."},),
    )


async def test_a_refused_seed_fails_its_request_only(model_path: Path) -> None:
    backend = EmbeddedBackend(EmbeddedModelConfig(name="smollm2", dtype="float32"), model_path)
    await backend.start()
    try:
        running = backend.stream(request(7, 48))
        first = await anext(running)  # decoding has begun
        assert isinstance(first, Chunk)
        with pytest.raises(InvalidRequest) as info:  # (it used to hang: bounded here)
            await asyncio.wait_for(backend.generate(request(2**64, 8)), timeout=60)
        assert "seed" in info.value.message.lower() or "sampling" in info.value.message.lower()
        rest = [event async for event in running]
        assert isinstance(rest[-1], Usage) and rest[-1].completion_tokens == 48
        again = await asyncio.wait_for(backend.generate(request(3, 4)), timeout=60)
        assert again.usage.completion_tokens == 4  # the engine kept serving
    finally:
        await backend.aclose()
