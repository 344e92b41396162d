"""Several LoRA adapters in one batch for the embedded engine (punica-style gathered matmuls).

Each adapter gets an index (0 means "no adapter"); every fused projection of every layer holds the
adapters' ``A`` and ``B`` matrices stacked along a leading index dimension, with the LoRA scale
folded into ``B``. A forward pass gathers each row's matrices by its index and adds
``(x @ A^T) @ B^T`` to the base projection, so requests for different adapters (and for the base
model) decode together in one batch. For the fused q/k/v and gate/up projections the per-module
``A`` matrices are stacked and the ``B`` matrices placed block-diagonally, so one gathered matmul
pair serves all of them. Ranks below the bank's rank are zero-padded (exact: zeros add nothing).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

if TYPE_CHECKING:  # llama_weights imports LoraPair from here
    from gateway.backends.llama_weights import LlamaShape

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
# fused projection -> the modules it concatenates, in order
FUSED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class LoraPair:
    a: torch.Tensor  # [slots, parts * rank, in]
    b: torch.Tensor  # [slots, out, parts * rank]


def read_adapter(
    path: Path,
) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], int]:
    """{(layer, module): (A [r, in], B [out, r] * scale)} and the rank of a PEFT LoRA directory."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha") or rank)
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    tensors = load_file(str(path / "adapter_model.safetensors"))
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        parts.setdefault((int(match[1]), match[2]), {})[match[3]] = value.float()
    out = {}
    for where, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: layer {where[0]} {where[1]} lacks lora_A or lora_B")
        out[where] = (ab["A"], ab["B"] * scale)
    return out, rank


def build_bank(
    adapters: list[Path],
    layers: int,
    out_sizes: dict[str, int],
    in_sizes: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
) -> list[dict[str, LoraPair]]:
    """Per layer, per fused projection: the stacked matrices of ``adapters`` (index i + 1)."""
    loaded = [read_adapter(p) for p in adapters]
    rank = max(r for _, r in loaded)
    slots = len(adapters) + 1
    bank: list[dict[str, LoraPair]] = []
    for layer in range(layers):
        per: dict[str, LoraPair] = {}
        for fused, modules in FUSED.items():
            width = rank * len(modules)
            a = torch.zeros(slots, width, in_sizes[fused], dtype=torch.float32)
            b = torch.zeros(slots, sum(out_sizes[m] for m in modules), width, dtype=torch.float32)
            for index, (weights, _) in enumerate(loaded, start=1):
                row = 0
                for part, module in enumerate(modules):
                    size = out_sizes[module]
                    pair = weights.get((layer, module))
                    if pair is not None:
                        wa, wb = pair
                        r = wa.shape[0]
                        a[index, part * rank : part * rank + r] = wa
                        b[index, row : row + size, part * rank : part * rank + r] = wb
                    row += size
            per[fused] = LoraPair(a.to(device, dtype), b.to(device, dtype))
        bank.append(per)
    return bank


def llama_bank(
    adapters: list[Path], shape: LlamaShape, dtype: torch.dtype, device: torch.device
) -> list[dict[str, LoraPair]]:
    """``build_bank`` with a Llama model's projection sizes."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    outs = {
        "q_proj": q,
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": shape.hidden_size,
        "gate_proj": shape.intermediate_size,
        "up_proj": shape.intermediate_size,
        "down_proj": shape.hidden_size,
    }
    h = shape.hidden_size
    ins = {"qkv": h, "o": q, "gate_up": h, "down": shape.intermediate_size}
    return build_bank(adapters, shape.num_layers, outs, ins, dtype, device)


def apply(x: torch.Tensor, pair: LoraPair, rows: torch.Tensor) -> torch.Tensor:
    """The LoRA delta for ``x`` ``[b, t, in]`` with adapter index ``rows`` ``[b]``."""
    a = pair.a.index_select(0, rows)  # [b, R, in]
    b = pair.b.index_select(0, rows)  # [b, out, R]
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
