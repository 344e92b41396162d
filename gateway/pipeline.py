"""The request pipeline: OpenAI request in, backend call, OpenAI response (JSON or SSE) out.

Stages that later issues add (auth, limits, safety, retrieval, templates) slot in here, in the
order drawn in DESIGN.md. Wire types end here: backends see ``GenerationRequest``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

from gateway.backends.base import (
    Chunk,
    Generation,
    GenerationParams,
    GenerationRequest,
    TokenInfo,
    Usage,
)
from gateway.backends.registry import BackendRegistry
from gateway.config import Settings
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FinishReason,
    TokenLogprob,
    TopLogprob,
)
from gateway.protocol import Usage as WireUsage
from gateway.sse import DONE, sse_event


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _wire_usage(usage: Usage) -> WireUsage:
    return WireUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _params(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> GenerationParams:
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids (integers as strings); got {key!r}",
                param="logit_bias",
            ) from None
    if isinstance(req, ChatCompletionRequest):
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=tuple(bias),
        logprobs=logprobs,
        top_logprobs=top,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
    )


@dataclass
class Prepared:
    """A validated request ready for its backend, plus what the response needs."""

    id: str
    model: str
    created: int
    generation: GenerationRequest
    include_usage: bool


class Pipeline:
    def __init__(self, settings: Settings, registry: BackendRegistry) -> None:
        self.settings = settings
        self.registry = registry

    # -- validation ----------------------------------------------------------------------------

    def _check_n(self, n: int | None) -> int:
        n = n or 1
        if n > self.settings.max_n:
            raise InvalidRequest(
                f"n={n} is larger than this server allows ({self.settings.max_n}).", param="n"
            )
        return n

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self.registry.get(req.model)
        n = self._check_n(req.n)
        if req.response_format is not None and req.response_format.type != "text":
            raise UnsupportedParameter(
                f"response_format {req.response_format.type!r} is not supported by model "
                f"{req.model!r}; use 'text'.",
                param="response_format",
            )
        messages = []
        for i, message in enumerate(req.messages):
            if message.name is not None:
                raise UnsupportedParameter(
                    "message names are not supported by this model's chat template.",
                    param=f"messages[{i}].name",
                )
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": message.text()})
        prepared_id = new_id("chatcmpl")
        return Prepared(
            id=prepared_id,
            model=req.model,
            created=int(time.time()),
            generation=GenerationRequest(
                request_id=prepared_id,
                model=req.model,
                params=_params(req, req.requested_max_tokens()),
                n=n,
                messages=tuple(messages),
            ),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def prepare_completion(self, req: CompletionRequest) -> list[Prepared]:
        self.registry.get(req.model)
        n = self._check_n(req.n)
        if req.best_of not in (None, 1) and req.best_of != n:
            raise UnsupportedParameter("best_of is not supported; use n.", param="best_of")
        if req.suffix:
            raise UnsupportedParameter("suffix (insertion) is not supported.", param="suffix")
        prompts = req.prompts()
        if not prompts:
            raise InvalidRequest("prompt must not be empty.", param="prompt")
        if req.stream and len(prompts) > 1:
            raise UnsupportedParameter("streaming supports one prompt per request.", param="prompt")
        if req.echo and not all(isinstance(p, str) for p in prompts):
            raise UnsupportedParameter("echo needs text prompts.", param="echo")
        request_id, created = new_id("cmpl"), int(time.time())
        params = _params(req, req.max_tokens)
        out = []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else None
            ids = None if isinstance(prompt, str) else tuple(prompt)
            out.append(
                Prepared(
                    id=request_id,
                    model=req.model,
                    created=created,
                    generation=GenerationRequest(
                        request_id=request_id,
                        model=req.model,
                        params=params,
                        n=n,
                        prompt=text,
                        prompt_ids=ids,
                    ),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                )
            )
        return out

    # -- execution -----------------------------------------------------------------------------

    async def generate(self, prepared: Prepared) -> Generation:
        backend = self.registry.get(prepared.model)
        return await backend.generate(prepared.generation)

    def stream(self, prepared: Prepared) -> AsyncIterator[Chunk | Usage]:
        return self.registry.get(prepared.model).stream(prepared.generation)


# -- response building ------------------------------------------------------------------------


def _chat_logprobs(tokens: list[TokenInfo] | None) -> ChoiceLogprobs | None:
    if tokens is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode())) for tok, lp in t.top
                ],
            )
            for t in tokens
        ]
    )


def chat_response(prepared: Prepared, generation: Generation) -> ChatCompletion:
    return ChatCompletion(
        id=prepared.id,
        created=prepared.created,
        model=prepared.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=_chat_logprobs(c.tokens),
                finish_reason=cast(FinishReason, c.finish_reason or "stop"),
            )
            for c in generation.choices
        ],
        usage=_wire_usage(generation.usage),
    )


async def chat_sse(
    prepared: Prepared, first: Chunk | Usage, events: AsyncIterator[Chunk | Usage]
) -> AsyncIterator[bytes]:
    """OpenAI's chat stream: role deltas, content deltas, finish chunks, usage, ``[DONE]``."""
    exclude = {"ragline"} if prepared.include_usage else {"ragline", "usage"}

    def chunk(
        index: int,
        delta: dict[str, str],
        finish: str | None = None,
        tokens: list[TokenInfo] | None = None,
    ) -> bytes:
        body = ChatCompletionChunk(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model,
            choices=[
                ChatChunkChoice(
                    index=index,
                    delta=delta,
                    logprobs=_chat_logprobs(tokens),
                    finish_reason=cast(FinishReason | None, finish),
                )
            ],
        )
        return sse_event(body.model_dump_json(exclude=exclude))

    for i in range(prepared.generation.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for event in _prepend(first, events):
        if isinstance(event, Usage):
            if prepared.include_usage:
                final = ChatCompletionChunk(
                    id=prepared.id,
                    created=prepared.created,
                    model=prepared.model,
                    choices=[],
                    usage=_wire_usage(event),
                )
                yield sse_event(final.model_dump_json(exclude={"ragline"}))
            continue
        if event.text:
            yield chunk(event.index, {"content": event.text}, None, event.tokens)
        if event.finish_reason:
            tokens = None if event.text else event.tokens
            yield chunk(event.index, {}, event.finish_reason, tokens)
    yield DONE


def _completion_logprobs(tokens: list[TokenInfo] | None, offset: int) -> CompletionLogprobs | None:
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top) if t.top else None for t in tokens],
        text_offset=offsets,
    )


def completion_response(
    prepared: list[Prepared], generations: list[Generation], echo: bool
) -> Completion:
    choices: list[CompletionChoice] = []
    prompt_tokens = completion_tokens = 0
    for p, g in zip(prepared, generations, strict=True):
        prefix = (p.generation.prompt or "") if echo else ""
        for c in g.choices:
            choices.append(
                CompletionChoice(
                    index=len(choices),
                    text=prefix + c.text,
                    logprobs=_completion_logprobs(c.tokens, len(prefix)),
                    finish_reason=cast(FinishReason, c.finish_reason or "stop"),
                )
            )
        prompt_tokens += g.usage.prompt_tokens
        completion_tokens += g.usage.completion_tokens
    first = prepared[0]
    return Completion(
        id=first.id,
        created=first.created,
        model=first.model,
        choices=choices,
        usage=_wire_usage(Usage(prompt_tokens, completion_tokens)),
    )


async def completion_sse(
    prepared: Prepared, first: Chunk | Usage, events: AsyncIterator[Chunk | Usage], echo: bool
) -> AsyncIterator[bytes]:
    exclude = {"ragline"} if prepared.include_usage else {"ragline", "usage"}

    def chunk(index: int, text: str, finish: str | None, tokens: list[TokenInfo] | None) -> bytes:
        body = Completion(
            id=prepared.id,
            created=prepared.created,
            model=prepared.model,
            choices=[
                CompletionChoice(
                    index=index,
                    text=text,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(tokens, 0),
                )
            ],
        )
        return sse_event(body.model_dump_json(exclude=exclude))

    if echo:
        for i in range(prepared.generation.n):
            yield chunk(i, prepared.generation.prompt or "", None, None)
    async for event in _prepend(first, events):
        if isinstance(event, Usage):
            if prepared.include_usage:
                final = Completion(
                    id=prepared.id,
                    created=prepared.created,
                    model=prepared.model,
                    choices=[],
                    usage=_wire_usage(event),
                )
                yield sse_event(final.model_dump_json(exclude={"ragline"}))
            continue
        yield chunk(event.index, event.text, event.finish_reason, event.tokens)
    yield DONE


async def _prepend(
    first: Chunk | Usage, rest: AsyncIterator[Chunk | Usage]
) -> AsyncIterator[Chunk | Usage]:
    yield first
    async for event in rest:
        yield event
