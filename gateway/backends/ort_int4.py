"""int4 linear layers through ONNX Runtime's ``MatMulNBits`` (the engine's int4 kernel on CPUs
without native bf16).

PyTorch's int4 CPU kernel (``quant.Int4Weight``) unpacks each weight to float and multiplies in
float; on an AVX2-only CPU a decode step's int4 matmuls alone take about as long as llama.cpp's
whole step. ONNX Runtime's ``MatMulNBits`` with ``accuracy_level=4`` quantizes the activations
to int8 per block of 32 and multiplies integers (what llama.cpp's Q4_1 x Q8_1 dot product does):
on the 2-core AVX2 machine a step's 120 layer matmuls take 7.5 ms against 10.4 and the LM head
(in 8 bits) 0.9 ms against 3.2 for PyTorch's int8 kernel (README, the embedded engine).

The whole forward pass, attention included, is one ONNX graph (``ort_decode.DecodeGraph``), for
a decode step and a prefill alike; this module's weights build their nodes into it. Activations
are float32 (the kernel takes float32). Called, a weight runs in a session of its own: the
per-op path LoRA adapters take, their deltas added between the matmuls.

With ``dense_prefill`` long prompts are prefilled through the same graph on an int8 copy of the
q/k/v, output and gate/up projections (``QGemmWeight``, the runtime's integer GEMM), whose time
grows far less with the number of rows than ``MatMulNBits``'.

Weights are quantized per group of 32 inputs (4 bits for the layers, as llama.cpp's Q4_1; 8 for
the LM head, which decides every token), in the layout ``MatMulNBits`` reads (``NBitsWeight``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import onnxruntime as ort

NBITS_GROUP = 32  # input weights per scale and zero point
# the int8 GEMM's weights in 7 bits: on AVX2 MLAS multiplies uint8 activations by int8 weights
# with VPMADDUBSW, whose int16 sum of two products saturates at full range (ONNX Runtime's
# quantization guide: "reduce_range"); a layer's outputs were 23% off
QGEMM_MAX = 63
ACCURACY_LEVEL = 4  # int8 activations per block: MLAS's integer kernels (0: float32, slow)


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session(model: bytes) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU, on the process's shared thread pool (one pool for
    all the engine's sessions; per-session pools without spinning made a step 15% slower)."""
    import onnxruntime as ort

    from rag.onnx_model import session_options, share_thread_pool

    share_thread_pool(cpu_threads())
    options = session_options(cpu_threads(), spinning=True)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OrtWeight:
    """A weight multiplied by ONNX Runtime: ``node`` builds it into a layer graph; called, it
    runs in a session of its own (the LM head; each projection once LoRA adapters are loaded:
    their deltas are added between the layer graph's steps)."""

    in_features: int
    out_features: int
    _session: Any

    def node(self, name: str, x: str, out: str) -> tuple[list[Any], list[Any]]:
        raise NotImplementedError

    def prepare(self) -> ort.InferenceSession:
        """The session of this one matmul, built once."""
        if self._session is None:
            nodes, inits = self.node("w", "x", "y")
            self._session = session(_model(nodes, inits, {"x": self.in_features}, ["y"]))
        return self._session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for ``x`` ``[..., in]``, in float32, returned in ``x``'s dtype."""
        flat = x.reshape(-1, self.in_features).float().contiguous()
        (y,) = self.prepare().run(None, {"x": flat.numpy()})
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features).to(x.dtype)


@dataclass(eq=False)
class NBitsWeight(OrtWeight):
    """A linear layer's ``[out, in]`` weight in ``bits`` (4 or 8) per group of 32 inputs.

    4 bits: llama.cpp's Q4_1, ``w = q * scale + offset`` per group (its smallest and largest
    weight map to 0 and 15). ``MatMulNBits`` takes integer zero points only on its fast path, and
    rounding the offset to a whole step loses what Q4_1 keeps (SmolLM2's weights, dequantized
    from a Q4_1 file, are stored exactly by Q4_1 and lose 0.6-0.8% of their energy with an
    integer zero point: 85% of greedy steps agreed with float32 against 99%). So the kernel
    multiplies ``q * scale`` (zero point 0) and the offsets are added as ``sum of the group's
    inputs @ offsets``, a matmul 32 times smaller. 8 bits: symmetric, zero point 128."""

    packed: torch.Tensor  # uint8 [out, in / 32, 32 * bits / 8], low nibble first
    scales: torch.Tensor  # float32 [out * in / 32]
    offsets: torch.Tensor | None  # float32 [in / 32, out] (4 bits), None (8 bits)
    bits: int
    in_features: int
    out_features: int
    _session: Any = field(default=None, repr=False)  # the lone matmul's session, made on use

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.shape[1] % NBITS_GROUP == 0

    @property
    def groups(self) -> int:
        return self.in_features // NBITS_GROUP

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int = 4) -> NBitsWeight:
        out, inp = weight.shape
        w = weight.float().view(out, inp // NBITS_GROUP, NBITS_GROUP)
        if bits == 8:
            scale = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
            q = (torch.round(w / scale) + 128).clamp(1, 255).to(torch.uint8)
            offsets = None
        else:
            low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
            scale = ((high - low) / 15).clamp(min=1e-8)
            q = torch.round((w - low) / scale).clamp(0, 15).to(torch.uint8)
            q = q[..., 0::2] | (q[..., 1::2] << 4)
            offsets = low.squeeze(-1).t().contiguous()
        return cls(q.contiguous(), scale.reshape(-1).contiguous(), offsets, bits, inp, out)

    def _zeros(self) -> torch.Tensor:
        if self.bits == 8:
            return torch.full((self.out_features * self.groups,), 128, dtype=torch.uint8)
        return torch.zeros(self.out_features * -(-self.groups // 2), dtype=torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the kernel multiplies by (tests)."""
        q = self.packed
        if self.bits == 4:
            q = torch.stack([q & 15, q >> 4], dim=-1)
        q = q.view(self.out_features, self.groups, NBITS_GROUP).float()
        if self.bits == 8:
            q = q - 128
        w = q * self.scales.view(self.out_features, self.groups, 1)
        if self.offsets is not None:
            w = w + self.offsets.t().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)

    def node(self, name: str, x: str, out: str) -> tuple[list[Any], list[Any]]:
        """The nodes computing ``out = x @ w.T`` (``x`` ``[rows, in]``) and their initializers."""
        from onnx import helper, numpy_helper

        def init(array: torch.Tensor, suffix: str) -> str:
            inits.append(numpy_helper.from_array(array.numpy(), f"{name}.{suffix}"))
            return f"{name}.{suffix}"

        inits: list[Any] = []
        weight = [init(self.packed, "B"), init(self.scales, "scales"), init(self._zeros(), "zeros")]
        nodes = [
            helper.make_node(
                "MatMulNBits",
                [x, *weight],
                [out if self.offsets is None else f"{name}.q"],
                domain="com.microsoft",
                K=self.in_features,
                N=self.out_features,
                bits=self.bits,
                block_size=NBITS_GROUP,
                accuracy_level=ACCURACY_LEVEL,
            )
        ]
        if self.offsets is not None:  # + (x summed per group) @ offsets: three nodes
            grouped = init(torch.tensor([0, self.groups, NBITS_GROUP]), "grouped")
            nodes += [
                helper.make_node("Reshape", [x, grouped], [f"{name}.x3"]),
                helper.make_node(
                    "ReduceSum",
                    [f"{name}.x3", init(torch.tensor([2]), "axis")],
                    [f"{name}.sums"],
                    keepdims=0,
                ),
                helper.make_node(
                    "Gemm",
                    [f"{name}.sums", init(self.offsets, "offsets"), f"{name}.q"],
                    [out],
                ),
            ]
        return nodes, inits


@dataclass(eq=False)
class QGemmWeight(OrtWeight):
    """A linear layer's weight in int8 (7-bit steps, ``QGEMM_MAX``), one scale per output
    channel, multiplied by ONNX Runtime's ``MatMulInteger`` (MLAS's u8s8 GEMM) after each row of
    activations is quantized on its own in the graph. The copy long prompts are prefilled with
    on the ONNX Runtime path: at 40 rows SmolLM2's 30 layers of matmuls took 30 ms on the integer
    GEMM against 56 with ``MatMulNBits`` in 4 bits, which unpacks and quantizes per block of 32
    (2-core AVX2 machine, a microbenchmark); at one row 4 bits win (3.7 against 4.8 ms), so
    decoding stays in 4 bits. One scale for the whole activation matrix
    (``DynamicQuantizeMatMul``) agreed with float32's greedy steps on 78% against 93% per row."""

    weight: torch.Tensor  # int8 [in, out], the layout the kernel reads
    scales: torch.Tensor  # float32 [out]
    in_features: int
    out_features: int
    _session: Any = field(default=None, repr=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> QGemmWeight:
        from gateway.backends.quant import Int8Weight  # quant.py imports this module

        int8 = Int8Weight.quantize(weight, torch.float32, qmax=QGEMM_MAX)
        return cls(int8.q.t().contiguous(), int8.scales, weight.shape[1], weight.shape[0])

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the kernel multiplies by (tests)."""
        return (self.weight.float() * self.scales).t().contiguous()

    def node(self, name: str, x: str, out: str) -> tuple[list[Any], list[Any]]:
        """``x`` quantized per row (symmetric, as uint8 around 128), an integer matmul, then
        each row's and each column's scale."""
        from onnx import TensorProto, helper, numpy_helper

        arrays = {
            "B": self.weight,
            "scales": self.scales,
            "a_zero": torch.tensor(128, dtype=torch.uint8),
            "max": torch.tensor(127.0),
            "eps": torch.tensor(1e-8),
            "mid": torch.tensor(128.0),
            "axes": torch.tensor([-1]),
        }
        inits = [numpy_helper.from_array(a.numpy(), f"{name}.{k}") for k, a in arrays.items()]
        n = f"{name}."

        def op(kind: str, inputs: list[str], output: str, **attrs: Any) -> Any:
            return helper.make_node(kind, inputs, [output], **attrs)

        nodes = [
            op("Abs", [x], n + "abs"),
            op("ReduceMax", [n + "abs", n + "axes"], n + "amax", keepdims=1),
            op("Max", [n + "amax", n + "eps"], n + "amax1"),
            op("Div", [n + "amax1", n + "max"], n + "row_scale"),
            op("Div", [x, n + "row_scale"], n + "xs"),
            op("Round", [n + "xs"], n + "xr"),
            op("Add", [n + "xr", n + "mid"], n + "xu"),
            op("Cast", [n + "xu"], n + "xq", to=TensorProto.UINT8),
            op("MatMulInteger", [n + "xq", n + "B", n + "a_zero"], n + "acc"),
            op("Cast", [n + "acc"], n + "accf", to=TensorProto.FLOAT),
            op("Mul", [n + "accf", n + "row_scale"], n + "y_rows"),
            op("Mul", [n + "y_rows", n + "scales"], out),
        ]
        return nodes, inits


def _model(nodes: list[Any], inits: list[Any], inputs: dict[str, int], outputs: list[str]) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "ragline",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", d])
            for n, d in inputs.items()
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model: bytes = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return model


@dataclass
class LayerWeights:
    """What ``ort_decode.DecodeGraph`` needs of one decoder layer (``llama_weights.Layer``'s
    fields)."""

    input_norm: torch.Tensor
    qkv: OrtWeight
    o: OrtWeight
    post_norm: torch.Tensor
    gate_up: OrtWeight
    down: OrtWeight
