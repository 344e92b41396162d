"""Tool calling on the embedded engine: the chat template that shows the model its tools, and
the parser that turns what it generates into OpenAI's ``tool_calls``.

The model is told (in the system turn, the Hermes/Qwen convention most small instruct models
have seen) to answer a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
the grammar (``gateway.backends.grammar.tools_lark``) makes it do exactly that when a call is
required, and lets it choose between that and plain text under ``auto``. Tool results come back
as ``<tool_response>`` blocks in a user turn. A model whose own chat template handles ``tools``
keeps it; others (SmolLM2's) get ``TOOLS_TEMPLATE``, or the template file the model's config
names (``tool_template``).

``ToolCallParser`` reads one choice's text as it streams and emits OpenAI's deltas: the first
for a call carries its ``index``, a ``call_…`` id, ``type`` and the function's name with empty
arguments; the following ones carry pieces of the arguments JSON, as they are generated.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Chunk

TOOLS_TEMPLATE = (
    "{%- set system = messages[0].content if messages and messages[0].role == 'system' "
    "else 'You are a helpful assistant.' -%}"
    "{{ '<|im_start|>system\\n' + system }}"
    "{%- if tools -%}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call>\' }}'
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' and loop.first -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if message.content or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": ' + (call.function.name | tojson) + ', \"arguments\": ' "
    "+ (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
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
                if len(rest) < len("}" + CLOSE.strip()):
                    return deltas
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
