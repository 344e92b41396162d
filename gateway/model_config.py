"""The ``models`` and ``adapters`` entries of the YAML file: the embedded engine's settings and
an HTTP upstream's (vLLM or any OpenAI-compatible server), told apart by ``backend``.
``gateway.config`` re-exports them with the rest of the file's schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

DEFAULT_MODEL_NAME = "smollm2"


_FALLBACKS = (
    "Other models (names under `models`) tried in order when this one fails before the first "
    "byte reaches the client: a 5xx, a refused connection, a timeout, not ready (a 4xx is not)."
)


# the weights' format asked for: `auto` resolves to one of backends/quant.py's ``Quant``
Quantization = Literal["auto", "none", "int8", "int4"]


class EmbeddedModelConfig(BaseModel):
    """A model served in-process by the embedded engine (transformers weights, our scheduler)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Public model id clients send as `model`.")
    backend: Literal["embedded"] = "embedded"
    path: Path | None = Field(
        default=None, description="Checkpoint directory; default: the pulled SmolLM2 checkpoint."
    )
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Quantization = Field(
        default="auto",
        description="`int8`: int8 weights with per-channel scales for the linear layers (CPU "
        "only; activations in bf16). `int4`: the layers' weights in 4 bits with a scale and an "
        "offset per 32 (llama.cpp's Q4_1), the LM head in int8 (CPU only). `auto`: int4 on CPU "
        "unless `dtype` is set, else none.",
    )
    int4_kernel: Literal["auto", "torch", "onnxruntime"] = Field(
        default="auto",
        description="Whose kernel multiplies `int4` weights: `torch` (PyTorch's, bf16 "
        "activations, the LM head in int8) or `onnxruntime` (ONNX Runtime's MatMulNBits with int8 "
        "activations, float32 elsewhere, the LM head in 8 bits, an int8 copy for prefills). "
        "`auto`: `onnxruntime`, whose decode step is one graph: 1.5-1.9x PyTorch's tokens/s on "
        "the 2-core AMX and AVX2 machines measured; `torch` takes about 0.6 GB less memory and "
        "prefills prompts of 128-256 tokens faster where bf16 is native.",
    )
    dense_prefill: bool = Field(
        default=True,
        description="With `int8` or `int4` weights, keep a dense copy of the layers' weights "
        "(bf16 where the CPU computes bf16 natively, else float32: about 0.2 or 0.4 GB more for "
        "SmolLM2; with `int4_kernel: onnxruntime`, int8 for the runtime's integer GEMM, 0.1 GB) "
        "and prefill prompts of 32 tokens or more with it; the quantized kernels' time grows with "
        "every prompt token, a dense or int8 GEMM's far less. `false`: quantized throughout.",
    )
    max_batch: int = Field(
        default=64,
        ge=1,
        le=256,
        description="The most sequences decoded together (a cap: free KV cache blocks decide).",
    )
    max_waiting: int = Field(
        default=64, ge=0, description="Requests queued beyond the batch before 503 Retry-After."
    )
    max_model_len: int = Field(default=2048, ge=16, description="Prompt + completion tokens.")
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory for the paged KV cache, GiB (default: 16 sequences of "
        "`max_model_len` tokens; at least one).",
    )
    kv_block_size: int = Field(
        default=16, ge=1, le=256, description="Tokens per KV cache block (the unit of sharing)."
    )
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV cache of prompts that start alike (system prompts, few-shot "
        "examples, chat history).",
    )
    prefix_cache_scope: Literal["global", "key"] = Field(
        default="global",
        description="`key`: cached prompt blocks are reused only by the API key that computed "
        "them (no key can tell from its latency whether another key sent a prompt).",
    )
    cuda_graphs: bool = Field(
        default=True, description="On CUDA, replay the decode step as graphs."
    )
    tool_template: Path | None = Field(
        default=None,
        description="A Jinja chat template that renders `tools` (default: the model's own if it "
        "does, else ragline's ChatML template with Hermes-style <tool_call> blocks).",
    )
    owned_by: str = "ragline"
    fallbacks: list[str] = Field(default_factory=list, description=_FALLBACKS)


class UpstreamTimeouts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connect: float = Field(default=5.0, gt=0, description="Seconds to open a connection.")
    first_token: float = Field(default=60.0, gt=0, description="Seconds until the first event.")
    total: float = Field(default=600.0, gt=0, description="Seconds for the whole response.")
    pool_wait: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a free pooled connection (503)."
    )


class HealthPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        default=None,
        description="Path checked actively (GET, 200 = healthy); default: /health for vllm, "
        "/v1/models for openai. `none`: no active checks, failures alone eject.",
    )
    interval: float = Field(default=5.0, gt=0, description="Seconds between active checks.")
    timeout: float = Field(default=2.0, gt=0)
    max_failures: int = Field(default=3, ge=1, description="Consecutive failures that eject.")
    eject_seconds: float = Field(default=10.0, ge=0, description="Minimum time out of rotation.")


class HttpModelConfig(BaseModel):
    """A model served by OpenAI-compatible HTTP servers (replicas of one deployment)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Public model id clients send as `model`.")
    upstreams: list[str] = Field(min_length=1, description="Base URLs of the servers.")
    served_model: str | None = Field(
        default=None, description="The model name the upstream serves; default: name."
    )
    api_key: str | None = Field(
        default=None, description="Bearer token the upstream expects (prefer api_key_env)."
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the upstream's bearer token."
    )
    max_connections: int = Field(default=256, ge=1, description="Pooled connections per replica.")
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    max_model_len: int | None = None
    tokenizer: Path | None = Field(
        default=None,
        description="Local tokenizer directory of the served model; routes with prompt templates "
        "need it to count tokens (the pulled SmolLM2 directory for `smollm2`).",
    )
    fallbacks: list[str] = Field(default_factory=list, description=_FALLBACKS)
    owned_by: str = "openai"

    @field_validator("upstreams")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} must be an http:// or https:// URL")
        return [u.rstrip("/").removesuffix("/v1") for u in urls]

    @model_validator(mode="after")
    def _one_key(self) -> HttpModelConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("set api_key or api_key_env, not both")
        return self

    @property
    def upstream_model(self) -> str:
        return self.served_model or self.name

    def health_path(self) -> str | None:
        path = self.health.path
        if path is None:
            return self.default_health_path
        return None if path.lower() == "none" else path

    default_health_path: ClassVar[str | None] = "/v1/models"


class OpenAIModelConfig(HttpModelConfig):
    """Any OpenAI-compatible server: llama.cpp's, TGI, another ragline, a hosted API."""

    backend: Literal["openai"]


class VllmModelConfig(HttpModelConfig):
    """vLLM OpenAI servers: LoRA adapters are loaded on them on demand."""

    backend: Literal["vllm"]
    owned_by: str = "vllm"
    default_health_path: ClassVar[str | None] = "/health"
    constrain_tool_calls: bool = Field(
        default=True,
        description="Send required and named tool choices to vLLM as a json_schema response "
        "format of the calls (vLLM on CPU does not constrain them), and turn the JSON back "
        "into tool_calls.",
    )


def _backend_of(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("backend", "embedded"))
    return str(getattr(value, "backend", "embedded"))


ModelConfig = Annotated[
    Annotated[EmbeddedModelConfig, Tag("embedded")]
    | Annotated[VllmModelConfig, Tag("vllm")]
    | Annotated[OpenAIModelConfig, Tag("openai")],
    Discriminator(_backend_of),
]


class AdapterConfig(BaseModel):
    """A LoRA adapter served by name on top of a base model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Public id; clients send it (or `base:name`) as `model`.")
    path: str = Field(description="Adapter directory as the serving replicas see it.")
    base: str = Field(description="Name of the base model (a `models` entry).")
