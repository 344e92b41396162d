"""A lean Llama forward pass over a paged KV cache, for the embedded engine.

Scope: the Llama architecture as transformers' ``LlamaForCausalLM`` defines it (RMSNorm, rotary
embeddings with the default rope type, grouped-query attention, SiLU-gated MLP, optionally tied
embeddings), inference only. SmolLM2 is a Llama model.

Why not call ``LlamaForCausalLM.forward``: continuous batching needs every sequence in the batch at
its own position, with its own cache, joining or leaving between two steps. The transformers
cache classes assume one shared length per batch (left padding) and re-allocate on every join;
their per-step Python overhead also dominates a 135M model on two cores (FACTS.md: 25 tok/s for
one stream). This module keeps the weights fused (q/k/v and gate/up as one matmul each), the cache
preallocated, and the op count per layer small. Its greedy output is checked against
``model.generate`` in the tests.

The KV cache is paged (``kv_blocks.py`` decides which blocks a sequence owns): per layer one pool
of ``num_blocks * block_size`` token rows, ``[kv_heads, rows, head_dim]`` in float32. A step
writes each new token's keys and values to its row, gathers the rows of each sequence's blocks
(``index_select``, one copy per layer) and attends over them under a mask; blocks shared by a
common prefix are read by every sequence that has it. Grouped-query attention is one batched
matmul per step over (kv head, sequence), the query heads of a kv head as its rows, so keys and
values are never repeated.

Dense prefill: the int8 and int4 kernels' time grows with every prompt token, a dense matmul's
barely (bound by reading the weights up to dozens of tokens). With ``dense_prefill``, quantized
weights keep a dense copy of the layers' projections for prompts of ``DENSE_PREFILL_FROM`` tokens
or more (README, "Dense prefill"); decoding stays quantized. With ONNX Runtime's int4 kernel the
copy is int8 on the runtime's integer GEMM (``dense_prefill=torch.int8``,
``ort_int4.QGemmWeight``), and every forward pass without LoRA adapters, a decode step or a
prefill, is one graph (``ort_decode.DecodeGraph``).
CUDA graphs of the decode step: ``cuda_graphs.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gateway.backends.cuda_graphs import DecodeGraphs
from gateway.backends.kv_rows import Rows, additive_mask, gather_rows, rows_of, rows_to_read
from gateway.backends.llama_ops import attend, rope
from gateway.backends.llama_weights import Layer, LlamaShape, fuse_weights, rotary_tables
from gateway.backends.multilora import apply as lora_delta
from gateway.backends.multilora import llama_bank
from gateway.backends.ort_decode import decode_graph
from gateway.backends.ort_int4 import OrtWeight
from gateway.backends.quant import Int4Kernel, Quant, Weight, linear
from gateway.backends.quant_cache import QuantCache

# The prompt length from which ``dense_prefill`` prefills with the dense weights (the
# int4 and dense times cross near 16 tokens with bf16 and at 16-24 with PyTorch's AVX2 kernels;
# 32 leaves room for slower machines: README, "Dense prefill")
DENSE_PREFILL_FROM = 32


@dataclass
class PrefillItem:
    """New tokens of one sequence for ``LlamaRunner.prefill``: they go to positions
    ``start, start + 1, ...`` of the sequence's block table."""

    tokens: list[int]
    start: int
    table: list[int]
    adapter: int = 0  # the runner's adapter index; 0: the base model


class LlamaRunner:
    """Weights, rotary tables and the KV cache of one Llama model; not thread-safe.

    ``prefill`` and ``decode`` return float32 logits of the last position of each sequence.
    """

    def __init__(
        self,
        shape: LlamaShape,
        weights: dict[str, torch.Tensor],
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int | None = None,
        block_size: int = 16,
        quant: Quant = "none",
        dense_prefill: torch.dtype | None = None,
        quant_cache: QuantCache | None = None,
        int4_kernel: Int4Kernel = "torch",
    ) -> None:
        self.shape = shape
        self.quant = quant  # none | int8 | int4 (quant.py)
        # with quantized weights: the dtype of the copy long prompts are prefilled with (bf16 or
        # float32; int8 for ONNX Runtime's integer GEMM beside its int4 kernel)
        self.dense_prefill = dense_prefill if quant != "none" else None
        self.dense_from = DENSE_PREFILL_FROM  # prompt length from which a prefill goes dense
        self.max_slots = max_slots  # the largest decode batch (CUDA graphs are captured up to it)
        self.max_len = max_len
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)  # blocks of one sequence at most
        if num_blocks is None:  # as much memory as one full-length sequence per slot
            num_blocks = max_slots * self.max_blocks + 1
        if num_blocks < self.max_blocks + 1:
            raise ValueError(
                f"a KV cache of {num_blocks} blocks cannot hold one sequence of {max_len} tokens "
                f"({self.max_blocks} blocks of {block_size} and the null block)"
            )
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device

        if quant not in ("none", "int8", "int4"):
            raise ValueError(f"unknown quantization {quant!r}")
        if quant != "none" and device.type != "cpu":
            raise ValueError(f"{quant} weights run on the CPU only (PyTorch's {quant} kernels)")
        if int4_kernel == "onnxruntime" and dtype != torch.float32:
            raise ValueError("ONNX Runtime's int4 kernel takes float32 activations")
        fused = fuse_weights(
            weights, shape, dtype, device, quant, self.dense_prefill, quant_cache, int4_kernel
        )
        self.embed, self.lm_head, self.final_norm, self.layers = fused
        # with ONNX Runtime's int4 kernel, a forward pass is one graph (``ort_decode``): a decode
        # step or a short prompt's prefill on the 4-bit weights, a long prompt's on the int8
        # copy (``QGemmWeight``); LoRA takes the per-op path
        on_ort = int4_kernel == "onnxruntime" and quant == "int4"
        graph_args = (self.layers, self.final_norm, self.lm_head, shape, num_blocks * block_size)
        self._decode_graph = decode_graph(*graph_args) if on_ort else None
        self._prefill_graph = decode_graph(*graph_args, copies=True) if on_ort else None
        # ONNX Runtime's pool multiplies on every core; PyTorch's threads (attention, the ops
        # between two calls) spinning beside it made a step three times slower (43 ms against
        # 14-15 on two cores): its forward passes leave PyTorch one thread (``_layers``)
        self._torch_threads = 1 if on_ort else None
        self.cos, self.sin = rotary_tables(shape, max_len, dtype, device)
        # The cache is float32 whatever the weights are: keys and values keep the model dtype's
        # rounding, but attention accumulates in float32, as fused attention kernels do
        # (rounding bf16 scores before the softmax visibly changes greedy output).
        # One pool per layer, kv-head major: [kv_heads, num_blocks * block_size, head_dim], so a
        # gather of rows is contiguous per kv head and attention runs as one batched matmul
        # over (kv head, sequence) without another copy.
        # The layers' pools are views of one tensor each for keys and values (``DecodeGraph``
        # takes all of them in one input and its new rows are written with one call).
        kv, dim = shape.num_kv_heads, shape.head_dim
        rows = num_blocks * block_size
        pools = (len(self.layers), kv, rows, dim)
        self.k_pools = torch.zeros(pools, dtype=torch.float32, device=device)
        self.v_pools = torch.zeros(pools, dtype=torch.float32, device=device)
        self.k_pool = list(self.k_pools.unbind(0))
        self.v_pool = list(self.v_pools.unbind(0))
        # LoRA adapters: index per name (0: the base model) and, during a forward pass that
        # involves any adapter, the index of each row
        self.adapters: dict[str, int] = {}
        self._rows: torch.Tensor | None = None
        self._dense = False  # during a forward pass on the layers' dense copies
        self.cuda_graphs: DecodeGraphs | None = None  # captured decode steps (CUDA only)

    @staticmethod
    def kv_bytes_per_token(shape: LlamaShape) -> int:
        """Bytes of keys and values one token takes in the pool (all layers, float32)."""
        return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_cache_bytes: int | None = None,
        default_sequences: int | None = None,
        quant: Quant = "none",
        dense_prefill: torch.dtype | None = None,
        int4_kernel: Int4Kernel = "torch",
    ) -> LlamaRunner:
        """Load a transformers Llama checkpoint directory (config.json + safetensors)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        if config.model_type not in ("llama",):
            raise ValueError(f"model type {config.model_type!r} is not a Llama model")
        weights: dict[str, torch.Tensor] = {}
        files = sorted(Path(path).glob("*.safetensors"))
        for file in files:
            weights.update(load_file(str(file)))
        shape = LlamaShape.from_config(config)
        max_len = min(max_len, shape.max_position_embeddings)
        if num_blocks is None and kv_cache_bytes is not None:
            num_blocks = kv_cache_bytes // (cls.kv_bytes_per_token(shape) * block_size)
        elif num_blocks is None and default_sequences is not None:
            num_blocks = default_sequences * -(-max_len // block_size) + 1
        return cls(
            shape,
            weights,
            max_slots=max_slots,
            max_len=max_len,
            dtype=dtype,
            device=device,
            num_blocks=num_blocks,
            block_size=block_size,
            quant=quant,
            dense_prefill=dense_prefill,
            quant_cache=QuantCache.for_checkpoint(files, quant, dtype, device, int4_kernel),
            int4_kernel=int4_kernel,
        )

    def load_adapters(self, adapters: dict[str, Path]) -> None:
        """Load PEFT LoRA adapters (once, before serving); request them by name afterwards."""
        if not adapters:
            return
        bank = llama_bank(list(adapters.values()), self.shape, self.dtype, self.device)
        for layer, pairs in zip(self.layers, bank, strict=True):
            layer.lora = pairs
            copies = list(layer.dense.values()) if layer.dense else []
            for weight in (layer.qkv, layer.o, layer.gate_up, layer.down, *copies):
                if isinstance(weight, OrtWeight):  # now, not at the first adapter's request
                    weight.prepare()
        self.adapters = {name: i for i, name in enumerate(adapters, start=1)}

    # -- cache bookkeeping ---------------------------------------------------------------------

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src``'s keys and values into block ``dst`` (a forked choice's last,
        partly filled block: the choices write different tokens after it)."""
        bs = self.block_size
        for pools in (self.k_pools, self.v_pools):
            pools[:, :, dst * bs : (dst + 1) * bs] = pools[:, :, src * bs : (src + 1) * bs]

    def _use_rows(self, indices: list[int]) -> None:
        self._rows = (
            torch.tensor(indices, dtype=torch.long, device=self.device) if any(indices) else None
        )

    def _project(self, x: torch.Tensor, weight: Weight, layer: Layer, name: str) -> torch.Tensor:
        if self._dense and layer.dense is not None:
            weight = layer.dense[name]
        out = linear(x, weight)
        if self._rows is not None and layer.lora is not None:
            out = out + lora_delta(x, layer.lora[name], self._rows)
        return out

    # -- forward -------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalise in float32, round, then scale.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.shape.rms_norm_eps)
        return weight * normed.to(x.dtype)

    def _mlp_and_attn_out(self, x: torch.Tensor, attn: torch.Tensor, layer: Layer) -> torch.Tensor:
        x = x + self._project(attn, layer.o, layer, "o")
        h = self._norm(x, layer.post_norm)
        gate, up = self._project(h, layer.gate_up, layer, "gate_up").chunk(2, dim=-1)
        return x + self._project(F.silu(gate) * up, layer.down, layer, "down")

    def _split_qkv(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.shape
        b, t = cos.shape[0], cos.shape[1]
        qkv = qkv.view(b, t, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        qk, v = qkv.split([s.num_heads + s.num_kv_heads, s.num_kv_heads], dim=2)
        q, k = rope(qk, cos, sin).split([s.num_heads, s.num_kv_heads], dim=2)
        return q, k, v  # one rotation for the query and key heads together: fewer ops per step

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(x, self.final_norm)
        return linear(x, self.lm_head).float()

    def _layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write: torch.Tensor,
        gather: Rows,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Every layer over ``x`` ``[b, t, hidden]``: new keys and values go to pool rows
        ``write`` ``[b * t]``, attention reads rows ``gather`` (``Rows``) under ``mask``."""
        if self._torch_threads is None:
            return self._layers_on(x, cos, sin, write, gather, mask)
        threads = torch.get_num_threads()  # per call: the process's other PyTorch work keeps its
        torch.set_num_threads(self._torch_threads)  # threads (0.3 us a switch)
        try:
            return self._layers_on(x, cos, sin, write, gather, mask)
        finally:
            torch.set_num_threads(threads)

    def _layers_on(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write: torch.Tensor,
        gather: Rows,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        s = self.shape
        b, t = x.shape[0], x.shape[1]
        kv, dim = s.num_kv_heads, s.head_dim
        flat = gather.reshape(-1) if isinstance(gather, torch.Tensor) else None
        for layer, kp, vp in zip(self.layers, self.k_pool, self.v_pool, strict=True):
            qkv = self._project(self._norm(x, layer.input_norm), layer.qkv, layer, "qkv")
            q, k, v = self._split_qkv(qkv, cos, sin)
            kp.index_copy_(1, write, k.reshape(b * t, kv, dim).transpose(0, 1).float())
            vp.index_copy_(1, write, v.reshape(b * t, kv, dim).transpose(0, 1).float())
            if flat is None:  # one sequence's consecutive rows, read in place
                keys, values = kp[:, gather].unsqueeze(1), vp[:, gather].unsqueeze(1)
            else:
                keys = kp.index_select(1, flat).view(kv, b, -1, dim)
                values = vp.index_select(1, flat).view(kv, b, -1, dim)
            attn = attend(q, keys, values, mask, self.shape)
            x = self._mlp_and_attn_out(x, attn, layer)
        return x

    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Compute new tokens for several sequences in one padded forward pass.

        Item ``i``'s tokens go to positions ``start .. start + len(tokens) - 1`` of its block
        table; positions before ``start`` must already be in the cache (a prefix hit or a
        resumed sequence). Padding writes into the null block. Returns logits
        ``[len(items), vocab]`` of each item's last token.

        With ``dense_prefill``, items that end at position ``dense_from`` or later go through
        the dense weights and the others through the quantized ones, in two passes: which
        weights compute a sequence depends on its own length, not on what it is batched with
        nor on how much of it was cached.
        """
        dense = [self._prefills_dense(item) for item in items]
        if all(dense) or not any(dense):
            return self._prefill_pass(items, dense=any(dense))
        logits = torch.empty(len(items), self.shape.vocab_size, device=self.device)
        for flag in (True, False):
            part = [i for i, d in enumerate(dense) if d == flag]
            logits[part] = self._prefill_pass([items[i] for i in part], flag)
        return logits

    def _prefills_dense(self, item: PrefillItem) -> bool:
        # by where the prompt ends, not by how much of it is new: a prompt computed whole (a
        # cache miss) and one whose prefix was cached (a hit) then use the same weights
        end = item.start + len(item.tokens)
        return self.dense_prefill is not None and end >= self.dense_from

    def _prefill_pass(self, items: list[PrefillItem], dense: bool) -> torch.Tensor:
        self._use_rows([item.adapter for item in items])
        self._dense = dense
        try:
            return self._prefill(items)
        finally:
            self._rows, self._dense = None, False

    def _prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        b = len(items)
        t = max(len(item.tokens) for item in items)
        ends = [item.start + len(item.tokens) for item in items]
        if max(ends) > self.max_len:
            raise ValueError(f"a sequence of {max(ends)} tokens exceeds the cache length")
        bs = self.block_size
        blocks = -(-max(ends) // bs)
        ids, pos, write = [], [], []
        for item in items:
            pad = t - len(item.tokens)
            ids.append(item.tokens + [0] * pad)
            positions = range(item.start, item.start + len(item.tokens))
            pos.append(list(positions) + [0] * pad)
            write.extend(rows_of(item.table, positions, bs) + [0] * pad)  # null block
        dev = self.device
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        x = F.embedding(torch.tensor(ids, dtype=torch.long, device=dev), self.embed)
        cos, sin = self.cos[pos_t].unsqueeze(2), self.sin[pos_t].unsqueeze(2)
        write_t = torch.tensor(write, dtype=torch.long, device=dev)
        gather = rows_to_read([item.table for item in items], blocks, bs, dev)
        graph = self._prefill_graph if self._dense else self._decode_graph
        if graph is not None and self._rows is None:
            lengths = torch.tensor([len(item.tokens) for item in items])
            real = torch.arange(t).view(1, -1) < lengths.view(-1, 1)
            last = torch.arange(b) * t + lengths - 1
            pools = (self.k_pools, self.v_pools)
            return graph.forward(x, cos, sin, pools, pos_t, real, write_t, gather, last)
        # query at position p sees key positions 0..p (causal, across the cached prefix too)
        mask = additive_mask(blocks * bs, pos_t, inclusive=True)
        x = self._layers(x, cos, sin, write_t, gather, mask)
        last = torch.tensor([len(item.tokens) - 1 for item in items], device=dev)
        return self._logits(x[torch.arange(b, device=dev), last])

    @torch.inference_mode()
    def decode(
        self,
        token_ids: list[int],
        positions: list[int],
        tables: list[list[int]],
        adapters: list[int] | None = None,
    ) -> torch.Tensor:
        """One step for ``n`` sequences; returns logits ``[n, vocab]``.

        ``token_ids[i]`` is written at ``positions[i]`` of table ``tables[i]`` (which must already
        hold the block for it); attention covers positions ``0..positions[i]``. With CUDA graphs
        captured, the step is a graph replay padded to the next captured batch size, and the
        logits are a view of the graph's output buffer, valid until the next ``decode``.
        """
        n = len(token_ids)
        indices = adapters or [0] * n
        bs = self.block_size
        write = [rows_of(t, [p], bs)[0] for t, p in zip(tables, positions, strict=True)]
        if any(indices):  # adapters run eagerly (graphs were captured without them)
            self._use_rows(indices)
            try:
                return self._decode_lists(token_ids, positions, write, tables)
            finally:
                self._rows = None
        if self.cuda_graphs is not None:
            size = self.cuda_graphs.bucket(n)
            gather = gather_rows(tables + [[]] * (size - n), self.max_blocks, bs, self.device)
            return self.cuda_graphs.replay(token_ids, positions, write, gather)
        return self._decode_lists(token_ids, positions, write, tables)

    def _decode_lists(
        self, token_ids: list[int], positions: list[int], write: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        dev = self.device
        blocks = -(-(max(positions) + 1) // self.block_size)
        return self._decode(
            torch.tensor(token_ids, dtype=torch.long, device=dev).view(-1, 1),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(write, dtype=torch.long, device=dev),
            rows_to_read(tables, blocks, self.block_size, dev),
        )

    def _decode(
        self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor, gather: Rows
    ) -> torch.Tensor:
        """The decode step on tensors: ``ids`` ``[n, 1]``, ``pos`` ``[n]``, pool rows ``write``
        ``[n]`` and the rows to read, ``gather`` (``[n, L]``: the longest sequence's blocks, or
        every block a sequence can have in a graph; or one sequence's slice of rows)."""
        n = ids.shape[0]
        x = F.embedding(ids, self.embed)
        if self._decode_graph is not None and self._rows is None:
            cos, sin, pools = self.cos[pos], self.sin[pos], (self.k_pools, self.v_pools)
            return self._decode_graph.step(x, cos, sin, pools, pos, write, gather)
        cos = self.cos[pos].view(n, 1, 1, -1)
        sin = self.sin[pos].view(n, 1, 1, -1)
        length = gather.stop - gather.start if isinstance(gather, slice) else gather.shape[1]
        mask = additive_mask(length, pos, inclusive=True)
        x = self._layers(x, cos, sin, write, gather, mask.view(n, 1, length))
        return self._logits(x[:, -1])

    # -- CUDA graphs ---------------------------------------------------------------------------

    def capture_cuda_graphs(self) -> list[int]:
        """Capture the decode step for batch sizes 1, 2, 4, ... up to ``max_slots``
        (``cuda_graphs.DecodeGraphs``; CUDA only, an empty list elsewhere). Call once, before
        serving (the warm-up writes into the null block)."""
        if self.device.type != "cuda":
            return []
        graphs = DecodeGraphs(
            self._decode, self.max_slots, self.max_blocks * self.block_size, self.device
        )
        sizes = graphs.capture()
        self.cuda_graphs = graphs
        return sizes
