"""Tool calling on the embedded engine: the chat template that shows the model its tools, and
the parser that turns what it generates into OpenAI's ``tool_calls``.

The model is told (in the system turn, the Hermes/Qwen convention most small instruct models
have seen) to answer a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
the grammar (``gateway.backends.grammar.tools_lark``) makes it do exactly that when a call is
required, and lets it choose between that and plain text under ``auto``. Tool results come back
as ``<tool_response>`` blocks in a user turn. A model whose own chat template handles ``tools``
keeps it; others (SmolLM2's) get ``chatml_tools.jinja`` beside this file (``make vllm`` gives it
to vLLM too), or the template file the model's config names (``tool_template``).

``ToolCallParser`` reads one choice's text as it streams and emits OpenAI's deltas: the first
for a call carries its ``index``, a ``call_…`` id, ``type`` and the function's name with empty
arguments; the following ones carry pieces of the arguments JSON, as they are generated.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.backends.base import Chunk, Event, Generation
from gateway.structured import call_schema

# a file, so that vLLM can be started with the same template (make vllm: --chat-template)
TEMPLATE_FILE = Path(__file__).with_name("chatml_tools.jinja")
TOOLS_TEMPLATE = TEMPLATE_FILE.read_text()

OPEN = "<tool_call>\n"
_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


def uses_tools(chat_template: str | None) -> bool:
    """Whether a model's own chat template renders ``tools``."""
    return bool(chat_template) and "tools" in str(chat_template)


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")


@dataclass
class ToolCallParser:
    """One choice's generated text → plain text, or tool-call deltas (OpenAI's stream shape)."""

    mode: str = "start"  # start: undecided; text; calls
    buffer: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # complete: id, name, arguments
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _state: str = "open"  # open, head, args, close

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """New text → (plain text to send, tool-call deltas to send)."""
        if self.mode == "text":
            return text, []
        self.buffer += text
        if self.mode == "start":
            probe = self.buffer.lstrip()
            if not probe or (OPEN.startswith(probe) and len(probe) < len(OPEN)):
                return "", []
            if not probe.startswith(OPEN):
                self.mode, out, self.buffer = "text", self.buffer, ""
                return out, []
            self.mode, self.buffer = "calls", probe
        return "", self._calls()

    def _calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if self._state == "open":
                stripped = self.buffer.lstrip("\n")
                if len(stripped) < len(OPEN):
                    return deltas
                if not stripped.startswith(OPEN):  # the grammar allows nothing else
                    self.buffer = ""
                    return deltas
                self.buffer, self._state = stripped[len(OPEN) :], "head"
            if self._state == "head":
                match = _HEAD.match(self.buffer)
                if match is None:
                    return deltas
                name = json.loads(f'"{match.group(1)}"')
                call = {"id": new_call_id(), "name": name, "arguments": ""}
                self.calls.append(call)
                deltas.append(
                    {
                        "index": len(self.calls) - 1,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                )
                self.buffer = self.buffer[match.end() :]
                self._state, self._depth = "args", 0
            if self._state == "args":
                taken, complete = self._scan_arguments()
                if taken:
                    self.calls[-1]["arguments"] += taken
                    deltas.append({"index": len(self.calls) - 1, "function": {"arguments": taken}})
                if not complete:
                    return deltas
                self._state = "close"
            if self._state == "close":
                rest = self.buffer.lstrip()
                end = rest.find("</tool_call>")
                if end < 0:
                    return deltas
                self.buffer = rest[end + len("</tool_call>") :]
                self._state = "open"

    def _scan_arguments(self) -> tuple[str, bool]:
        """Take the arguments object from the buffer as far as it has come: (text, complete)."""
        for i, ch in enumerate(self.buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    taken, self.buffer = self.buffer[: i + 1], self.buffer[i + 1 :]
                    return taken, True
        taken, self.buffer = self.buffer, ""
        return taken, False

    def finish(self) -> str:
        """At the end of the choice: text still held back (an answer that looked like it might
        become a call and did not)."""
        if self.mode == "start":
            out, self.buffer = self.buffer, ""
            return out
        return ""


class ToolParsers:
    """The parsers of one request's choices: engine chunks in, OpenAI-shaped chunks out. A choice
    that made calls finishes with ``tool_calls``; its logprobs are dropped with the call text."""

    def __init__(self, n: int) -> None:
        self._parsers = [ToolCallParser() for _ in range(n)]

    def feed(self, chunk: Chunk) -> list[Chunk]:
        parser = self._parsers[chunk.index]
        text, deltas = parser.feed(chunk.text)
        out: list[Chunk] = []
        finish = chunk.finish_reason
        if finish is not None:
            text += parser.finish()
            if parser.calls and finish == "stop":
                finish = "tool_calls"
        tokens = chunk.tokens if parser.mode == "text" else None
        if text or tokens:
            out.append(Chunk(chunk.index, text, tokens=tokens))
        # one delta per chunk, as OpenAI streams them
        out.extend(Chunk(chunk.index, "", fields={"tool_calls": [d]}) for d in deltas)
        if finish is not None:
            out.append(Chunk(chunk.index, "", finish_reason=finish))
        return out


@dataclass
class ForcedCalls:
    """A required or named ``tool_choice`` sent to an upstream as a ``json_schema`` response
    format of the calls (``{"name", "arguments"}``, an array when calls may be parallel), with
    ``tool_choice: none`` so that its own parser stays out of the way; the JSON it answers is
    turned back into ``tool_calls``. For upstreams that do not constrain tool calls themselves
    (vLLM on CPU: a required call came back as free text, measured), so that the arguments
    validate."""

    body: dict[str, Any]
    parallel: bool

    @classmethod
    def of(cls, body: Mapping[str, Any] | None) -> ForcedCalls | None:
        if body is None or not body.get("tools") or body.get("response_format"):
            return None
        choice = body.get("tool_choice")
        if choice is None or choice in ("auto", "none"):
            return None
        name = choice["function"]["name"] if isinstance(choice, Mapping) else "required"
        functions = [
            {"name": t["function"]["name"], "parameters": t["function"].get("parameters")}
            for t in body["tools"]
        ]
        one = call_schema(functions, name)
        one.pop("x-guidance", None)
        parallel = body.get("parallel_tool_calls") is not False
        schema = {"type": "array", "items": one, "minItems": 1} if parallel else one
        forced = {
            **body,
            "tool_choice": "none",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "tool_calls", "schema": schema, "strict": True},
            },
        }
        forced.pop("parallel_tool_calls", None)
        return cls(forced, parallel)

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The calls in an answer, OpenAI-shaped, or None when it is not (cut) JSON."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if not isinstance(item, dict) or "name" not in item:
                return None
            arguments = json.dumps(item.get("arguments", {}), ensure_ascii=False)
            function = {"name": item["name"], "arguments": arguments}
            out.append({"id": new_call_id(), "type": "function", "function": function})
        return out

    def generation(self, generation: Generation) -> Generation:
        for choice in generation.choices:
            calls = self.calls(choice.text)
            if calls is not None:
                choice.text = ""
                choice.fields = {**(choice.fields or {}), "tool_calls": calls}
                if choice.finish_reason in (None, "stop"):
                    choice.finish_reason = "tool_calls"
        return generation

    async def events(self, events: AsyncIterator[Event]) -> AsyncGenerator[Event, None]:
        """The upstream's JSON stream held per choice and sent as tool-call deltas once the
        choice finishes (a header delta, then the arguments), as OpenAI's stream carries them."""
        texts: dict[int, str] = {}
        async for event in events:
            if not isinstance(event, Chunk):
                yield event
                continue
            texts[event.index] = texts.get(event.index, "") + event.text
            if event.finish_reason is None:
                continue
            text = texts.pop(event.index)
            calls = self.calls(text)
            if calls is None:  # cut short: passed on as it came, with its finish reason
                yield Chunk(event.index, text, finish_reason=event.finish_reason)
                continue
            for i, call in enumerate(calls):
                head = {**call, "index": i, "function": {**call["function"], "arguments": ""}}
                yield Chunk(event.index, "", fields={"tool_calls": [head]})
                piece = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
                yield Chunk(event.index, "", fields={"tool_calls": [piece]})
            finish = "tool_calls" if event.finish_reason == "stop" else event.finish_reason
            yield Chunk(event.index, "", finish_reason=finish)
