"""``make bench``'s weight formats: what each name asks the embedded engine for."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.engine import QUANTIZED_PREFILL, _backend


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
