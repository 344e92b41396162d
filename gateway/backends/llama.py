"""A lean Llama forward pass with a slot-based KV cache, for the embedded engine.

Scope: the Llama architecture as transformers' ``LlamaForCausalLM`` defines it (RMSNorm, rotary
embeddings with the default rope type, grouped-query attention, SiLU-gated MLP, optionally tied
embeddings), inference only. SmolLM2 is a Llama model.

Why not call ``LlamaForCausalLM.forward``: continuous batching needs every sequence in the batch at
its own position, writing into its own cache slot, and joining or leaving between two steps. The
transformers cache classes assume one shared length per batch (left padding) and re-allocate on
every join; their per-step Python overhead also dominates a 135M model on two cores (FACTS.md:
25 tok/s for one stream). This module keeps the weights fused (q/k/v and gate/up as one matmul
each), the cache preallocated, and the op count per layer small. Its greedy output is checked
against ``model.generate`` in the tests.

Per layer the cache holds keys as ``[slots, kv_heads, head_dim, max_len]`` (already transposed
for ``q @ k^T``) and values as ``[slots, kv_heads, max_len, head_dim]``. The engine keeps its
running sequences in slots ``0..n-1`` (it compacts when one leaves), so a decode step reads views
of the cache, never gathered copies. Grouped-query attention is computed per kv head with its
query heads as the rows of one matmul, so keys and values are never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gateway.backends.multilora import LoraPair, build_bank
from gateway.backends.multilora import apply as lora_delta


@dataclass(frozen=True)
class LlamaShape:
    """The few numbers of a Llama config the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: object) -> LlamaShape:
        """Read a transformers ``LlamaConfig``; refuses rope types not implemented here."""
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported by the embedded engine")
        num_heads = config.num_attention_heads  # type: ignore[attr-defined]
        hidden = config.hidden_size  # type: ignore[attr-defined]
        return cls(
            vocab_size=config.vocab_size,  # type: ignore[attr-defined]
            hidden_size=hidden,
            intermediate_size=config.intermediate_size,  # type: ignore[attr-defined]
            num_layers=config.num_hidden_layers,  # type: ignore[attr-defined]
            num_heads=num_heads,
            num_kv_heads=config.num_key_value_heads,  # type: ignore[attr-defined]
            head_dim=getattr(config, "head_dim", None) or hidden // num_heads,
            rms_norm_eps=config.rms_norm_eps,  # type: ignore[attr-defined]
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            max_position_embeddings=config.max_position_embeddings,  # type: ignore[attr-defined]
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    lora: dict[str, LoraPair] | None = None  # stacked adapters per fused projection


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
    ) -> None:
        self.shape = shape
        self.max_slots = max_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = device

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = self.embed if shape.tie_word_embeddings else w("lm_head.weight")
        self.final_norm = w("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat(
                [
                    w(p + "self_attn.q_proj.weight"),
                    w(p + "self_attn.k_proj.weight"),
                    w(p + "self_attn.v_proj.weight"),
                ]
            )
            gate_up = torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])
            self.layers.append(
                _Layer(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=qkv.contiguous(),
                    o=w(p + "self_attn.o_proj.weight"),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=gate_up.contiguous(),
                    down=w(p + "mlp.down_proj.weight"),
                )
            )
        # Rotary tables for every position, in the cache dtype, as transformers computes them.
        inv_freq = 1.0 / (
            shape.rope_theta
            ** (torch.arange(0, shape.head_dim, 2, dtype=torch.int64).float() / shape.head_dim)
        )
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        # The cache is float32 whatever the weights are: keys and values keep the model dtype's
        # rounding, but attention accumulates in float32, as fused attention kernels do
        # (rounding bf16 scores before the softmax visibly changes greedy output).
        kv, dim = shape.num_kv_heads, shape.head_dim
        self.k_cache = [
            torch.zeros((max_slots, kv, dim, max_len), dtype=torch.float32, device=device)
            for _ in self.layers
        ]
        self.v_cache = [
            torch.zeros((max_slots, kv, max_len, dim), dtype=torch.float32, device=device)
            for _ in self.layers
        ]
        # LoRA adapters: index per slot (0: the base model) and, during a forward pass that
        # involves any adapter, the index of each row
        self.adapters: dict[str, int] = {}
        self.slot_adapter = [0] * max_slots
        self._rows: torch.Tensor | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_ids = torch.zeros(0, dtype=torch.long)
        self._graph_pos = torch.zeros(0, dtype=torch.long)

    @classmethod
    def from_pretrained(
        cls, path: Path, *, max_slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> LlamaRunner:
        """Load a transformers Llama checkpoint directory (config.json + safetensors)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        if config.model_type not in ("llama",):
            raise ValueError(f"model type {config.model_type!r} is not a Llama model")
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            weights.update(load_file(str(file)))
        shape = LlamaShape.from_config(config)
        max_len = min(max_len, shape.max_position_embeddings)
        return cls(shape, weights, max_slots=max_slots, max_len=max_len, dtype=dtype, device=device)

    def load_adapters(self, adapters: dict[str, Path]) -> None:
        """Load PEFT LoRA adapters (once, before serving); request them by name afterwards."""
        if not adapters:
            return
        s = self.shape
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        outs = {
            "q_proj": q,
            "k_proj": kv,
            "v_proj": kv,
            "o_proj": s.hidden_size,
            "gate_proj": s.intermediate_size,
            "up_proj": s.intermediate_size,
            "down_proj": s.hidden_size,
        }
        ins = {"qkv": s.hidden_size, "o": q, "gate_up": s.hidden_size, "down": s.intermediate_size}
        bank = build_bank(list(adapters.values()), s.num_layers, outs, ins, self.dtype, self.device)
        for layer, pairs in zip(self.layers, bank, strict=True):
            layer.lora = pairs
        self.adapters = {name: i for i, name in enumerate(adapters, start=1)}

    # -- cache bookkeeping ---------------------------------------------------------------------

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[dst, :, :, :length] = k[src, :, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        self.slot_adapter[dst] = self.slot_adapter[src]

    def _use_rows(self, indices: list[int]) -> None:
        self._rows = (
            torch.tensor(indices, dtype=torch.long, device=self.device) if any(indices) else None
        )

    def _project(
        self, x: torch.Tensor, weight: torch.Tensor, layer: _Layer, name: str
    ) -> torch.Tensor:
        out = F.linear(x, weight)
        if self._rows is not None and layer.lora is not None:
            out = out + lora_delta(x, layer.lora[name], self._rows)
        return out

    # -- forward -------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalise in float32, round, then scale.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.shape.rms_norm_eps)
        return weight * normed.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _mlp_and_attn_out(self, x: torch.Tensor, attn: torch.Tensor, layer: _Layer) -> torch.Tensor:
        x = x + self._project(attn, layer.o, layer, "o")
        h = self._norm(x, layer.post_norm)
        gate, up = self._project(h, layer.gate_up, layer, "gate_up").chunk(2, dim=-1)
        return x + self._project(F.silu(gate) * up, layer.down, layer, "down")

    def _split_qkv(
        self, h: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.shape
        b, t, _ = h.shape
        qkv = self._project(h, layer.qkv, layer, "qkv")
        qkv = qkv.view(b, t, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        q, k, v = qkv.split([s.num_heads, s.num_kv_heads, s.num_kv_heads], dim=2)
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(x, self.final_norm)
        return F.linear(x, self.lm_head).float()

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention of ``q`` ``[b, t, heads, dim]`` over float32 ``keys`` ``[b, kv, dim, L]``
        and ``values`` ``[b, kv, L, dim]`` with an additive ``mask`` broadcastable to
        ``[b, 1, t, L]``; returns ``[b, t, heads * dim]`` in the dtype of ``q``.
        """
        s = self.shape
        b, t = q.shape[0], q.shape[1]
        groups = s.num_heads // s.num_kv_heads
        # [b, kv, groups * t, dim]: the query heads sharing a kv head, stacked as matmul rows
        qg = q.view(b, t, s.num_kv_heads, groups, s.head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(b, s.num_kv_heads, groups * t, s.head_dim).float()
        scores = torch.matmul(qg, keys) * s.head_dim**-0.5
        scores = scores.view(b, s.num_kv_heads, groups, t, -1) + mask.unsqueeze(2)
        probs = torch.softmax(scores, dim=-1).view(b, s.num_kv_heads, groups * t, -1)
        out = torch.matmul(probs, values).view(b, s.num_kv_heads, groups, t, s.head_dim)
        return out.permute(0, 3, 1, 2, 4).reshape(b, t, s.num_heads * s.head_dim).to(q.dtype)

    @torch.inference_mode()
    def prefill(
        self, first_slot: int, prompts: list[list[int]], adapters: list[int] | None = None
    ) -> torch.Tensor:
        """Run fresh prompts into slots ``first_slot, first_slot + 1, ...`` in one forward pass.

        Prompts are right-padded to the longest; padding writes cache positions that the owning
        sequence overwrites before it ever attends to them. ``adapters`` gives each prompt's
        adapter index (``self.adapters``; 0 or None: the base model), kept for its slot. Returns
        logits ``[len(prompts), vocab]`` of each prompt's last token.
        """
        b = len(prompts)
        indices = adapters or [0] * b
        self.slot_adapter[first_slot : first_slot + b] = indices
        self._use_rows(indices)
        try:
            return self._prefill(first_slot, prompts)
        finally:
            self._rows = None

    def _prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        t = max(lengths)
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the cache length {self.max_len}")
        padded = [p + [0] * (t - len(p)) for p in prompts]
        ids = torch.tensor(padded, dtype=torch.long, device=self.device)
        x = F.embedding(ids, self.embed)
        cos = self.cos[:t].view(1, t, 1, -1)
        sin = self.sin[:t].view(1, t, 1, -1)
        causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        mask = torch.zeros(1, 1, t, t, dtype=torch.float32, device=self.device)
        mask.masked_fill_(~causal, float("-inf"))
        slots = slice(first_slot, first_slot + b)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            h = self._norm(x, layer.input_norm)
            q, k, v = self._split_qkv(h, layer, cos, sin)
            kc[slots, :, :, :t] = k.permute(0, 2, 3, 1).float()
            vc[slots, :, :t] = v.transpose(1, 2).float()
            attn = self._attend(q, kc[slots, :, :, :t], vc[slots, :, :t], mask)
            x = self._mlp_and_attn_out(x, attn, layer)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        return self._logits(x[torch.arange(b, device=self.device), last])

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for the sequences in slots ``0..n-1``; returns logits ``[n, vocab]``.

        ``token_ids[i]`` is written at ``positions[i]`` of slot ``i``; attention covers positions
        ``0..positions[i]`` of that slot. With CUDA graphs captured, the step is a graph replay
        padded to the next captured batch size, and the logits are a view of the graph's output
        buffer, valid until the next ``decode``.
        """
        n = len(token_ids)
        indices = self.slot_adapter[:n]
        if any(indices):  # adapters run eagerly (graphs were captured without them)
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device).view(n, 1)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            self._use_rows(indices)
            try:
                return self._decode(ids, pos, max(positions) + 1)
            finally:
                self._rows = None
        if self._graphs:
            size = next(b for b in sorted(self._graphs) if b >= n)
            pad = [0] * (size - n)  # free slots: position 0 is rewritten by their next prefill
            self._graph_ids[:size].copy_(torch.tensor(token_ids + pad).view(size, 1))
            self._graph_pos[:size].copy_(torch.tensor(positions + pad))
            graph, out = self._graphs[size]
            graph.replay()
            return out[:n]
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device).view(n, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self._decode(ids, pos, max(positions) + 1)

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """The decode step on tensors: ``ids`` ``[n, 1]``, ``pos`` ``[n]``, attention over the
        first ``length`` cache positions (the longest sequence, or the whole cache in a graph)."""
        n = ids.shape[0]
        x = F.embedding(ids, self.embed)
        cos = self.cos[pos].view(n, 1, 1, -1)
        sin = self.sin[pos].view(n, 1, 1, -1)
        rows = torch.arange(n, device=self.device)
        # Additive mask [n, 1, 1, length]: 0 where a key position is visible to the row's query.
        visible = torch.arange(length, device=self.device).view(1, -1) <= pos.view(-1, 1)
        mask = torch.zeros(n, length, dtype=torch.float32, device=self.device)
        mask.masked_fill_(~visible, float("-inf"))
        mask = mask.view(n, 1, 1, length)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            h = self._norm(x, layer.input_norm)
            q, k, v = self._split_qkv(h, layer, cos, sin)
            kc[rows, :, :, pos] = k[:, 0].float()
            vc[rows, :, pos] = v[:, 0].float()
            attn = self._attend(q, kc[:n, :, :, :length], vc[:n, :, :length], mask)
            x = self._mlp_and_attn_out(x, attn, layer)
        return self._logits(x[:, -1])

    # -- CUDA graphs ---------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> list[int]:
        """Capture the decode step for batch sizes 1, 2, 4, ... up to ``max_slots`` (CUDA only).

        A decode step of a small model launches hundreds of tiny kernels; replaying a captured
        graph removes the per-kernel launch and Python cost. Graphs attend over the whole cache
        (static shapes) with the same mask, so they compute what ``_decode`` computes. Call once,
        before serving, while no sequence is running (the warm-up writes into free slots).
        """
        if self.device.type != "cuda":
            return []
        sizes = sorted(
            {b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= self.max_slots}
            | {self.max_slots}
        )
        self._graph_ids = torch.zeros(self.max_slots, 1, dtype=torch.long, device=self.device)
        self._graph_pos = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b in sizes:
                for _ in range(2):
                    self._decode(self._graph_ids[:b], self._graph_pos[:b], self.max_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for b in reversed(sizes):  # the largest first: later graphs share its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._decode(self._graph_ids[:b], self._graph_pos[:b], self.max_len)
            pool = graph.pool()
            graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        self._graphs = graphs
        return sizes
