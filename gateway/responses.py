"""Wire formatting: internal ``Generation`` / ``Chunk`` events → OpenAI JSON bodies and SSE.

Every backend's output is rendered here, with orjson and no pydantic round trip. Fields an
upstream sent that ragline does not model (``Chunk.fields``, ``Chunk.extra``) are passed on in
place. A stream is OpenAI's exactly: a role delta per choice (chat), content deltas, a finish
chunk per choice, a usage chunk with ``choices: []`` when the client asked for it, then
``data: [DONE]``. The response's ``ragline`` object rides on the JSON body, or on the stream's
chunk that finishes the last choice.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.backends.base import Choice, Chunk, Event, Generation, TokenInfo, Usage
from gateway.errors import RaglineError, error_body

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("ragline.stream")


_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per process; the counter within it
_IDS = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_PREFIX}{next(_IDS):016x}"


@dataclass
class Meta:
    """What every response to one request carries."""

    id: str
    model: str
    chat: bool
    choices: int = 1  # choices the response will have (n, times the prompts of a batch)
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in t.top
                ],
            }
            for t in tokens
        ]
    }


def _completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) if t.top else None for t in tokens],
        "text_offset": offsets,
    }


def _logprobs(item: Choice | Chunk, chat: bool, offset: int = 0) -> Any:
    if item.tokens is not None:
        return _chat_logprobs(item.tokens) if chat else _completion_logprobs(item.tokens, offset)
    return item.extra.get("logprobs") if item.extra else None


def _choice_extra(choice: dict[str, Any], item: Choice | Chunk) -> dict[str, Any]:
    if item.extra:
        for key, value in item.extra.items():
            if key != "logprobs":
                choice[key] = value
    return choice


def _message(text: str, fields: dict[str, Any] | None) -> dict[str, Any]:
    # no text beside tool calls is ``null``, as OpenAI sends it
    content = None if not text and fields and "tool_calls" in fields else text
    return {"role": "assistant", "content": content, **(fields or {})}


def render_json(meta: Meta, generation: Generation, ragline: dict[str, Any] | None) -> bytes:
    choices = []
    for c in generation.choices:
        finish = c.finish_reason or "stop"
        if meta.chat:
            choice = {
                "index": c.index,
                "message": _message(c.text, c.fields),
                "logprobs": _logprobs(c, True),
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": c.index,
                "text": c.text,
                "logprobs": _logprobs(c, False),
                "finish_reason": finish,
            }
        choices.append(_choice_extra(choice, c))
    body: dict[str, Any] = {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "system_fingerprint": None,
        "usage": _usage(generation.usage),
    }
    if ragline is not None:
        body["ragline"] = ragline
    return orjson.dumps(body)


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def render_sse(
    meta: Meta, events: AsyncIterator[Event], ragline: Callable[[], dict[str, Any] | None]
) -> AsyncGenerator[bytes, None]:
    """OpenAI's stream for ``events``; ``ragline()`` is asked once, when the last choice ends."""
    kind = "chat.completion.chunk" if meta.chat else "text_completion"
    head: dict[str, Any] = {"id": meta.id, "object": kind, "created": meta.created}
    head["model"] = meta.model

    def chunk(choice: dict[str, Any], extra: dict[str, Any] | None = None) -> bytes:
        body = {**head, "choices": [choice]}
        if meta.include_usage:
            body["usage"] = None
        if extra is not None:
            body["ragline"] = extra
        return _event(body)

    finished = 0
    if meta.chat:
        for i in range(meta.choices):
            yield chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
    async for event in events:
        if isinstance(event, Usage):
            if meta.include_usage:
                yield _event({**head, "choices": [], "usage": _usage(event)})
            continue
        finish = event.finish_reason
        if finish is not None:
            finished += 1
        last = ragline() if finish is not None and finished == meta.choices else None
        if not meta.chat:
            choice = {
                "index": event.index,
                "text": event.text,
                "logprobs": _logprobs(event, False),
                "finish_reason": finish,
            }
            yield chunk(_choice_extra(choice, event), last)
            continue
        if event.text or event.fields:
            delta = {"content": event.text, **(event.fields or {})}
            choice = {"index": event.index, "delta": delta, "logprobs": _logprobs(event, True)}
            choice["finish_reason"] = None
            yield chunk(_choice_extra(choice, event))
        if finish is not None:
            logprobs = None if event.text else _logprobs(event, True)
            choice = {"index": event.index, "delta": {}, "logprobs": logprobs}
            choice["finish_reason"] = finish
            yield chunk(choice, last)
    yield DONE


def sse_error(exc: BaseException) -> bytes:
    """An error event for a stream that already started (the status line is long gone)."""
    if isinstance(exc, RaglineError):
        body = exc.body()
    else:
        body = error_body("The server had an error while streaming the response.", "server_error")
    return _event(body)


async def guarded(events: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """Turn an exception after the first byte into an error event followed by ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # the client gets the error in-band; the log gets the traceback
        if isinstance(exc, RaglineError) and exc.status_code < 500:
            log.info("stream ended with %s: %s", type(exc).__name__, exc.message)
        else:
            log.exception("stream failed")
        yield sse_error(exc)
        yield DONE
