"""Weight-only int8 and int4 for the embedded engine's linear layers (CPU).

int8: each output channel of a weight gets one float scale (its largest magnitude maps to 127).
int4: each group of 32 input weights of an output channel gets a scale and an offset (its
smallest and largest weight map to 0 and 15), the layout of llama.cpp's Q4_1. The activations
stay in the model dtype. The multiplies are PyTorch's own CPU kernels, ``_weight_int8pack_mm``
and ``_weight_int4pack_mm_for_cpu`` (what torchao's int8 and int4 weight-only modes call on the
CPU), not hand-written SIMD. A decode step reads a quarter (int8) or an eighth (int4) of
float32's bytes: on CPUs without native bf16 int8 is the difference between 11 and ~30 tokens/s
for one stream, and int4's kernel does a layer's matmuls in less than half int8's time (README,
the embedded engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gateway.backends.ort_int4 import OrtWeight

Quant = Literal["none", "int8", "int4"]  # the weights' format (model config: auto picks one)
Int4Kernel = Literal["torch", "onnxruntime"]  # whose kernel multiplies int4 weights


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight in int8 with one float scale per output channel (weight-only
    quantization: activations stay in the model dtype). Multiplied by PyTorch's own CPU kernel
    ``_weight_int8pack_mm`` (the one torchao's int8 weight-only mode calls on CPU)."""

    q: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], the activation dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, qmax: int = 127) -> Int8Weight:
        """Symmetric per-channel: each row scaled so its largest magnitude maps to ``qmax``."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / qmax).clamp(min=1e-8)
        q = torch.round(w / scales.unsqueeze(1)).clamp(-qmax, qmax).to(torch.int8)
        return cls(q.contiguous(), scales.to(dtype))


INT4_GROUP = 32  # input weights per scale and offset, as llama.cpp's Q4_0/Q4_1 blocks


@dataclass(frozen=True)
class Int4Weight:
    """A linear layer's weight in 4 bits, asymmetric per group of ``group`` input weights
    (``w = q * scale + min``, q in 0..15, llama.cpp's Q4_1), packed for PyTorch's CPU kernel
    ``_weight_int4pack_mm_for_cpu`` (the one torchao's int4 weight-only mode calls on CPU)."""

    packed: torch.Tensor  # uint8, the kernel's layout of [out, in] nibbles
    scales_zeros: torch.Tensor  # [in / group, out, 2]: scale and zero, the activation dtype
    group: int
    out_features: int

    @staticmethod
    def fits(weight: torch.Tensor, group: int = INT4_GROUP) -> bool:
        """The kernel's shape rules: output channels a multiple of 16, inputs of the group."""
        out, inp = weight.shape
        return out % 16 == 0 and inp % group == 0

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP
    ) -> Int4Weight:
        out, inp = weight.shape
        w = weight.float().view(out, inp // group, group)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-8)
        q = torch.round((w - low) / scale).clamp(0, 15).to(torch.int32).view(out, inp)
        # the kernel computes (q - 8) * scale + zero: the zero is the value of q = 8
        zero = low + 8.0 * scale
        scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        return cls(packed, scales_zeros.transpose(0, 1).contiguous().to(dtype), group, out)


@dataclass(frozen=True)
class PackedWeight:
    """A bf16 weight reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``)
    and multiplied by ``mkldnn._linear_pointwise``: the pair Inductor's CPU weight-freezing pass
    emits. ``F.linear`` on a plain bf16 weight reorders it on every call; prepacked, SmolLM2's
    layers took 26-28 ms at 40 rows against 38 and 10-11 ms at one row against 18-19 (the
    AVX-512-BF16 machine, microbenchmark), with bit for bit the same products there; on AMX
    (Intel Sapphire Rapids) oneDNN multiplies the plain layout of some shapes with another kernel,
    and a few products of a prompt differ by one bf16 step, as accurate either way (tested)."""

    packed: torch.Tensor  # layout torch._mkldnn, bf16
    out_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @classmethod
    def pack(cls, weight: torch.Tensor) -> PackedWeight:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        return cls(packed, weight.shape[0])

    @staticmethod
    def available(device: torch.device) -> bool:
        """On a CPU that computes bf16 natively (elsewhere oneDNN would emulate it), with
        PyTorch built with oneDNN."""
        return device.type == "cpu" and torch.backends.mkldnn.is_available() and on_cpu_with_bf16()


Weight = torch.Tensor | Int8Weight | Int4Weight | PackedWeight | OrtWeight


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x @ weight.T`` for a float (plain or prepacked), an int8 or an int4 weight (PyTorch's
    kernels or ONNX Runtime's, ``OrtWeight``)."""
    if isinstance(weight, OrtWeight):
        return weight(x)
    if isinstance(weight, PackedWeight):
        if x.dtype != weight.dtype:
            return linear(x.to(weight.dtype), weight).to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, None, "none", [], "")
    if isinstance(weight, torch.Tensor):
        if weight.dtype != x.dtype:  # a dense float32 copy under bf16 activations (long prefills)
            return F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if isinstance(weight, Int4Weight):
        out = torch._weight_int4pack_mm_for_cpu(
            flat, weight.packed, weight.group, weight.scales_zeros
        )
        return out.view(*x.shape[:-1], weight.out_features)
    out = torch._weight_int8pack_mm(flat, weight.q, weight.scales)
    return out.view(*x.shape[:-1], weight.q.shape[0])


def on_cpu_with_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
