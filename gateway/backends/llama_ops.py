"""The pieces of ``llama.py``'s forward pass that are pure tensor math: the rotary step and
grouped-query attention over keys and values gathered from the paged pool."""

from __future__ import annotations

import torch

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
