"""ONNX Runtime's int4 kernel (``ort_int4.py``): the packing ``MatMulNBits`` reads, the layer
graphs against the same weights computed op by op, LoRA adapters beside them, and the cache."""

from __future__ import annotations

import pytest
import torch

from gateway.backends import ort_int4
from gateway.backends.llama import LlamaRunner, PrefillItem
from gateway.backends.ort_int4 import NBITS_GROUP, NBitsWeight
from tests.engine_helpers import chat_ids, tables_for

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]


def exact_weight(bits: int, out: int = 48, inp: int = 96) -> torch.Tensor:
    """A weight that each format stores without loss: 4 bits, llama.cpp's Q4_1 (every group of
    32 is ``q * scale + low`` with q in 0..15, both ends present); 8 bits, symmetric (``q *
    scale`` with q in -127..127, 127 or -127 present)."""
    torch.manual_seed(bits)
    groups = inp // NBITS_GROUP
    scale = torch.randint(1, 4, (out, groups, 1)) / 64
    if bits == 4:
        q = torch.randint(0, 16, (out, groups, NBITS_GROUP))
        q[..., 0], q[..., 1] = 0, 15
        low = torch.randint(-8, 8, (out, groups, 1)) / 8
        return (q * scale + low).view(out, inp).float()
    q = torch.randint(-127, 128, (out, groups, NBITS_GROUP))
    q[..., 0] = 127
    return (q * scale).view(out, inp).float()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_lossless_and_read_by_the_kernel_as_written(bits: int) -> None:
    """``dequantize`` gives back an exactly representable weight, and the kernel's product is
    that weight's up to the int8 rounding of the activations (about 1% of the largest product);
    a weight whose nibbles or groups were misplaced would be off by the whole product."""
    weight = exact_weight(bits)
    packed = NBitsWeight.quantize(weight, bits)
    assert torch.equal(packed.dequantize(), weight)
    assert packed.packed.numel() == weight.numel() * bits // 8
    x = torch.randn(5, weight.shape[1])
    expected = x @ weight.T
    got = packed(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 0.02
    shuffled = NBitsWeight.quantize(weight.flip(1), bits)  # the same values, other places
    assert (shuffled(x) - expected).abs().max() / expected.abs().max() > 0.2
    assert not NBitsWeight.fits(torch.zeros(48, 80))


def ort_runner(model_path, **kwargs) -> LlamaRunner:  # type: ignore[no-untyped-def]
    return LlamaRunner.from_pretrained(
        model_path,
        max_slots=4,
        max_len=256,
        dtype=torch.float32,
        device=torch.device("cpu"),
        quant="int4",
        int4_kernel="onnxruntime",
        **kwargs,
    )


def test_layer_graphs_compute_what_the_ops_do_one_by_one(
    model_path, tokenizer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Two prompts prefilled and decoded eight steps through the layer graphs (one session per
    layer) and through the same weights op by op (PyTorch's norms and SiLU, one session per
    matmul), with the kernel multiplying in float32 (``ACCURACY_LEVEL`` 0; the int8 activations
    of the default round differently for a last-bit difference of the input): the same logits
    up to float32 rounding at every step. A misplaced norm, residual or weight is far off."""
    monkeypatch.setattr(ort_int4, "ACCURACY_LEVEL", 0)
    graphs = ort_runner(model_path)
    assert graphs._graphs_ort is not None
    ops = ort_runner(model_path)
    ops._graphs_ort = None
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]

    def run(runner: LlamaRunner, tokens: list[list[int]]) -> list[torch.Tensor]:
        tables = tables_for(runner, len(prompts))
        items = [PrefillItem(p, 0, t) for p, t in zip(prompts, tables, strict=True)]
        out = [runner.prefill(items).clone()]
        positions = [len(p) for p in prompts]
        for step in tokens:
            out.append(runner.decode(step, positions, tables).clone())
            positions = [p + 1 for p in positions]
        return out

    first = run(ops, [])
    tokens = [[int(row.argmax()) for row in first[0]]]
    reference = run(ops, tokens * 8)
    for a, b in zip(run(graphs, tokens * 8), reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(reference[0], reference[1], atol=1e-3)  # the steps differ


def test_quantized_weights_are_cached_and_read_back(model_path, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The second start reads the 4- and 8-bit weights from the cache file (quantizing nothing)
    and holds the same bytes, in a file of its own (not the torch kernel's int4 file)."""
    monkeypatch.setenv("RAGLINE_MODELS_DIR", str(tmp_path))
    first = LlamaRunner.from_pretrained(
        model_path,
        max_slots=1,
        max_len=64,
        dtype=torch.float32,
        device=torch.device("cpu"),
        quant="int4",
        int4_kernel="onnxruntime",
    )
    files = list((tmp_path / "engine").glob("*int4-onnxruntime-*.safetensors"))
    assert len(files) == 1

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantized again")

    with monkeypatch.context() as patch:
        patch.setattr(NBitsWeight, "quantize", refuse)
        second = LlamaRunner.from_pretrained(
            model_path,
            max_slots=1,
            max_len=64,
            dtype=torch.float32,
            device=torch.device("cpu"),
            quant="int4",
            int4_kernel="onnxruntime",
        )
    for a, b in zip(first.layers, second.layers, strict=True):
        for name in ("qkv", "o", "gate_up", "down"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x.packed, y.packed) and torch.equal(x.offsets, y.offsets)
            assert torch.equal(x.scales, y.scales) and y.bits == 4
    assert second.lm_head.bits == 8 and torch.equal(first.lm_head.packed, second.lm_head.packed)


def test_sessions_made_after_the_engines_run_on_its_pool(model_path) -> None:  # type: ignore[no-untyped-def]
    """Once the engine made ONNX Runtime's process-wide thread pool, the runtime refuses a session
    with a pool of its own: the embedding encoders made later (RAG queries and documents, the
    safety classifier's features) run on the shared pool instead of falling back to PyTorch."""
    from rag.embeddings import SentenceTransformerEmbedder

    ort_runner(model_path)  # makes the pool, or finds it made
    embedder = SentenceTransformerEmbedder()
    vectors = embedder.embed(["a sentence", "another one"])
    assert embedder.backend == "onnx" and vectors.shape == (2, embedder.dim)
    documents = embedder.embed_documents(["a sentence"])
    assert embedder._documents is not embedder._model  # the int8 document encoder loaded
    assert float((documents[0] * vectors[0]).sum()) > 0.99
