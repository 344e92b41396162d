"""OpenAI wire types: chat completions, completions, models and errors.

Fields follow the order of OpenAI's API reference. Requests forbid unknown fields, so a parameter
we do not implement is a 400 naming it, never silently ignored (OpenAI answers the same way).
Ragline's and vLLM's extensions are fenced in marked blocks at the end of each model.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --- shared request pieces -------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionCall(_Request):
    name: FunctionName
    arguments: str = Field(max_length=1 << 20, description="The arguments, as a JSON object.")


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # the schema says what ``_content_required`` checks: only an assistant message may omit it
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}},
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)  # assistant
    tool_call_id: str | None = Field(default=None, max_length=128)  # tool

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id is only allowed on tool messages")
        return self

    def text(self) -> str:
        """The message content as one string (text parts joined as OpenAI does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``: the answer is JSON valid against ``schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("json_schema is only allowed when type is 'json_schema'")
        return self


class ContextDocument(_Request):
    """A document the client supplies as context for a template's ``context`` variable."""

    text: str
    id: str | None = None
    source: str | None = None


class RagOptions(_Request):
    """Per-request retrieval (``ragline.rag``): overrides the route's ``rag`` settings."""

    enabled: bool = Field(default=True, description="false: no retrieval for this request.")
    store: str | None = Field(default=None, description="Vector store id or name.")
    top_k: int | None = Field(default=None, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    filters: dict[str, Any] | None = None
    score_threshold: float | None = None
    min_similarity: float | None = Field(
        default=None, ge=-1, le=1, description="Relevance floor (cosine); -1: none."
    )


class RaglineOptions(_Request):
    """Per-request ragline extensions (``extra_body={"ragline": {...}}`` in the SDK)."""

    template: str | None = Field(
        default=None, description="Prompt template: `name`, `name@version` or `name:label`."
    )
    variables: dict[str, Any] | None = Field(default=None, description="Template variables.")
    context: Annotated[list[ContextDocument], Field(max_length=256)] | None = Field(
        default=None, description="Documents for the template's `context`, most relevant first."
    )
    rag: RagOptions | None = Field(default=None, description="Retrieval settings.")


# bounds: every input has one, and breaking it is a 400 naming the field
StopString = Annotated[str, Field(max_length=1000)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # a token id, as OpenAI sends it
LogitBias = (
    Annotated[dict[TokenId, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None
)


class _SamplingFields(_Request):
    """Fields chat and completions requests share, in OpenAI's order."""

    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    n: int | None = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)

    # --- vLLM extensions (accepted by vLLM's server too) ---
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # --- ragline extensions ---
    ragline: RaglineOptions | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# --- chat completions ------------------------------------------------------------------------


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    model: str
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "content_filter"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage
    # --- ragline extension ---
    ragline: dict[str, Any] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant", "content": ""}, {"content": "..."} or {}
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChatChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None
    # --- ragline extension ---
    ragline: dict[str, Any] | None = None


# --- completions -----------------------------------------------------------------------------

# token ids are non-negative 32-bit integers (each model checks its own vocabulary)
PromptId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Prompt = str | list[str] | Annotated[list[PromptId], Field(min_length=1)] | list[list[PromptId]]


class CompletionRequest(_SamplingFields):
    model: str
    prompt: Prompt
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=16, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list (one completion set per element)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [cast(list[int], p)]
        return cast(list[str] | list[list[int]], p)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None
    # --- ragline extension ---
    ragline: dict[str, Any] | None = None


# --- models ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # --- vLLM-compatible extensions ---
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
