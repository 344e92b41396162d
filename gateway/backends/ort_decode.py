"""The engine's forward pass as one ONNX Runtime graph (the default int4 kernel on CPU): a
decode step, and a prefill alike.

Before stop 44 a decode step on ONNX Runtime was 32 runtime calls (one graph per layer between
two attentions) with rotary embedding, the KV cache's writes and attention in PyTorch between
them: about 25 PyTorch calls a layer, each costing microseconds of dispatch on a 576-wide
vector. ``DecodeGraph`` computes a whole pass of a batch in a single call, the tokens'
embeddings in and the logits out: each layer's rotary embedding, attention, matmuls, norms and
residuals, then the final norm and the LM head on each sequence's last token. It takes ``t``
new tokens per sequence: 1 in a decode step, the prompt (or what a prefix hit left of it) in a
prefill. The layers' pools go in without a copy, as rows of ``head_dim`` (``LlamaRunner.k_pools``,
one tensor for every layer), and each sequence's rows, the paged cache's block table turned
into row numbers (a run of rows for a lone sequence whose blocks are consecutive), are read with
one ``Gather`` a layer, under a mask. The new tokens' keys and values
come back as outputs and the runner writes them to their rows (two PyTorch calls).

Attention is written out of standard operators (``FusedMatMul`` for the scaled ``q @ k.T``), as
the op-by-op path computes it: each sequence's rows of the pools are gathered in position order
(the blocks up to its last new token), the new tokens' keys and values are put in their rows
(``ScatterElements``), and each token attends to the rows up to its position. So a prompt's
rows and sums are the same whether it is computed whole, after a cached prefix or beside other
sequences, and greedy answers do not change with a prefix hit (scoring the new tokens apart from
the past, as stop 44's decode step did, changed them: the int8 rounding of activations turns a
last bit into a step). The same graph is built twice: on the 4-bit weights (decoding, short
prompts) and on the int8 copy (``QGemmWeight``, prompts of ``dense_from`` tokens or more).
Batches with LoRA adapters take the op-by-op path (their deltas go between the matmuls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gateway.backends.kv_rows import Rows, additive_mask, as_index
from gateway.backends.ort_int4 import LayerWeights, OrtWeight, session

if TYPE_CHECKING:
    from gateway.backends.llama_weights import LlamaShape


class DecodeGraph:
    """The forward pass on one set of weights (4 bits, ``NBitsWeight``, or the int8 copy);
    ``step`` decodes, ``forward`` prefills, ``run`` computes."""

    def __init__(
        self,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        head: OrtWeight,
        shape: LlamaShape,
        pool_rows: int,
    ) -> None:
        from onnx import TensorProto, helper, numpy_helper

        heads, kv, dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        eps = shape.rms_norm_eps
        nodes: list[Any] = []
        inits: list[Any] = []

        def const(name: str, value: torch.Tensor) -> str:
            inits.append(numpy_helper.from_array(value.numpy(), name))
            return name

        def op(kind: str, inputs: list[str], output: str, **attrs: Any) -> str:
            nodes.append(helper.make_node(kind, inputs, [output], **attrs))
            return output

        def split(inputs: list[str], outputs: list[str], **attrs: Any) -> list[str]:
            nodes.append(helper.make_node("Split", inputs, outputs, **attrs))
            return outputs

        def norm(name: str, x: str, weight: torch.Tensor) -> str:
            w = const(f"{name}.weight", weight.float().contiguous())
            return op("RMSNormalization", [x, w], name, axis=-1, epsilon=eps)

        def matmul(weight: OrtWeight, name: str, x: str) -> str:
            more, more_inits = weight.node(name, x, f"{name}.out")
            nodes.extend(more)
            inits.extend(more_inits)
            return f"{name}.out"

        def shape_of(name: str, *dims: int) -> str:
            return const(name, torch.tensor(dims, dtype=torch.long))

        qk_split = shape_of("qk_v", (heads + kv) * dim, kv * dim)
        q_k = shape_of("q_k", heads, kv)
        as_qk = shape_of("as_qk", 0, heads + kv, dim)
        as_rows = shape_of("as_rows", -1, heads * dim)
        two = const("two", torch.tensor([2]))
        scale = dim**-0.5

        x = "x"
        qkv = matmul(layers[0].qkv, "l0.qkv", norm("l0.in", x, layers[0].input_norm))
        new_k: list[str] = []
        new_v: list[str] = []
        for i, layer in enumerate(layers):
            p = f"l{i}."
            # rotary embedding of the query and key heads together (``llama_ops.rope``)
            qk, v = split([qkv, qk_split], [p + "qk", p + "v"], axis=-1)
            qk = op("Reshape", [qk, as_qk], p + "qk3")  # [R, heads + kv, dim]
            low, high = split([qk], [p + "lo", p + "hi"], axis=-1, num_outputs=2)
            rolled = op("Concat", [high, low], p + "rolled", axis=-1)
            qk = op(
                "Add",
                [op("Mul", [qk, "cos"], p + "qc"), op("Mul", [rolled, "sin"], p + "rs")],
                p + "qk_rot",
            )
            q, k = split([qk, q_k], [p + "q", p + "k"], axis=1)
            new_k.append(k)  # [R, kv, dim]
            new_v.append(v)  # [R, kv * dim]
            # [kv, n, heads per kv head, t, dim]: a sequence's queries of a kv head as the rows
            # of one matmul; its new keys and values [kv, n, t, dim]
            q = op("Reshape", [q, "q5"], p + "q5")  # [n, t, kv, heads per kv head, dim]
            q = op("Transpose", [q], p + "qt", perm=[2, 0, 3, 1, 4])
            k = op("Transpose", [op("Reshape", [k, "kv4"], p + "k4")], p + "kt", perm=[2, 0, 1, 3])
            v = op("Transpose", [op("Reshape", [v, "kv4"], p + "v4")], p + "vt", perm=[2, 0, 1, 3])
            # attention as the op-by-op path computes it: each sequence's rows of this layer's
            # pools in position order, its new keys and values put in their rows (``at``), then
            # the rows each token sees (``mask``), so a prompt's rows and sums are the same
            # whether it is computed whole, after a cached prefix or beside other sequences
            base = const(p + "base", torch.tensor(i * kv * pool_rows))
            index = op("Add", ["index", base], p + "index")  # rows of layer i's pools
            rows = []
            for pool, new in (("k_pool", k), ("v_pool", v)):
                read = op("Gather", [pool, index], p + pool, axis=0)  # [kv, n, L, dim]
                put = op("ScatterElements", [read, "at", new], p + pool + "_put", axis=2)
                rows.append(op("Unsqueeze", [put, two], p + pool + "_rows"))  # [kv, n, 1, L, dim]
            fused = {"domain": "com.microsoft", "transB": 1, "alpha": scale}
            scores = op("FusedMatMul", [q, rows[0]], p + "scores0", **fused)
            scores = op("Add", [scores, "mask"], p + "scores")  # [kv, n, per kv, t, L]
            probs = op("Softmax", [scores], p + "probs", axis=-1)
            out = op("MatMul", [probs, rows[1]], p + "o_heads")  # [kv, n, per kv, t, dim]
            out = op("Transpose", [out], p + "o_t", perm=[1, 3, 0, 2, 4])
            attn = op("Reshape", [out, as_rows], p + "attn")
            # the rest of the layer: output projection, residual, norm, MLP, residual
            x1 = op("Add", [x, matmul(layer.o, p + "o", attn)], p + "x1")
            h = norm(p + "post", x1, layer.post_norm)
            gu = matmul(layer.gate_up, p + "gate_up", h)
            gate, up = split([gu], [p + "gate", p + "up"], axis=-1, num_outputs=2)
            silu = op("Mul", [gate, op("Sigmoid", [gate], p + "sig")], p + "silu")
            act = op("Mul", [silu, up], p + "act")
            x = op("Add", [x1, matmul(layer.down, p + "down", act)], p + "x2")
            if i + 1 < len(layers):
                nxt = layers[i + 1]
                qkv = matmul(nxt.qkv, f"l{i + 1}.qkv", norm(f"l{i + 1}.in", x, nxt.input_norm))
        x = op("Gather", [x, "last"], "x_last", axis=0)  # each sequence's last token
        logits = matmul(head, "head", norm("final", x, final_norm))
        op("Identity", [logits], "logits")
        op("Concat", new_k, "k_new", axis=0)
        op("Concat", new_v, "v_new", axis=0)

        def value(name: str, elem: int, dims: list[Any] | None) -> Any:
            return helper.make_tensor_value_info(name, elem, dims)

        f, i64 = TensorProto.FLOAT, TensorProto.INT64
        graph = helper.make_graph(
            nodes,
            "ragline_decode",
            [
                value("x", f, ["R", shape.hidden_size]),
                value("cos", f, ["R", 1, dim]),
                value("sin", f, ["R", 1, dim]),
                value("k_pool", f, [len(layers) * kv * pool_rows, dim]),
                value("v_pool", f, [len(layers) * kv * pool_rows, dim]),
                value("index", i64, [kv, "n", "L"]),
                value("at", i64, [kv, "n", "t", dim]),
                value("mask", f, ["n", 1, "t", "L"]),
                value("last", i64, ["n"]),
                value("q5", i64, [5]),
                value("kv4", i64, [4]),
            ],
            [value(n, f, None) for n in ("logits", "k_new", "v_new")],
            inits,
        )
        opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
        self._session = session(model)
        self._kv = kv
        self._groups = heads // kv
        self._layers = len(layers)
        self._heads = torch.arange(kv).view(kv, 1, 1) * pool_rows

    def step(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pools: tuple[torch.Tensor, torch.Tensor],
        pos: torch.Tensor,
        write: torch.Tensor,
        read: Rows,
    ) -> torch.Tensor:
        """The runner's decode step (``LlamaRunner._decode``): ``n`` sequences' embeddings ``x``,
        rotary rows ``cos``/``sin`` and positions ``pos``; each attends to the rows ``read`` up
        to ``pos``, its new token's among them; the new keys and values are then written to
        rows ``write`` of ``pools`` (``LlamaRunner.k_pools``, ``v_pools``). Returns the logits."""
        n = pos.shape[0]
        real = torch.ones(n, 1, dtype=torch.bool)
        last = torch.arange(n)
        return self.forward(x, cos, sin, pools, pos.view(n, 1), real, write, read, last)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pools: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        real: torch.Tensor,
        write: torch.Tensor,
        read: Rows,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """``t`` new tokens of each of ``n`` sequences (a prefill; ``t`` is 1 in a decode step):
        ``x`` ``[n, t, hidden]``, ``cos``/``sin`` their rotary rows, ``positions`` ``[n, t]``
        and which of them are tokens, not padding (``real``). ``read`` ``[n, L]`` are the pool
        rows of positions ``0 .. L - 1`` of each sequence, past the last new token; each token
        attends to those up to its position, the new ones taken from this pass. Their keys and
        values go to rows ``write`` ``[n * t]`` of ``pools`` afterwards (padding to the null
        block). Returns the logits of the tokens ``last`` (indices into the ``n * t`` rows)."""
        rows = as_index(read, positions.device)
        n, length = rows.shape
        # one more row, the null block's first: padding tokens are put there, seen by none
        rows = torch.cat([rows, torch.zeros(n, 1, dtype=rows.dtype)], dim=1)
        at = torch.where(real, positions, length)
        mask = additive_mask(length + 1, positions, inclusive=True)
        mask[..., length] = float("-inf")
        k_pools, v_pools = pools
        logits, k_new, v_new = self.run(x, cos, sin, k_pools, v_pools, rows, mask, at, last)
        k_pools[:, :, write] = k_new.transpose(1, 2)
        v_pools[:, :, write] = v_new.transpose(1, 2)
        return logits

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_pools: torch.Tensor,
        v_pools: torch.Tensor,
        rows: torch.Tensor,
        mask: torch.Tensor,
        at: torch.Tensor,
        last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph on ``R = n * t`` token rows: ``x`` ``[R, hidden]``, ``cos``/``sin`` ``[R,
        dim]``, ``rows`` ``[n, L]`` the pool rows each sequence reads in position order,
        ``mask`` ``[n, t, L]`` which of them each token sees (0 or -inf), ``at`` ``[n, t]`` the
        row each new token's keys and values take among them. Returns the logits of rows
        ``last`` and the new keys and values ``[layers, R, kv, dim]``."""
        import numpy as np

        n, length = rows.shape
        t = at.shape[1]
        dim = k_pools.shape[-1]
        kv, groups = self._kv, self._groups

        def dims(*values: int) -> Any:
            return np.array(values, dtype=np.int64)

        logits, k_new, v_new = self._session.run(
            None,
            {
                "x": x.reshape(n * t, -1).float().numpy(),
                "cos": cos.reshape(n * t, 1, -1).float().numpy(),
                "sin": sin.reshape(n * t, 1, -1).float().numpy(),
                "k_pool": k_pools.view(-1, dim).numpy(),
                "v_pool": v_pools.view(-1, dim).numpy(),
                "index": (self._heads + rows.unsqueeze(0)).numpy(),
                "at": at.view(1, n, t, 1).expand(kv, n, t, dim).contiguous().numpy(),
                "mask": mask.view(n, 1, t, length).numpy(),
                "last": last.numpy(),
                "q5": dims(n, t, kv, groups, dim),
                "kv4": dims(n, t, kv, dim),
            },
        )
        new = (self._layers, n * t, kv, dim)
        return (
            torch.from_numpy(logits),
            torch.from_numpy(k_new).view(new),
            torch.from_numpy(v_new).view(new),
        )


def decode_graph(
    layers: list[Any],
    final_norm: torch.Tensor,
    head: Any,
    shape: LlamaShape,
    pool_rows: int,
    copies: bool = False,
) -> DecodeGraph | None:
    """The graph of decoder layers (``llama_weights.Layer``) on their ONNX Runtime weights, or
    on their copies for long prefills (``Layer.dense``, the int8 copy); None where some weight
    (the LM head included) is not one."""
    names = ("qkv", "o", "gate_up", "down")
    parts = []
    for layer in layers:
        source = layer.dense if copies else {n: getattr(layer, n) for n in names}
        found = [source.get(n) for n in names] if source is not None else []
        mats = [m for m in found if isinstance(m, OrtWeight)]
        if len(mats) != len(names):
            return None
        qkv, o, gate_up, down = mats
        parts.append(LayerWeights(layer.input_norm, qkv, o, layer.post_norm, gate_up, down))
    if not isinstance(head, OrtWeight):
        return None
    return DecodeGraph(parts, final_norm, head, shape, pool_rows)
