"""The weights of a Llama checkpoint as ``llama.py``'s forward pass holds them: the config's few
numbers the pass needs (``LlamaShape``), each layer's projections fused (q/k/v and gate/up as one
matrix each) and optionally int8 or int4 (``quant.py``), with a dense copy for long prefills if
asked, and the rotary tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateway.backends.multilora import LoraPair
from gateway.backends.ort_int4 import NBitsWeight, QGemmWeight
from gateway.backends.quant import Int4Kernel, Int4Weight, PackedWeight, Quant, Weight
from gateway.backends.quant_cache import QuantCache


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
class Layer:
    """One decoder layer's weights, q/k/v and gate/up fused into one matmul each."""

    input_norm: torch.Tensor
    qkv: Weight  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Weight
    post_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight
    lora: dict[str, LoraPair] | None = None  # stacked adapters per fused projection
    # the four projections by name (qkv, o, gate_up, down) for long prefills (``dense_prefill``)
    # when the weights above are quantized: unquantized, or in int8 for ONNX Runtime's integer
    # GEMM with its int4 kernel (``QGemmWeight``)
    dense: dict[str, Weight] | None = None


def fuse_weights(
    weights: dict[str, torch.Tensor],
    shape: LlamaShape,
    dtype: torch.dtype,
    device: torch.device,
    quant: Quant = "none",
    dense: torch.dtype | None = None,
    cache: QuantCache | None = None,
    kernel: Int4Kernel = "torch",
) -> tuple[torch.Tensor, Weight, torch.Tensor, list[Layer]]:
    """The embedding, LM head, final norm and layers of a transformers Llama state dict.

    ``quant``: ``none``, ``int8`` (every linear layer and the LM head) or ``int4`` (the layers'
    matmuls in int4 where the kernel's shape rules allow, else int8; the LM head, which is also
    the embedding table in tied models and decides every token, in int8). ``dense``: with
    quantized weights, also keep each layer's projections in this dtype (``Layer.dense``):
    ``torch.int8`` for ONNX Runtime's integer GEMM (``QGemmWeight``), which takes int4 weights
    on ONNX Runtime's kernel and is the only copy they take; a float dtype otherwise.
    ``kernel``: whose int4 kernel, PyTorch's (``Int4Weight``, int8 LM head) or ONNX Runtime's
    (``NBitsWeight``: the layers in 4 bits, the LM head in 8, float32 activations).
    ``cache``: quantized weights from an earlier start (``quant_cache.py``). bf16 weights that
    stay unquantized (the model's with ``quant: none``, the LM head included, and the dense
    copy) are prepacked for oneDNN (``PackedWeight``) on CPUs with native bf16."""
    cache = cache or QuantCache(None)
    on_ort = quant == "int4" and kernel == "onnxruntime"
    if dense is not None and quant != "none" and (dense == torch.int8) != on_ort:
        raise ValueError(
            "the int8 prefill copy (ONNX Runtime's integer GEMM) goes with int4 weights on ONNX "
            f"Runtime's kernel, and only it: got a {dense} copy of {quant} weights on {kernel}'s"
        )

    def w(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return weights[name].to(device=device, dtype=as_dtype).contiguous()

    pack = PackedWeight.available(device)

    def packed(t: torch.Tensor) -> Weight:  # bf16 weights on a CPU with native bf16
        return PackedWeight.pack(t) if pack and t.dtype == torch.bfloat16 else t

    def linear_weight(t: torch.Tensor, name: str, head: bool = False) -> Weight:
        if quant == "int4" and kernel == "onnxruntime":
            return cache.nbits(name, t, 8 if head else 4) if NBitsWeight.fits(t) else t
        if quant == "int4" and not head and Int4Weight.fits(t):
            return cache.int4(name, t, dtype)
        return cache.int8(name, t, dtype) if quant in ("int8", "int4") else packed(t)

    embed = w("model.embed_tokens.weight")
    head = embed if shape.tie_word_embeddings else w("lm_head.weight")

    def projections(p: str, as_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer ``p``'s projections, q/k/v and gate/up fused, by ``Layer``'s field names."""
        qkv = [w(p + f"self_attn.{n}_proj.weight", as_dtype) for n in ("q", "k", "v")]
        gate_up = [w(p + f"mlp.{n}_proj.weight", as_dtype) for n in ("gate", "up")]
        return {
            "qkv": torch.cat(qkv).contiguous(),
            "o": w(p + "self_attn.o_proj.weight", as_dtype),
            "gate_up": torch.cat(gate_up).contiguous(),
            "down": w(p + "mlp.down_proj.weight", as_dtype),
        }

    layers: list[Layer] = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        plain = projections(p, dtype)
        fused = {name: linear_weight(t, p + name) for name, t in plain.items()}
        copy: dict[str, Weight] | None = None
        if dense == torch.int8 and on_ort:
            copy = {n: QGemmWeight.quantize(t) for n, t in plain.items() if n != "down"}
            copy["down"] = fused["down"]
        elif dense is not None and quant != "none":  # the same tensors when the dtypes agree
            source = plain if dense == dtype else projections(p, dense)
            copy = {n: packed(t) for n, t in source.items()}
        layers.append(
            Layer(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=fused["qkv"],
                o=fused["o"],
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=fused["gate_up"],
                down=fused["down"],
                dense=copy,
            )
        )
    head_weight = linear_weight(head, "lm_head", head=True)
    cache.save()
    return embed, head_weight, w("model.norm.weight"), layers


def rotary_tables(
    shape: LlamaShape, max_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, in the weights' dtype, as transformers computes them,
    except that sin's first half is negated: the rotation is then ``x * cos + roll(x) * sin``
    (``llama_ops.rope``), the same products as transformers' ``rotate_half`` in fewer ops."""
    inv_freq = 1.0 / (
        shape.rope_theta
        ** (torch.arange(0, shape.head_dim, 2, dtype=torch.int64).float() / shape.head_dim)
    )
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : shape.head_dim // 2] *= -1
    return emb.cos().to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
