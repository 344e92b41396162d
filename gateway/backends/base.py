"""The backend contract every generator implements, and the internal types it speaks.

    Backend ─┬─ embedded   transformers weights in this process, continuous batching
             ├─ openai     any OpenAI-compatible HTTP upstream: replicas, health, failover
             └─ vllm       openai, plus LoRA adapters loaded on demand and placement in Redis

Wire types (``gateway.protocol``) stop at the service boundary; a backend sees a
``GenerationRequest`` and produces ``Chunk`` events and one ``Usage``, or a ``Generation``.
``responses.py`` renders those as OpenAI JSON or SSE, so output safety, the cache, metrics and
usage exist once, whatever the backend.

Contract of ``Backend``:
- ``start()`` may take long (loading weights, a first health check); ``ready`` tells whether
  requests can be served; ``aclose()`` releases everything.
- ``capabilities`` says which request features it honours; the pipeline refuses the others with
  a 400 before any work is done.
- ``stream(request)`` yields ``Chunk``s for every choice (``index`` in ``0..n-1``), each choice
  ending with exactly one chunk whose ``finish_reason`` is set, then exactly one ``Usage``. Its
  first ``__anext__`` either yields (the backend is committed) or raises; closing the iterator
  early (the client left) cancels the work, upstream too.
- ``generate(request)`` is ``stream`` collected.
- Errors are ``RaglineError`` subclasses. ``InvalidRequest`` and an upstream's 4xx
  (``UpstreamError``) are the client's to fix; ``Overloaded`` and ``BackendError`` (a 5xx, a
  refused connection, a timeout) are ``retryable``: the pipeline moves on to the model's next
  fallback, if nothing has reached the client yet.

Adding a backend is one module implementing this protocol, one config type in ``config.py``
and one entry in ``registry.BACKENDS``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


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
    response_format: str | None = None  # canonical JSON of a json_object / json_schema format
    tools: str | None = None  # canonical JSON of the tools a call must use (structured.tools_key)


@dataclass(frozen=True)
class GenerationRequest:
    """One request to complete ``n`` times: a chat (``messages``) or a completion (``prompt``,
    ``prompt_ids``, or several prompts in ``batch``).

    ``body`` is the OpenAI request as the pipeline passes it on (the client's, after templates,
    redactions and key defaults changed it). HTTP backends forward it, so the fields the typed
    ones do not model (vLLM's sampling extensions, say) travel through unchanged; an in-process
    backend reads the typed fields.
    """

    request_id: str
    model: str  # the public name the client used; responses carry it
    params: GenerationParams
    n: int = 1
    messages: tuple[dict[str, Any], ...] | None = None  # role, content; tool_calls, tool_call_id
    tools: tuple[dict[str, Any], ...] = ()  # the functions the chat template shows the model
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    batch: tuple[str | tuple[int, ...], ...] = ()  # several completion prompts (prompt unset)
    echo: bool = False  # completions: the prompt is part of each choice's text
    adapter: str | None = None  # a LoRA adapter of the backend's; None: the base model
    tenant: str | None = None  # the caller's key id (the embedded engine's prefix-cache scope)
    body: Mapping[str, Any] | None = None
    path: str | None = None  # the endpoint ``body`` is for (set with ``body``)

    @property
    def endpoint(self) -> str:
        if self.path is not None:
            return self.path
        return CHAT if self.messages is not None else COMPLETIONS


@dataclass(frozen=True)
class TokenInfo:
    """One generated token with its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Chunk:
    """New text for one choice. ``fields`` and ``extra`` carry what an upstream sent beside the
    text that we do not model (``fields``: the delta's or message's, e.g. ``tool_calls``;
    ``extra``: the choice's, e.g. ``logprobs``, ``stop_reason``), for the response to pass on."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: list[TokenInfo] | None = None  # set when logprobs were asked for (embedded)
    fields: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Chunk | Usage


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[TokenInfo] | None = None
    fields: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


@dataclass
class Generation:
    choices: list[Choice]
    usage: Usage


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int
    max_model_len: int | None = None
    root: str | None = None
    parent: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """Request features a backend honours; the others are a 400 naming the parameter."""

    json_mode: bool = True  # response_format json_object
    tools: bool = True  # tools and tool_choice
    message_names: bool = True  # messages[].name
    best_of: bool = True
    suffix: bool = True
    stream_batches: bool = True  # streaming a completion with several prompts
    echo_token_ids: bool = True  # echo with token-id prompts
    forwards_body: bool = True  # sends ``GenerationRequest.body`` on: needs no typed fields


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: Capabilities

    @property
    def ready(self) -> bool: ...

    def models(self) -> list[ModelInfo]: ...

    def stats(self) -> dict[str, int | str]:
        """Current load, e.g. ``{"running": 3, "waiting": 0}`` (and the embedded engine's
        ``slots`` and ``device``)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Event, None]: ...

    async def generate(self, request: GenerationRequest) -> Generation: ...


async def collect(events: AsyncIterator[Event], n: int) -> Generation:
    """Gather a ``stream`` into a ``Generation`` (the shared ``generate`` implementation)."""
    choices: dict[int, Choice] = {i: Choice(index=i) for i in range(n)}
    usage = Usage(0, 0)
    async for event in events:
        if isinstance(event, Usage):
            usage = event
            continue
        choice = choices.setdefault(event.index, Choice(index=event.index))
        choice.text += event.text
        if event.tokens is not None:
            choice.tokens = (choice.tokens or []) + event.tokens
        if event.fields:
            calls = event.fields.get("tool_calls")
            merged = {**(choice.fields or {}), **event.fields}
            if calls and choice.fields and choice.fields.get("tool_calls"):
                merged["tool_calls"] = merge_tool_calls(choice.fields["tool_calls"], calls)
            elif calls:
                merged["tool_calls"] = merge_tool_calls([], calls)
            choice.fields = merged
        if event.extra:
            choice.extra = {**(choice.extra or {}), **event.extra}
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
    return Generation(choices=[choices[i] for i in sorted(choices)], usage=usage)


def merge_tool_calls(calls: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> list[Any]:
    """Stream deltas of ``tool_calls`` folded into whole calls (the arguments concatenated), as
    a non-streamed message carries them."""
    out = [dict(c, function=dict(c.get("function") or {})) for c in calls]
    for delta in deltas:
        index = delta.get("index", len(out))
        while len(out) <= index:
            out.append({"function": {"name": "", "arguments": ""}})
        call, function = out[index], delta.get("function") or {}
        for key in ("id", "type"):
            if key in delta:
                call[key] = delta[key]
        if function.get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] = call["function"].get("arguments", "") + (
            function.get("arguments") or ""
        )
    for call in out:
        call.pop("index", None)
    return out


def merge(generations: list[Generation]) -> Generation:
    """Several prompts' generations as one: choices numbered on, usage summed."""
    choices: list[Choice] = []
    prompt = completion = 0
    for g in generations:
        for c in g.choices:
            c.index = len(choices)
            choices.append(c)
        prompt += g.usage.prompt_tokens
        completion += g.usage.completion_tokens
    return Generation(choices, Usage(prompt, completion))
