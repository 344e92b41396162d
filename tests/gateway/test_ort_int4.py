"""ONNX Runtime's int4 kernel (``ort_int4.py``): the packing ``MatMulNBits`` reads, the layer
graphs against the same weights computed op by op, LoRA adapters beside them, and the cache."""

from __future__ import annotations

import pytest
import torch

from gateway.backends import ort_int4
from gateway.backends.kv_rows import rows_of, rows_to_read
from gateway.backends.llama import LlamaRunner, PrefillItem
from gateway.backends.ort_int4 import NBITS_GROUP, QGEMM_MAX, NBitsWeight, QGemmWeight
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


def test_the_int8_copy_quantizes_each_row_of_activations_apart() -> None:
    """The prefill copy (``QGemmWeight``): a weight of 7-bit steps per output channel is stored
    without loss, and the integer GEMM's product is within the int8 rounding of each row of
    activations, even beside a row a hundred times larger (one scale for the whole matrix, as
    ``DynamicQuantizeMatMul`` has, would leave the other rows a step or two of 127)."""
    torch.manual_seed(0)
    steps = torch.randint(-QGEMM_MAX, QGEMM_MAX + 1, (48, 96))
    steps[:, 0] = QGEMM_MAX
    weight = (steps * torch.rand(48, 1)).float()
    packed = QGemmWeight.quantize(weight)
    torch.testing.assert_close(packed.dequantize(), weight)
    x = torch.randn(5, 96)
    x[0] *= 100
    expected, got = x @ weight.T, packed(x)
    for row in range(5):
        assert (got[row] - expected[row]).abs().max() / expected[row].abs().max() < 0.03
    shuffled = QGemmWeight.quantize(weight.flip(1))
    assert (shuffled(x)[1:] - expected[1:]).abs().max() / expected[1:].abs().max() > 0.2


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


def test_the_graph_computes_what_the_ops_do_one_by_one(model_path, tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two prompts of different lengths prefilled together and decoded eight steps through
    ``DecodeGraph`` and through the same weights op by op (PyTorch's norms, rotary step,
    attention and SiLU, one session per matmul), with the kernel multiplying in float32
    (``ACCURACY_LEVEL`` 0; the int8 activations of the default round differently for a last-bit
    difference of the input): the same logits up to float32 rounding at every step; also with
    the prompts' first tokens cached (a prefix hit: the graph reads them as the past and
    attends to the rest causally). A misplaced norm, residual, weight or mask is far off."""
    monkeypatch.setattr(ort_int4, "ACCURACY_LEVEL", 0)
    graphs = ort_runner(model_path)
    assert graphs._decode_graph is not None
    ops = ort_runner(model_path)
    ops._decode_graph = None
    prompts = [chat_ids(tokenizer, p) for p in [PROMPTS[0], "Name three rivers in Europe, please."]]
    assert len(prompts[0]) != len(prompts[1])

    def run(runner: LlamaRunner, tokens: list[list[int]], cached: int = 0) -> list[torch.Tensor]:
        tables = tables_for(runner, len(prompts))
        out = []
        if cached:  # the first ``cached`` tokens computed first, by the op-by-op runner's path
            saved, runner._decode_graph = runner._decode_graph, None
            runner.prefill(
                [PrefillItem(p[:cached], 0, t) for p, t in zip(prompts, tables, strict=True)]
            )
            runner._decode_graph = saved
        items = [PrefillItem(p[cached:], cached, t) for p, t in zip(prompts, tables, strict=True)]
        out.append(runner.prefill(items).clone())
        positions = [len(p) for p in prompts]
        for step in tokens:
            out.append(runner.decode(step, positions, tables).clone())
            positions = [p + 1 for p in positions]
        return out

    first = run(ops, [])
    tokens = [[int(row.argmax()) for row in first[0]]]
    reference = run(ops, tokens * 8)
    for cached in (0, 21):  # a prefix hit: 21 tokens cached, past a block boundary
        for a, b in zip(run(graphs, tokens * 8, cached), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(reference[0], reference[1], atol=1e-3)  # the steps differ


def test_long_prompts_prefill_through_the_int8_copy(model_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """With ``dense_prefill`` a prompt of ``dense_from`` tokens or more is prefilled through the
    graph on the int8 copy (its down projections stay in 4 bits: their inputs' outliers, up to
    900x a channel's median, leave too few steps for the rest of a row) and decoding afterwards
    through the 4-bit graph. The graph computes what the copy's ops do one by one (up to the
    int8 rounding of activations), and the prompt's logits follow float32's: the same greedy token, correlation >= 0.97 (the int8
    rounding of activations; 4 bits alone: 0.998)."""
    runner = ort_runner(model_path, dense_prefill=torch.int8)
    graph, copy = runner._decode_graph, runner._prefill_graph
    assert graph is not None and copy is not None
    layer = runner.layers[2]
    assert isinstance(layer.dense["qkv"], QGemmWeight) and layer.dense["down"] is layer.down

    prompt = chat_ids(tokenizer, PROMPTS[0])
    assert len(prompt) >= runner.dense_from
    calls = {"int8": 0, "int4": 0}
    for name, each in (("int8", copy), ("int4", graph)):
        original = each.run

        def counted(*args, _name=name, _original=original):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(*args)

        each.run = counted  # type: ignore[method-assign]
    table = tables_for(runner, 1)[0]
    logits = runner.prefill([PrefillItem(prompt, 0, table)])
    assert calls == {"int8": 1, "int4": 0}
    runner.decode([int(logits[0].argmax())], [len(prompt)], [table])
    assert calls == {"int8": 1, "int4": 1}

    ops = ort_runner(model_path, dense_prefill=torch.int8)
    ops._decode_graph = ops._prefill_graph = None  # the copy's weights one by one
    by_ops = ops.prefill([PrefillItem(prompt, 0, tables_for(ops, 1)[0])])
    assert int(logits[0].argmax()) == int(by_ops[0].argmax())
    # as close to each other as each is to float32 (0.989-0.995 measured on four prompts: the
    # int8 rounding of activations turns a last-bit difference into a step)
    assert float(torch.corrcoef(torch.stack([logits[0], by_ops[0]]))[0, 1]) >= 0.98

    exact = LlamaRunner.from_pretrained(
        model_path, max_slots=1, max_len=256, dtype=torch.float32, device=torch.device("cpu")
    )
    reference = exact.prefill([PrefillItem(prompt, 0, tables_for(exact, 1)[0])])
    assert int(logits[0].argmax()) == int(reference[0].argmax())
    assert float(torch.corrcoef(torch.stack([logits[0], reference[0]]))[0, 1]) >= 0.97


def test_a_prompt_computes_the_same_whole_after_a_prefix_hit_or_in_a_batch(
    model_path, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """With the default kernel (int8 activations, which turn a last bit into a step) a prompt
    prefilled through the graphs gives the same logits, bit for bit, and the same greedy steps
    whether it is computed whole, after 32 or 48 cached tokens (cached by prompts long enough for
    the int8 copy too: which weights computed a cached block is its own prompt's choice), or
    beside a shorter prompt: each
    token's keys and values are put in their rows and read in position order, as the op-by-op
    path does. (Scoring the new tokens apart from the past, stop 45's first version, gave
    another greedy answer after a prefix hit: test_non_ascii_stream_is_valid_utf8 failed.)"""
    runner = ort_runner(model_path, dense_prefill=torch.int8)
    prompt = chat_ids(tokenizer, "Write 'café', 'naïve', '東京' and an emoji 🎉.")
    other = chat_ids(tokenizer, PROMPTS[1])
    assert len(prompt) > 48 and len(other) < len(prompt)

    def run(cached: int, beside: list[int] | None = None) -> list[torch.Tensor]:
        tables = tables_for(runner, 2)
        if cached:
            runner.prefill([PrefillItem(prompt[:cached], 0, tables[0])])
        items = [PrefillItem(prompt[cached:], cached, tables[0])]
        if beside:
            items.append(PrefillItem(beside, 0, tables[1]))
        out = [runner.prefill(items)[0].clone()]
        position = len(prompt)
        for _ in range(6):
            out.append(runner.decode([int(out[-1].argmax())], [position], tables[:1])[0].clone())
            position += 1
        return out

    whole = run(0)
    for got in (run(32), run(48), run(0, other)):
        assert all(torch.equal(a, b) for a, b in zip(got, whole, strict=True))


def test_the_decode_step_is_one_graph(model_path, tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Decoding takes ``DecodeGraph`` (rotary embedding, attention over each sequence's rows of
    the pools, every layer and the LM head in one runtime call): with the kernel multiplying in
    float32, its logits and the keys and values it writes are those of the op-by-op path, step after step, for a sequence alone (its rows read as a run), one
    whose blocks are not consecutive (gathered) and two of different lengths together (masked).
    A wrong rotation, head order, past row or mask would be far off."""
    monkeypatch.setattr(ort_int4, "ACCURACY_LEVEL", 0)
    runner = ort_runner(model_path)
    graph = runner._decode_graph
    assert graph is not None
    batches: list[int] = []
    original = graph.run

    def counted(x, *args):  # type: ignore[no-untyped-def]
        batches.append(x.shape[0])
        return original(x, *args)

    graph.run = counted  # type: ignore[method-assign]
    prompts = [
        chat_ids(tokenizer, p) for p in [*PROMPTS[:1], "Name three rivers in Europe, please."]
    ]
    assert len(prompts[0]) != len(prompts[1])
    steps = 12  # past a block boundary

    def decode(
        tables: list[list[int]], tokens: list[list[int]] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits of the prompts and of each step, fed ``tokens`` or their own greedy picks,
        and the keys and values of every position afterwards."""
        items = [PrefillItem(p, 0, t) for p, t in zip(prompts, tables, strict=False)]
        out = [runner.prefill(items).clone()]
        batches.clear()  # the prefill's call
        for step in range(steps):
            picks = tokens[step] if tokens else [int(row.argmax()) for row in out[-1]]
            positions = [len(item.tokens) + step for item in items]
            out.append(runner.decode(picks, positions, tables).clone())
        rows = [
            r
            for i in items
            for r in rows_of(i.table, range(len(i.tokens) + steps), runner.block_size)
        ]
        index = torch.tensor(rows)
        return out, [runner.k_pools[:, :, index].clone(), runner.v_pools[:, :, index].clone()]

    alone, *pair = tables_for(runner, 3)
    scattered = [alone[1], alone[0], *alone[2:]]  # the first two blocks swapped
    assert rows_to_read([alone], 2, runner.block_size, runner.device) == slice(
        alone[0] * runner.block_size, (alone[0] + 2) * runner.block_size
    )
    assert not isinstance(rows_to_read([scattered], 2, runner.block_size, runner.device), slice)
    for tables in ([alone], [scattered], pair):
        batches.clear()
        got, got_kv = decode(tables)
        assert batches == [len(tables)] * steps
        tokens = [[int(row.argmax()) for row in logits] for logits in got[:-1]]
        runner._decode_graph = None
        expected, expected_kv = decode(tables, tokens)
        runner._decode_graph = graph
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        for a, b in zip(got_kv, expected_kv, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected[1], expected[2], atol=1e-3)  # the steps differ


def test_the_int8_copy_goes_with_onnxruntimes_int4_kernel_only(model_path) -> None:  # type: ignore[no-untyped-def]
    """``dense_prefill=torch.int8`` names ONNX Runtime's integer-GEMM copy, which only int4
    weights on ONNX Runtime's kernel take; a float copy beside that kernel (PyTorch's threads
    would contend with the runtime's pool) or an int8 copy of PyTorch's weights is refused
    before anything is quantized, instead of quietly becoming the other copy."""
    with pytest.raises(ValueError, match="int8 prefill copy"):
        ort_runner(model_path, dense_prefill=torch.float32)
    with pytest.raises(ValueError, match="int8 prefill copy"):
        LlamaRunner.from_pretrained(
            model_path,
            max_slots=1,
            max_len=64,
            dtype=torch.bfloat16,
            device=torch.device("cpu"),
            quant="int4",
            dense_prefill=torch.int8,
        )


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
