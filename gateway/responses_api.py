"""``POST /v1/responses`` (stateless): OpenAI's Responses API mapped onto the chat pipeline.

The request becomes a chat completion (``instructions`` a system message, ``input`` messages,
``function_call`` items an assistant turn with ``tool_calls``, ``function_call_output`` items
``tool`` messages, flat function tools the chat shape, ``text.format`` the response format,
``max_output_tokens`` the completion bound), runs through the same nine steps as any chat
request (keys, limits, safety, templates, retrieval, cache, backends with fallbacks), and the
answer is rendered back (``gateway.responses_render``): a ``response`` object with ``message``
and ``function_call`` output items, or the Responses event stream. Nothing is stored:
``store: true`` and ``previous_response_id`` are a 400 naming them. Errors name the Responses
parameter (``input``, ``max_output_tokens``, ``text.format``), not the chat one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from gateway.backends.base import CHAT
from gateway.errors import InvalidRequest, RaglineError
from gateway.http import HttpRequest, Reply, validate_body
from gateway.pipeline import Pipeline
from gateway.protocol import FunctionName, RaglineOptions
from gateway.responses_render import Shape, responses_param

RESPONSES = "/v1/responses"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputText(_Request):
    type: Literal["input_text"]
    text: str


class OutputText(_Request):  # an earlier assistant answer sent back as input
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Request):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | OutputText, Field(discriminator="type")]]
    id: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: FunctionName
    arguments: str = Field(max_length=1 << 20)
    id: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)


class FunctionCallOutput(_Request):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str
    id: str | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)


InputItem = InputMessage | FunctionCallItem | FunctionCallOutput


class FunctionTool(_Request):
    type: Literal["function"]
    name: FunctionName
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Request):
    type: Literal["function"]
    name: FunctionName


class FormatText(_Request):
    type: Literal["text"]


class FormatJsonObject(_Request):
    type: Literal["json_object"]


class FormatJsonSchema(_Request):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(default=None, max_length=4096)
    strict: bool | None = None


class TextConfig(_Request):
    format: (
        Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]
        | None
    ) = None


class ResponsesRequest(_Request):
    """OpenAI's ``responses.create``, the stateless part (and ragline's ``ragline`` options)."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(max_length=2048)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = Field(default=None, description="Only false: nothing is stored.")
    previous_response_id: str | None = Field(default=None, description="Refused: stateless.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )
    user: str | None = Field(default=None, max_length=256)
    truncation: Literal["disabled"] | None = None
    ragline: RaglineOptions | None = None


def to_chat(request: ResponsesRequest) -> dict[str, Any]:
    """The chat completion request that answers ``request``. Raises ``InvalidRequest``."""
    if request.store:
        raise InvalidRequest(
            "store: true is not supported: this server keeps no responses (send store: false).",
            param="store",
        )
    if request.previous_response_id is not None:
        raise InvalidRequest(
            "previous_response_id is not supported: this server keeps no responses; send the "
            "conversation in input.",
            param="previous_response_id",
        )
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for item in request.input:
            if isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append(
                    {"role": "tool", "tool_call_id": item.call_id, "content": item.output}
                )
    if not messages:
        raise InvalidRequest("input is empty.", param="input")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": t.model_dump(exclude={"type"}, exclude_none=True),
            }
            for t in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = request.text.format if request.text is not None else None
    if isinstance(fmt, FormatJsonSchema):
        spec = fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif isinstance(fmt, FormatJsonObject):
        body["response_format"] = {"type": "json_object"}
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if request.ragline is not None:
        body["ragline"] = request.ragline.model_dump(exclude_unset=True)
    return body


async def handle(pipeline: Pipeline, http: HttpRequest) -> Reply:
    """``POST /v1/responses``: validate, answer through the chat pipeline, render back."""
    request = validate_body(http.body, ResponsesRequest)
    shape = Shape(request.model_dump(exclude_none=True, by_alias=True))
    try:  # the response echoes the request: what cannot be written back is refused now
        orjson.dumps(shape.request)
    except TypeError as exc:
        raise InvalidRequest(
            f"The request holds a value that cannot be written back as JSON ({exc}): a lone "
            "surrogate escape, or an integer beyond 64 bits.",
            code="invalid_value",
        ) from None
    chat = to_chat(request)
    try:
        # the stdlib writer: any integer (orjson stops at 64 bits) and lone surrogates escaped,
        # for the chat validation to judge as it judges a chat request's
        body = json.dumps(chat, separators=(",", ":")).encode()
        reply = await pipeline.handle(CHAT, replace(http, body=body))
    except RaglineError as exc:
        exc.param = responses_param(exc.param)
        raise
    if reply.stream is None:
        if reply.status == 200:
            reply.body = orjson.dumps(shape.response(orjson.loads(reply.body)))
        return reply
    reply.stream = shape.events(reply.stream)
    return reply
