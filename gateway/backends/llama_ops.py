"""The pieces of ``llama.py``'s forward pass that are pure tensor math: the rotary step and
grouped-query attention over keys and values gathered from the paged pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateway.backends.llama_weights import LlamaShape


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the tables of ``llama_weights.rotary_tables``."""
    # roll(x) is cat(x2, x1); with sin's first half negated (``rotary_tables``) its product
    # is rotate_half(x) * sin = cat(-x2, x1) * sin, rounded the same
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    shape: LlamaShape,
) -> torch.Tensor:
    """Attention of ``q`` ``[b, t, heads, dim]`` over float32 ``keys`` and ``values``
    ``[kv, b, L, dim]`` (gathered from the pool) with an additive ``mask`` ``[b, t, L]``;
    returns ``[b, t, heads * dim]`` in the dtype of ``q``. The query heads that share a kv
    head are the rows of one matmul, so keys and values are never repeated."""
    b, t = q.shape[0], q.shape[1]
    kv, dim = shape.num_kv_heads, shape.head_dim
    groups = shape.num_heads // kv
    length = keys.shape[2]
    qg = q.view(b, t, kv, groups, dim).permute(2, 0, 3, 1, 4).reshape(kv * b, groups * t, dim)
    scores = torch.bmm(qg.float(), keys.view(kv * b, length, dim).transpose(1, 2))
    scores = scores.view(kv, b, groups, t, length) * dim**-0.5 + mask.view(1, b, 1, t, length)
    probs = torch.softmax(scores, dim=-1).view(kv * b, groups * t, length)
    out = torch.bmm(probs, values.view(kv * b, length, dim)).view(kv, b, groups, t, dim)
    return out.permute(1, 3, 0, 2, 4).reshape(b, t, shape.num_heads * dim).to(q.dtype)


def attend_fused(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape: LlamaShape
) -> torch.Tensor:
    """``attend`` for one sequence (``keys``/``values`` ``[kv, 1, L, dim]``) through PyTorch's
    fused ``scaled_dot_product_attention`` (grouped-query heads without repeating keys): a few
    calls instead of about seventeen, for the ONNX Runtime path, whose int8 activations already
    round away last-bit differences (the PyTorch path keeps ``attend``: its slice and gather
    reads are bit for bit the same)."""
    t = q.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=mask.unsqueeze(1),
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(1, t, shape.num_heads * shape.head_dim)
