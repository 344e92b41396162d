"""Rendering the Responses API from a chat answer (``gateway.responses_api`` translates the
request): the ``response`` object with ``message`` and ``function_call`` output items, or the
Responses event stream (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
… ``response.completed``; calls as ``response.function_call_arguments.delta`` / ``.done``),
each event with its ``sequence_number``; and error parameters under their Responses names.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

_PARAMS = [
    (re.compile(r"^messages(\[\d+\].*)?$"), "input"),  # instructions and calls shift indexes
    (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^tools(\[\d+\])\.function\."), r"tools\1."),
]


def responses_param(param: str | None) -> str | None:
    """A chat parameter's name as the Responses request calls it."""
    if param is None:
        return None
    for pattern, name in _PARAMS:
        if pattern.search(param):
            return pattern.sub(name, param, count=1)
    return param


@dataclass
class Shape:
    """What the response object echoes of its request."""

    request: dict[str, Any]
    created: int = field(default_factory=lambda: int(time.time()))

    def base(self, response_id: str, status: str) -> dict[str, Any]:
        r = self.request
        fmt = (r.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": r.get("instructions"),
            "max_output_tokens": r.get("max_output_tokens"),
            "model": r["model"],
            "output": [],
            "parallel_tool_calls": r.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": r.get("temperature", 1.0),
            "text": {"format": fmt},
            "tool_choice": r.get("tool_choice", "auto"),
            "tools": r.get("tools", []),
            "top_p": r.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None,
            "user": r.get("user"),
            "metadata": r.get("metadata", {}),
        }

    def response(self, chat: dict[str, Any]) -> dict[str, Any]:
        """A chat completion body → the response object."""
        suffix = _suffix(chat["id"])
        choice = chat["choices"][0]
        message = choice["message"]
        output: list[dict[str, Any]] = []
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            output.append(_message_item(suffix, message.get("content") or "", "completed"))
        for i, call in enumerate(calls):
            function = call["function"]
            output.append(
                _call_item(suffix, i, call["id"], function["name"], function["arguments"])
            )
        body = self.base("resp_" + suffix, "completed")
        body["output"] = output
        _finish(body, choice.get("finish_reason"))
        body["usage"] = _usage(chat.get("usage"))
        if "ragline" in chat:
            body["ragline"] = chat["ragline"]
        return body

    async def events(self, chat: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        """The chat completion's SSE → the Responses event stream."""
        writer = _Events(self)
        try:
            async for raw in chat:
                for data in _sse_data(raw):
                    if data == b"[DONE]":
                        yield writer.done()
                        return
                    for event in writer.feed(orjson.loads(data)):
                        yield event
        finally:
            await chat.aclose()  # type: ignore[attr-defined]


class _Events:
    """The state of one Responses stream: the open output item, the sequence number."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.sequence = 0
        self.suffix = ""
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being generated
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ragline: Any = None
        self.started = False
        self.calls = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if "error" in chunk:  # the stream failed after it started
            out += self._close()
            error = chunk["error"]
            out.append(
                self.event(
                    "error",
                    code=error.get("code"),
                    message=error.get("message"),
                    param=responses_param(error.get("param")),
                )
            )
            response = self._response("failed")
            response["error"] = {"code": error.get("code"), "message": error.get("message")}
            out.append(self.event("response.failed", response=response))
            return out
        if not self.started:
            self.started, self.suffix = True, _suffix(chunk["id"])
            response = self.shape.base("resp_" + self.suffix, "in_progress")
            out.append(self.event("response.created", response=response))
            out.append(self.event("response.in_progress", response=response))
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        if "ragline" in chunk:
            self.ragline = chunk["ragline"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                out += self._close()
        return out

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self.open is None or self.open["type"] != "message":
            out += self._close()
            self.open = _message_item(self.suffix, "", "in_progress")
            self.open["content"] = []
            index = len(self.output)
            out.append(self.event("response.output_item.added", output_index=index, item=self.open))
            part = {"type": "output_text", "text": "", "annotations": []}
            out.append(self._part_event("response.content_part.added", part))
            self.open["text"] = ""
        self.open["text"] += text
        out.append(self._part_event("response.output_text.delta", None, delta=text))
        return out

    def _part_event(self, kind: str, part: dict[str, Any] | None, **fields: Any) -> bytes:
        assert self.open is not None
        extra = {"part": part} if part is not None else {}
        return self.event(
            kind,
            item_id=self.open["id"],
            output_index=len(self.output),
            content_index=0,
            **extra,
            **fields,
        )

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        function = call.get("function") or {}
        if call.get("id"):  # the first delta of a call
            out += self._close()
            self.open = _call_item(
                self.suffix, self.calls, call["id"], function.get("name", ""), "", "in_progress"
            )
            self.calls += 1
            index = len(self.output)
            out.append(self.event("response.output_item.added", output_index=index, item=self.open))
        piece = function.get("arguments") or ""
        if piece and self.open is not None and self.open["type"] == "function_call":
            self.open["arguments"] += piece
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self.open["id"],
                    output_index=len(self.output),
                    delta=piece,
                )
            )
        return out

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        out: list[bytes] = []
        index = len(self.output)
        if item["type"] == "message":
            text = item.pop("text")
            part = {"type": "output_text", "text": text, "annotations": []}
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self.event("response.output_text.done", text=text, **common))
            out.append(self.event("response.content_part.done", part=part, **common))
            item["content"] = [part]
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        item["status"] = "completed"
        self.output.append(item)
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def _response(self, status: str) -> dict[str, Any]:
        body = self.shape.base("resp_" + self.suffix, status)
        body["output"] = self.output
        body["usage"] = self.usage
        if self.ragline is not None:
            body["ragline"] = self.ragline
        return body

    def done(self) -> bytes:
        closing = b"".join(self._close())
        body = self._response("completed")
        _finish(body, self.finish)
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return closing + self.event(kind, response=body)


def _sse_data(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def _suffix(chat_id: str) -> str:
    return chat_id.rsplit("-", 1)[-1]


def _message_item(suffix: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": "msg_" + suffix,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _call_item(
    suffix: str, index: int, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": f"fc_{suffix}{index}",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _finish(body: dict[str, Any], finish_reason: str | None) -> None:
    if finish_reason in ("length", "content_filter"):
        body["status"] = "incomplete"
        reason = "max_output_tokens" if finish_reason == "length" else "content_filter"
        body["incomplete_details"] = {"reason": reason}


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
