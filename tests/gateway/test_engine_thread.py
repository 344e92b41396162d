"""The embedded engine's thread and default weights.

One thread loads the model and runs every forward pass: PyTorch's OpenMP pool belongs to the
thread that runs a parallel op, and a second pool kept alive by a loader thread made a decode
step about twice as slow on two cores (README, "The engine's own thread"). On CPU, ``auto``
picks int4 weights unless the config sets a dtype (float32 for exact parity stays float32)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from gateway.backends import embedded
from gateway.backends.base import Chunk, GenerationParams, GenerationRequest
from gateway.backends.embedded import (
    EmbeddedBackend,
    choose_dense_prefill,
    choose_dtype,
    choose_int4_kernel,
    choose_quantization,
)
from gateway.backends.llama import LlamaRunner
from gateway.backends.quant import on_cpu_with_bf16
from gateway.config import EmbeddedModelConfig


def test_auto_picks_int4_on_cpu_only_when_no_dtype_is_set() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_quantization("auto", cpu) == "int4"
    assert choose_quantization("auto", cpu, "float32") == "none"  # parity tests ask for float32
    assert choose_quantization("auto", cpu, "bfloat16") == "none"
    assert choose_quantization("auto", cuda) == "none"
    assert choose_quantization("none", cpu) == "none"
    assert choose_quantization("int8", cpu, "float32") == "int8"  # asked for: always
    assert choose_quantization("int4", cpu, "bfloat16") == "int4"


def test_int4_kernel_is_onnxruntimes_by_default() -> None:
    assert choose_int4_kernel("auto", "int4") == "onnxruntime"  # its decode step is one graph
    assert choose_int4_kernel("torch", "int4") == "torch"
    assert choose_int4_kernel("onnxruntime", "int4") == "onnxruntime"
    assert choose_int4_kernel("onnxruntime", "int8") == "torch"  # int4 only
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu, True, "onnxruntime") == torch.float32  # what it takes
    assert choose_dtype("auto", cpu, True, "torch") == torch.bfloat16
    # its copy is int8 (QGemmWeight), named by its weights' dtype
    assert choose_dense_prefill(True, "int4", "onnxruntime") == torch.int8
    assert choose_dense_prefill(False, "int4", "onnxruntime") is None


def test_long_prompts_prefill_dense_by_default_with_quantized_weights_only() -> None:
    native = torch.bfloat16 if on_cpu_with_bf16() else torch.float32  # emulated bf16 is slow
    assert choose_dense_prefill(True, "int4") == native
    assert choose_dense_prefill(True, "int8") == native
    assert choose_dense_prefill(False, "int4") is None  # `dense_prefill: false`
    assert choose_dense_prefill(True, "none") is None
    assert EmbeddedModelConfig(name="m").dense_prefill


async def test_one_thread_loads_the_model_and_runs_it(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, set[int]] = {"load": set(), "prefill": set(), "decode": set()}
    loaded: list[LlamaRunner] = []
    load, prefill, decode = LlamaRunner.from_pretrained, LlamaRunner.prefill, LlamaRunner.decode

    def record(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[name].add(threading.get_ident())
            result = fn(*args, **kwargs)
            if name == "load":
                loaded.append(result)
            return result

        return wrapped

    monkeypatch.setattr(LlamaRunner, "from_pretrained", record("load", load))
    monkeypatch.setattr(LlamaRunner, "prefill", record("prefill", prefill))
    monkeypatch.setattr(LlamaRunner, "decode", record("decode", decode))
    backend = EmbeddedBackend(EmbeddedModelConfig(name="m"), model_path)
    await backend.start()
    try:
        assert backend.weights == "int4-onnxruntime"  # the default on every CPU
        (runner,) = loaded
        assert runner.dense_prefill == torch.int8  # on by default: the int8 copy
        assert runner._decode_graph is not None
        assert runner._prefill_graph is not None
        request = GenerationRequest(
            request_id="t",
            model="m",
            params=GenerationParams(max_tokens=8, temperature=0.0, ignore_eos=True),
            messages=({"role": "user", "content": "Name a colour."},),
        )
        result = await asyncio.wait_for(backend.generate(request), timeout=120)
        assert result.usage.completion_tokens == 8
        threads = seen["load"] | seen["prefill"] | seen["decode"]
        assert len(threads) == 1 and all(seen.values())
        assert threading.get_ident() not in threads  # not the event loop's thread
        (engine,) = [t for t in threading.enumerate() if t.ident in threads]
        assert engine.name == "ragline-engine"
    finally:
        await backend.aclose()
    assert not engine.is_alive()  # aclose stops it


async def test_a_first_token_goes_out_before_the_decode_step_after_its_prefill(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefill's first tokens are handed to the event loop at once; holding them until the
    decode step that follows had every TTFT pay for one more step (a whole batch's at eight
    streams). The first decode step waits here until the client has the first token."""
    delivered = threading.Event()
    seen_before_decode: list[bool] = []
    decode = LlamaRunner.decode

    def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not seen_before_decode:
            seen_before_decode.append(delivered.wait(timeout=60))
        return decode(*args, **kwargs)

    monkeypatch.setattr(LlamaRunner, "decode", gated)
    backend = EmbeddedBackend(EmbeddedModelConfig(name="m", dtype="float32"), model_path)
    await backend.start()
    try:
        request = GenerationRequest(
            request_id="t",
            model="m",
            params=GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True),
            messages=({"role": "user", "content": "Name a colour."},),
        )
        texts = []
        async for event in backend.stream(request):
            if isinstance(event, Chunk) and event.text:
                delivered.set()
                texts.append(event.text)
        assert seen_before_decode == [True] and len(texts) >= 2
    finally:
        await backend.aclose()


async def test_a_failed_load_reaches_start_and_leaves_no_thread(tmp_path: Path) -> None:
    backend = EmbeddedBackend(EmbeddedModelConfig(name="m"), tmp_path)  # no checkpoint here
    with pytest.raises(FileNotFoundError, match="ragline models pull"):
        await backend.start()
    assert backend.load_error is not None and not backend.ready
    assert not [t for t in threading.enumerate() if t.name == "ragline-engine"]


def test_a_scheduler_nobody_waits_for_is_stopped() -> None:
    """``start`` cancelled while loading: the loaded scheduler is told to stop, not left running."""

    class Stub:
        stopped = False

        def request_stop(self) -> None:
            self.stopped = True

    loop = asyncio.new_event_loop()
    try:
        loaded = loop.create_future()
        loaded.cancel()
        stub = Stub()
        embedded._settle(loaded, stub, None)  # type: ignore[arg-type]
        assert stub.stopped
    finally:
        loop.close()
