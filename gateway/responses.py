"""Wire formatting: internal ``Generation``/``Chunk`` events → OpenAI JSON bodies and SSE."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from gateway.backends.base import Chunk, Generation, GenerationRequest, TokenInfo, Usage
from gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
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


@dataclass
class Prepared:
    """A validated request ready for its backend, plus what the response needs."""

    id: str
    model: str
    created: int
    generation: GenerationRequest
    include_usage: bool
    ragline: dict[str, Any] | None = None  # the response's ``ragline`` object, if any


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
        ragline=prepared.ragline,
    )


async def chat_sse(
    prepared: Prepared, first: Chunk | Usage, events: AsyncIterator[Chunk | Usage]
) -> AsyncIterator[bytes]:
    """OpenAI's chat stream: role deltas, content deltas, finish chunks, usage, ``[DONE]``."""
    exclude = {"ragline"} if prepared.include_usage else {"ragline", "usage"}
    finished = 0

    def chunk(
        index: int,
        delta: dict[str, str],
        finish: str | None = None,
        tokens: list[TokenInfo] | None = None,
    ) -> bytes:
        nonlocal finished
        finished += 1 if finish else 0
        last = finish is not None and finished == prepared.generation.n
        extra = prepared.ragline if last else None
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
            ragline=extra,
        )
        return sse_event(body.model_dump_json(exclude=exclude - {"ragline"} if extra else exclude))

    for i in range(prepared.generation.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for event in _prepend(first, events):
        if isinstance(event, Usage):
            if prepared.include_usage:
                yield _usage_event(ChatCompletionChunk, prepared, event)
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
                yield _usage_event(Completion, prepared, event)
            continue
        yield chunk(event.index, event.text, event.finish_reason, event.tokens)
    yield DONE


def _usage_event(
    kind: type[ChatCompletionChunk] | type[Completion], prepared: Prepared, usage: Usage
) -> bytes:
    """The final usage event of a stream: ``choices: []`` and the counts."""
    final = kind(
        id=prepared.id,
        created=prepared.created,
        model=prepared.model,
        choices=[],
        usage=_wire_usage(usage),
    )
    return sse_event(final.model_dump_json(exclude={"ragline"}))


async def _prepend(
    first: Chunk | Usage, rest: AsyncIterator[Chunk | Usage]
) -> AsyncIterator[Chunk | Usage]:
    yield first
    async for event in rest:
        yield event
