"""``make bench``'s weight formats: what each name asks the embedded engine for."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.engine import (
    COLD_PROMPT,
    COLD_PROMPT_TOKENS,
    QUANTIZED_PREFILL,
    _backend,
    _user,
    run_cold_ttft,
)


def test_a_qprefill_format_turns_the_dense_prefill_off(tmp_path: Path) -> None:
    args = argparse.Namespace(device="cpu", streams=[1, 8])
    default = _backend(tmp_path, args, "int4").config
    quantized = _backend(tmp_path, args, "int4" + QUANTIZED_PREFILL).config
    assert default.quantization == quantized.quantization == "int4"
    assert default.dense_prefill and not quantized.dense_prefill
    assert _backend(tmp_path, args, "auto").config.dense_prefill  # the default, as served
    assert _backend(tmp_path, args, "float32").config.quantization == "none"
    ort = _backend(tmp_path, args, "int4-onnxruntime").config
    assert ort.quantization == "int4" and ort.int4_kernel == "onnxruntime"
    torch_qprefill = _backend(tmp_path, args, "int4-torch" + QUANTIZED_PREFILL).config
    assert torch_qprefill.int4_kernel == "torch" and not torch_qprefill.dense_prefill
    assert default.int4_kernel == "auto"


async def test_the_cold_ttft_computes_the_whole_40_token_prompt(model_path: Path) -> None:
    """The cold row's prompt is 40 tokens with the chat template, none of it comes from the
    prefix cache, and the cache is on again after."""
    from gateway.backends.base import GenerationParams, GenerationRequest
    from gateway.backends.embedded import EmbeddedBackend
    from gateway.config import EmbeddedModelConfig

    backend = EmbeddedBackend(EmbeddedModelConfig(name="m", dtype="float32"), model_path)
    await backend.start()
    try:
        request = GenerationRequest(
            request_id="t", model="m", params=GenerationParams(), messages=_user(COLD_PROMPT)
        )
        assert len(await backend.prompt_ids(request)) == COLD_PROMPT_TOKENS == 40
        assert await run_cold_ttft(backend) > 0
        stats = backend.stats()
        assert stats["prefix_hit_tokens"] == 0  # six requests of the same prompt, none reused
        assert backend._scheduler is not None and backend._scheduler.pool.prefix_caching
    finally:
        await backend.aclose()
