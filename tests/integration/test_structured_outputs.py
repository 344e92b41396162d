"""Structured outputs on the embedded engine (the real SmolLM2, through a real gateway, with the
``openai`` SDK and LangChain): ``json_object`` and ``json_schema`` answers parse and validate
with ``jsonschema``, streamed or not, several choices at once; a schema that cannot be enforced
is a 400 naming ``response_format``; a constrained request shares decode steps with an
unconstrained one without changing its answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Gateway

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Paris as JSON: city, country, population."}]


def json_schema(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": strict},
    }


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=ASK,  # type: ignore[arg-type]
        response_format=json_schema(CITY),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content or "")
    jsonschema.validate(answer, CITY)
    assert reply.usage is not None and reply.usage.completion_tokens > 5


def test_json_schema_sampled_choices_all_validate(client: openai.OpenAI) -> None:
    tags = {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["tags", "ok"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Pick some colours."}],
        response_format=json_schema(tags),  # type: ignore[arg-type]
        temperature=1.0,
        seed=7,
        n=3,
        max_tokens=60,
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), tags)


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=150,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_streamed_json_schema_assembles_into_a_valid_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=ASK,  # type: ignore[arg-type]
        response_format=json_schema(CITY),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 3
    jsonschema.validate(json.loads("".join(parts)), CITY)


class Capital(BaseModel):
    country: str = Field(max_length=40)
    capital: str = Field(max_length=40)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of Italy?"}],
        response_format=Capital,
        temperature=0,
        max_tokens=80,
    )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.country and parsed.capital


def test_langchain_with_structured_output(gateway: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        model="smollm2",
        base_url=gateway.base_url,
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,  # type: ignore[call-arg]
    )
    structured = model.with_structured_output(Capital, method="json_schema")
    answer = structured.invoke("What is the capital of Spain?")
    assert isinstance(answer, Capital) and answer.capital


@pytest.mark.parametrize(
    "response_format",
    [
        json_schema({"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
        json_schema({"type": "string", "pattern": "(unclosed"}),
        json_schema({"$ref": "#/$defs/missing"}),
        {"type": "json_schema"},  # no json_schema
        {"type": "json_schema", "json_schema": {"name": "has spaces", "schema": {}}},
        {"type": "xml"},
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400(
    client: openai.OpenAI, response_format: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=10,
        )
    assert info.value.body["param"].startswith("response_format"), info.value.body


async def test_constrained_and_free_sequences_share_a_step(aclient: openai.AsyncOpenAI) -> None:
    """Greedy parity: the unconstrained answer is the same alone and beside a constrained one
    decoding in the same batch (which is still valid)."""
    free = {"model": "smollm2", "messages": ASK, "temperature": 0, "max_tokens": 40}
    alone = await aclient.chat.completions.create(**free)  # type: ignore[call-overload]
    constrained = aclient.chat.completions.create(
        **{**free, "max_tokens": 120, "response_format": json_schema(CITY)}  # type: ignore[call-overload]
    )
    beside, structured = await asyncio.gather(
        aclient.chat.completions.create(**free),  # type: ignore[call-overload]
        constrained,
    )
    assert beside.choices[0].message.content == alone.choices[0].message.content
    assert alone.choices[0].message.content and not alone.choices[0].message.content.startswith("{")
    jsonschema.validate(json.loads(structured.choices[0].message.content or ""), CITY)
