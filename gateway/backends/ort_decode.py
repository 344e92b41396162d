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
one tensor for every layer), and each sequence's past rows, the paged cache's block table turned
into row numbers (a run of rows for a lone sequence whose blocks are consecutive), are read with
one ``Gather`` a layer, under a mask for the padding of a batch. The new tokens' keys and values
come back as outputs and the runner writes them to their rows (two PyTorch calls).

Attention is written out of standard operators (``FusedMatMul`` for the scaled ``q @ k.T``): the
past rows' scores and the new tokens' (causal among them) are computed apart and concatenated
before the softmax, so the past keys and values are gathered once and never copied again to
append the new rows, and a prompt computed whole reads no past at all (one masked block). The
same graph is built twice: on the 4-bit weights (decoding, short prompts) and on the int8 copy
(``QGemmWeight``, prompts of ``dense_from`` tokens or more). Batches with LoRA adapters take the
op-by-op path (their deltas go between the matmuls).
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
            # [kv, n, t * heads per kv head, dim]: a sequence's queries of a kv head (token
            # major) as a matmul's rows; its new keys and values [kv, n, t, dim]
            q = op("Reshape", [q, "q5"], p + "q5")  # [n, t, kv, heads per kv head, dim]
            q = op("Transpose", [q], p + "qt", perm=[2, 0, 1, 3, 4])
            q = op("Reshape", [q, "q_rows"], p + "q4")
            k = op("Transpose", [op("Reshape", [k, "kv4"], p + "k4")], p + "kt", perm=[2, 0, 1, 3])
            v = op("Transpose", [op("Reshape", [v, "kv4"], p + "v4")], p + "vt", perm=[2, 0, 1, 3])
            # attention: each sequence's past rows of this layer's pools, then its new tokens
            # (causal among them)
            base = const(p + "base", torch.tensor(i * kv * pool_rows))
            index = op("Add", ["index", base], p + "index")  # rows of layer i's pools
            past = [op("Gather", [pool, index], p + pool, axis=0) for pool in ("k_pool", "v_pool")]
            fused = {"domain": "com.microsoft", "transB": 1, "alpha": scale}
            s_past = op("FusedMatMul", [q, past[0]], p + "s_past0", **fused)
            s_past = op("Add", [s_past, "mask"], p + "s_past")
            s_new = op("FusedMatMul", [q, k], p + "s_new0", **fused)
            s_new = op("Add", [s_new, "causal"], p + "s_new")
            scores = op("Concat", [s_past, s_new], p + "scores", axis=-1)
            probs = op("Softmax", [scores], p + "probs", axis=-1)
            p_past, p_new = split([probs, "split"], [p + "p_past", p + "p_new"], axis=-1)
            out = op(
                "Add",
                [
                    op("MatMul", [p_past, past[1]], p + "o_past"),
                    op("MatMul", [p_new, v], p + "o_new"),
                ],
                p + "o_heads",
            )
            out = op("Reshape", [out, "o5"], p + "o5")  # [kv, n, t, per kv, dim]
            out = op("Transpose", [out], p + "o_t", perm=[1, 2, 0, 3, 4])
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
                value("mask", f, ["n", 1, "L"]),
                value("causal", f, [1, "tG", "t"]),
                value("last", i64, ["n"]),
                value("split", i64, [2]),
                value("q5", i64, [5]),
                value("q_rows", i64, [4]),
                value("kv4", i64, [4]),
                value("o5", i64, [5]),
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
        rotary rows ``cos``/``sin`` and positions ``pos``; each attends to its past, the rows
        ``read`` before ``pos``, and its new token, whose keys and values are then written to
        rows ``write`` of ``pools`` (``LlamaRunner.k_pools``, ``v_pools``). Returns the logits.

        A lone sequence reads its whole blocks too, masked past ``pos``, as in a batch: beside
        sequences of as many blocks it then sums the same rows as alone (the int8 rounding of
        activations amplifies a last bit's difference into another greedy token now and
        then)."""
        n = pos.shape[0]
        last = torch.arange(n, device=pos.device)
        return self.forward(x, cos, sin, pools, pos, write, read, last)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pools: tuple[torch.Tensor, torch.Tensor],
        start: torch.Tensor,
        write: torch.Tensor,
        read: Rows,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """``t`` new tokens of each of ``n`` sequences (a prefill; ``t`` is 1 in a decode step):
        ``x`` ``[n, t, hidden]`` (or ``[n, hidden]``), ``cos``/``sin`` their rotary rows, at
        positions ``start[i] ..``; each token attends to its sequence's past, the rows ``read``
        before ``start``, and to the new tokens up to itself. Their keys and values go to rows
        ``write`` ``[n * t]`` of ``pools`` afterwards (padding to the null block). Returns the
        logits of the tokens ``last`` (indices into the ``n * t`` rows)."""
        rows = as_index(read, start.device)
        t = x.numel() // (rows.shape[0] * x.shape[-1])
        mask = additive_mask(rows.shape[1], start, inclusive=False)
        groups = self._groups
        query = torch.arange(t, device=start.device).repeat_interleave(groups)
        causal = additive_mask(t, query, inclusive=True)  # [t * groups, t]
        k_pools, v_pools = pools
        logits, k_new, v_new = self.run(x, cos, sin, k_pools, v_pools, rows, mask, causal, last)
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
        causal: torch.Tensor,
        last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph on ``R = n * t`` token rows: ``x`` ``[R, hidden]``, ``cos``/``sin`` ``[R,
        dim]``, ``rows`` ``[n, L]`` the pool rows of each sequence's past keys and values,
        ``mask`` ``[n, L]`` which of those it sees (0 or -inf), ``causal`` ``[t * groups, t]``
        which new tokens each query row sees. Returns the logits of rows ``last`` and the new
        keys and values ``[layers, R, kv, dim]``."""
        import numpy as np

        n, length = rows.shape
        dim = k_pools.shape[-1]
        t = causal.shape[-1]
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
                "mask": mask.view(n, 1, length).numpy(),
                "causal": causal.view(1, t * groups, t).numpy(),
                "last": last.numpy(),
                "split": dims(length, t),
                "q5": dims(n, t, kv, groups, dim),
                "q_rows": dims(kv, n, t * groups, dim),
                "kv4": dims(n, t, kv, dim),
                "o5": dims(kv, n, t, groups, dim),
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
