"""Block tables to pool rows: what a forward pass writes and reads in the paged KV cache.

``kv_blocks.py`` decides which blocks a sequence owns; a sequence's position ``p`` lives in pool
row ``table[p // block_size] * block_size + p % block_size`` of every layer's pool (``llama.py``).
A pass reads ``Rows``: ``[b, L]`` row indices (gathered with one copy per layer) or, for one
sequence whose blocks are consecutive in the pool, their run of rows as a slice (read in place:
no copy). Both read the same rows in the same order.
"""

from __future__ import annotations

import torch

Rows = torch.Tensor | slice


def rows_of(table: list[int], positions: range | list[int], block_size: int) -> list[int]:
    """The pool rows of ``positions`` in a sequence with block table ``table``."""
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def gather_rows(
    tables: list[list[int]], blocks: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """Pool rows ``[len(tables), blocks * block_size]`` of each table's first ``blocks``
    blocks, padded with the null block."""
    padded = [t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in tables]
    ids = torch.tensor(padded, dtype=torch.long, device=device)
    offsets = torch.arange(block_size, dtype=torch.long, device=device)
    return (ids.unsqueeze(-1) * block_size + offsets).view(len(tables), -1)


def rows_to_read(
    tables: list[list[int]], blocks: int, block_size: int, device: torch.device
) -> Rows:
    """A slice when there is one sequence and its first ``blocks`` blocks are consecutive (the
    usual case for a lone stream: free blocks are handed out in order), else the gathered row
    indices."""
    if len(tables) == 1 and len(tables[0]) >= blocks:
        first = tables[0][0]
        if tables[0][:blocks] == list(range(first, first + blocks)):
            return slice(first * block_size, (first + blocks) * block_size)
    return gather_rows(tables, blocks, block_size, device)


def as_index(rows: Rows, device: torch.device) -> torch.Tensor:
    """``rows`` as ``[b, L]`` indices (a slice as one sequence's)."""
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device).view(1, -1)
    return rows


def additive_mask(length: int, pos: torch.Tensor, *, inclusive: bool) -> torch.Tensor:
    """``[*pos.shape, length]`` float32: 0 where row ``j`` is visible to the token at position
    ``pos[...]`` (``j <= pos`` with ``inclusive``, ``j < pos`` without), -inf elsewhere."""
    cols = torch.arange(length, device=pos.device)
    bound = pos.unsqueeze(-1)
    visible = cols <= bound if inclusive else cols < bound
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=pos.device)
    return mask.masked_fill_(~visible, float("-inf"))
