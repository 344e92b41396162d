"""Shared by the tool-calling tests of both backends."""

from __future__ import annotations

from typing import Any


def after_tool_result(ask: list[dict[str, Any]], call: Any, result: str) -> list[dict[str, Any]]:
    """The conversation once ``call`` (an SDK tool call) was made and answered with ``result``."""
    function = {"name": call.function.name, "arguments": call.function.arguments}
    made = {"id": call.id, "type": "function", "function": function}
    return [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [made]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
