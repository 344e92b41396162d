"""Tool calling on the embedded engine (the real SmolLM2 through a real gateway, the ``openai``
SDK and LangChain): ``required`` and named calls whose arguments validate against the tool's
schema (``jsonschema``), streamed deltas that assemble into the same, ``parallel_tool_calls``,
a conversation that continues after a tool result, ``auto`` and ``none``, and a 400 naming the
parameter for each malformed tool request."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import Gateway
from tests.integration.agent_helpers import after_tool_result

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City name", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    args = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "temperature": 0}
    return client.chat.completions.create(**{**args, "max_tokens": 150, **kwargs})


def assert_valid_calls(calls: Any) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def _finished_by_calls_or_the_limit(finish: str | None, completion_tokens: int) -> None:
    """With parallel calls allowed, greedy SmolLM2 may keep calling (on some CPUs' numerics it
    repeats the call until max_tokens): the answer then ends with `length` at the limit, every
    call it made still whole and valid; otherwise with `tool_calls`."""
    assert finish == "tool_calls" or (finish == "length" and completion_tokens == 150), (
        finish, completion_tokens)  # fmt: skip


def test_required_calls_validate(client: openai.OpenAI) -> None:
    reply = create(client, tool_choice="required")
    choice = reply.choices[0]
    _finished_by_calls_or_the_limit(choice.finish_reason, reply.usage.completion_tokens)
    assert choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)
    assert reply.usage.completion_tokens > 10
    assert reply.usage.prompt_tokens > 150  # the tools are in the prompt


def test_a_named_choice_calls_that_function_once(client: openai.OpenAI) -> None:
    reply = create(
        client,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert_valid_calls(calls)


def test_streamed_deltas_assemble_into_valid_calls(client: openai.OpenAI) -> None:
    stream = create(client, tool_choice="required", stream=True,
                    stream_options={"include_usage": True})  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    finish, text, used = None, "", 0
    for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call names it
                    assert delta.id and delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function and delta.function.name
                    assert delta.function.arguments == ""
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    _finished_by_calls_or_the_limit(finish, used)
    assert text == ""
    assert sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_the_conversation_continues_after_a_tool_result(client: openai.OpenAI) -> None:
    first = create(client, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = after_tool_result(ASK, call, "18 degrees and sunny")
    reply = create(client, messages=history, tool_choice="none", max_tokens=60)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    # the call and its result are in the prompt: more tokens than the question alone
    alone = create(client, tool_choice="none", max_tokens=1)
    call_tokens = len(call.function.arguments) // 4 + len("18 degrees and sunny") // 5
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + call_tokens


def test_auto_answers_with_text_or_valid_calls(client: openai.OpenAI) -> None:
    for question in ("What's the weather like in Paris today?", "Say hello."):
        reply = create(client, messages=[{"role": "user", "content": question}], max_tokens=60)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert_valid_calls(choice.message.tool_calls)
        else:
            assert choice.message.content and not choice.message.content.startswith("<tool_call>")


def test_langchain_bind_tools(gateway: Gateway) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(location: str, unit: str) -> str:
        """Get the current weather for a city, in celsius or fahrenheit."""
        return "sunny"

    model = ChatOpenAI(
        model="smollm2",
        base_url=gateway.base_url,
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=100,  # type: ignore[call-arg]
    )
    message = model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What's the weather in Rome?"
    )
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    args = message.tool_calls[0]["args"]
    assert set(args) == {"location", "unit"} and all(isinstance(v, str) for v in args.values())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{not json"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_malformed_tool_requests_are_400s(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        create(client, **kwargs)
    assert info.value.body["param"].startswith(param), info.value.body
