"""The backend interface every generator implements, and the internal types it speaks.

Wire types (``gateway.protocol``) stop at the service boundary; backends see a
``GenerationRequest`` and produce ``Chunk`` events or a ``Generation``.

Contract of ``Backend``:
- ``start()`` may take long (loading weights); ``ready`` tells whether requests can be served.
- ``stream(request)`` yields ``Chunk``s for every choice (``index`` in ``0..n-1``), each choice
  ends with exactly one chunk whose ``finish_reason`` is set, and the iterator ends with one
  ``Usage``. Closing the iterator early (client gone) cancels the work.
- ``generate(request)`` is ``stream`` collected.
- Errors are ``RaglineError`` subclasses: ``InvalidRequest`` for input the model cannot take,
  ``Overloaded`` when its queue is full.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway.config import AdapterConfig


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete ``n`` times. Exactly one of ``messages``/``prompt``/``prompt_ids``."""

    request_id: str
    model: str
    params: GenerationParams
    n: int = 1
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    adapter: str | None = None  # a LoRA adapter the backend has loaded; None: the base model


@dataclass(frozen=True)
class TokenInfo:
    """One generated token with its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Chunk:
    index: int
    text: str
    finish_reason: str | None = None
    tokens: list[TokenInfo] | None = None  # set when logprobs were asked for


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[TokenInfo] | None = None


@dataclass
class Generation:
    choices: list[Choice]
    usage: Usage
    extras: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int
    max_model_len: int | None = None
    root: str | None = None
    parent: str | None = None


@runtime_checkable
class Backend(Protocol):
    @property
    def ready(self) -> bool: ...

    def models(self) -> list[ModelInfo]: ...

    def stats(self) -> dict[str, int]:
        """Current load, e.g. ``{"running": 3, "waiting": 0}``."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk | Usage]: ...

    async def generate(self, request: GenerationRequest) -> Generation: ...


@dataclass
class ProxyCall:
    """One client request to forward: the body is the client's own, as validated."""

    endpoint: str  # "/v1/chat/completions" or "/v1/completions"
    body: dict[str, Any]
    stream: bool
    include_usage: bool  # whether the client asked for the usage event
    public_model: str  # the name the client used
    adapter: AdapterConfig | None = None
    request_id: str | None = None
    usage: tuple[int, int] | None = None  # filled by the backend when the stream reports it


@dataclass
class ProxyResult:
    status: int
    body: bytes = b""  # a complete JSON response (non-streaming, or an upstream 4xx)
    events: AsyncIterator[bytes] | None = None  # SSE events, for a stream
    replica: str = ""


@runtime_checkable
class ProxyBackend(Protocol):
    """A backend that forwards OpenAI requests as they are (vLLM)."""

    async def proxy(self, call: ProxyCall) -> ProxyResult: ...


async def collect(events: AsyncIterator[Chunk | Usage], n: int) -> Generation:
    """Gather a ``stream`` into a ``Generation`` (the shared ``generate`` implementation)."""
    choices = [Choice(index=i) for i in range(n)]
    usage = Usage(0, 0)
    async for event in events:
        if isinstance(event, Usage):
            usage = event
            continue
        choice = choices[event.index]
        choice.text += event.text
        if event.tokens is not None:
            choice.tokens = (choice.tokens or []) + event.tokens
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
    return Generation(choices=choices, usage=usage)
