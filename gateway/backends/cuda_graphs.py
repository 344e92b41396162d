"""CUDA graphs of the embedded engine's decode step (``LlamaRunner``, CUDA only).

A decode step of a small model launches hundreds of tiny kernels; replaying a captured graph
removes the per-kernel launch and Python cost. One graph per batch bucket (1, 2, 4, ... up to the
runner's ``max_slots``); a step of ``n`` sequences replays the smallest bucket of ``n`` or more,
its padding rows writing into the null block. The graphs gather every block a sequence can have
(static shapes) under the same mask, so they compute what the eager step computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# a decode step on tensors: ids [n, 1], positions [n], pool rows to write [n], rows to read [n, L]
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    """The captured graphs and the static input buffers they read."""

    def __init__(self, step: Step, max_batch: int, gather_len: int, device: torch.device) -> None:
        self.sizes = sorted({b for b in BUCKETS if b <= max_batch} | {max_batch})
        self.ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.write = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.gather = torch.zeros(max_batch, gather_len, dtype=torch.long, device=device)
        self._step = step
        self._device = device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _run(self, b: int) -> torch.Tensor:
        return self._step(self.ids[:b], self.pos[:b], self.write[:b], self.gather[:b])

    @torch.inference_mode()
    def capture(self) -> list[int]:
        """Warm up on a side stream, then capture each bucket, the largest first (the later
        graphs share its memory pool). Call once, before serving."""
        dev = self._device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for b in self.sizes:
                for _ in range(2):
                    self._run(b)
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = None
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(b)
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(dev)
        return self.sizes

    @torch.inference_mode()
    def replay(
        self, token_ids: list[int], positions: list[int], write: list[int], gather: torch.Tensor
    ) -> torch.Tensor:
        """One step of ``len(token_ids)`` sequences; ``gather`` holds each one's rows, padded to
        the bucket already (``[size, gather_len]``). Returns a view of the graph's logits, valid
        until the next replay."""
        n = len(token_ids)
        size = self.bucket(n)
        pad = size - n  # padding rows: position 0 of the null block
        self.ids[:size].copy_(torch.tensor(token_ids + [0] * pad).view(size, 1))
        self.pos[:size].copy_(torch.tensor(positions + [0] * pad))
        self.write[:size].copy_(torch.tensor(write + [0] * pad))
        self.gather[:size].copy_(gather)
        graph, out = self._graphs[size]
        graph.replay()
        return out[:n]

    def bucket(self, n: int) -> int:
        """The smallest captured batch size of ``n`` or more."""
        return next(b for b in self.sizes if b >= n)
