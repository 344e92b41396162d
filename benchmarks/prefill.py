"""Prefill time by prompt length: quantized weights against the dense copy (``dense_prefill``).

    python -m benchmarks.prefill [--weights int4] [--lengths 4,8,...] [--repeats 5] [--onnxruntime]

The runner alone (``LlamaRunner.prefill``, one prompt, no scheduler), so the figures are the
forward pass's: the median of ``--repeats`` runs after one warm-up, for each prompt length, with
the layers' quantized weights and with their dense copy (bf16 where the CPU computes bf16 natively,
else float32: what ``dense_prefill: true`` picks; where the bf16 copy is prepacked for oneDNN,
``PackedWeight``, a row for the same copy in PyTorch's plain layout follows).
``DENSE_PREFILL_FROM`` in ``gateway/backends/llama.py`` was chosen from this table. PyTorch's AVX2
kernels can be measured on an AVX-512 machine with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` in front of the command (and ``--dense float32``, as an AVX2-only CPU
would get). ``--onnxruntime`` adds a row for int4 through ONNX Runtime's kernel (``int4_kernel:
onnxruntime``: float32 activations) and one for its int8 copy on the runtime's integer GEMM,
measured after the others (it leaves PyTorch one thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from gateway.backends.embedded import choose_dense_prefill
from gateway.backends.llama import DENSE_PREFILL_FROM, LlamaRunner, PrefillItem
from gateway.backends.quant import PackedWeight, Weight
from gateway.config import Settings


def median_ms(runner: LlamaRunner, tokens: int, repeats: int) -> float:
    item = PrefillItem(list(range(100, 100 + tokens)), 0, list(range(1, runner.max_blocks + 1)))
    runner.prefill([item])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.prefill([item])
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", choices=["int8", "int4"], default="int4")
    parser.add_argument("--dense", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[4, 8, 16, 24, 32, 48, 64, 128, 256],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: pulled SmolLM2)")
    parser.add_argument("--onnxruntime", action="store_true", help="add int4 on ONNX Runtime")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dense = choose_dense_prefill(True, args.weights)
    if args.dense != "auto":
        dense = getattr(torch, args.dense)
    path = Path(args.model) if args.model else Settings().default_model_path()
    runner = LlamaRunner.from_pretrained(
        path,
        max_slots=1,
        max_len=max(args.lengths) + 16,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        quant=args.weights,
        dense_prefill=dense,
    )
    rows: dict[str, list[float]] = {args.weights: [], f"dense ({dense})": []}
    packed = [layer.dense for layer in runner.layers]
    plain: list[dict[str, Weight]] = [  # the same copy in the plain layout (PackedWeight)
        {n: w.packed.to_dense() if isinstance(w, PackedWeight) else w for n, w in d.items()}
        for d in packed
        if d is not None
    ]
    unpacked = "dense, not prepacked"
    if any(isinstance(w, PackedWeight) for d in packed if d for w in d.values()):
        rows[unpacked] = []
    for tokens in args.lengths:  # every length both ways, the threshold aside
        runner.dense_from = tokens + 1
        rows[args.weights].append(median_ms(runner, tokens, args.repeats))
        runner.dense_from = tokens
        rows[f"dense ({dense})"].append(median_ms(runner, tokens, args.repeats))
        if unpacked in rows:
            for layer, copy in zip(runner.layers, plain, strict=True):
                layer.dense = copy
            rows[unpacked].append(median_ms(runner, tokens, args.repeats))
            for layer, kept in zip(runner.layers, packed, strict=True):
                layer.dense = kept
    env = f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    if args.onnxruntime:
        del runner
        ort = LlamaRunner.from_pretrained(
            path,
            max_slots=1,
            max_len=max(args.lengths) + 16,
            dtype=torch.float32,
            device=torch.device("cpu"),
            quant="int4",
            int4_kernel="onnxruntime",
            dense_prefill=choose_dense_prefill(True, "int4", "onnxruntime"),
        )
        rows["int4 (onnxruntime)"], rows["int8 copy (onnxruntime)"] = [], []
        for tokens in args.lengths:
            ort.dense_from = tokens + 1
            rows["int4 (onnxruntime)"].append(median_ms(ort, tokens, args.repeats))
            ort.dense_from = tokens
            rows["int8 copy (onnxruntime)"].append(median_ms(ort, tokens, args.repeats))
    table = Table(title=f"prefill ms by prompt tokens ({env}; dense from {DENSE_PREFILL_FROM})")
    table.add_column("weights")
    for tokens in args.lengths:
        table.add_column(str(tokens), justify="right")
    for name, times in rows.items():
        table.add_row(name, *(f"{t:.0f}" for t in times))
    Console().print(table)


if __name__ == "__main__":
    main()
