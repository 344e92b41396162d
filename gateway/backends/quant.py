"""Weight-only int8 for the embedded engine's linear layers (CPU).

Each output channel of a weight gets one float scale (its largest magnitude maps to 127); the
activations stay in the model dtype. The multiply is PyTorch's own CPU kernel
``torch._weight_int8pack_mm`` (what torchao's int8 weight-only mode calls on the CPU), not
hand-written SIMD. A decode step reads a quarter of float32's bytes: on CPUs without native bf16
that is the difference between 11 and ~30 tokens/s for one stream (README, the embedded engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight in int8 with one float scale per output channel (weight-only
    quantization: activations stay in the model dtype). Multiplied by PyTorch's own CPU kernel
    ``_weight_int8pack_mm`` (the one torchao's int8 weight-only mode calls on CPU)."""

    q: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], the activation dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """Symmetric per-channel: each row scaled so its largest magnitude maps to 127."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(dtype))


Weight = torch.Tensor | Int8Weight


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x @ weight.T`` for a float or an int8 weight."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
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
