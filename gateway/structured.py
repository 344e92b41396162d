"""Structured outputs on the request side: which ``response_format`` a request asks for, and a
check, before any backend sees it, that its schema can be enforced (llguidance's JSON-schema
compiler; no tokenizer needed, cached per format). The embedded engine enforces it token by
token (``gateway.backends.grammar``); vLLM and OpenAI-compatible upstreams get it forwarded.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from gateway.backends.base import Chunk, Event, merge_tool_calls
from gateway.errors import InvalidOutput, InvalidRequest

# compact JSON with the spaces a model has seen most: {"a": 1, "b": [2, 3]}
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def format_key(response_format: Mapping[str, Any] | None) -> str | None:
    """The canonical JSON of a constraining ``response_format``; None for none or ``text``."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    return json.dumps(response_format, sort_keys=True, separators=(",", ":"))


async def check_schemas(body: Mapping[str, Any]) -> None:
    """A chat request's schemas (its response format, its tools' parameters), checked in a
    worker thread: compiling a large schema is CPU work the event loop must not wait for.
    Each distinct schema is compiled once (cached). Raises ``InvalidRequest``."""
    fmt = format_key(body.get("response_format"))
    tools = body.get("tools")
    if fmt is None and not tools:
        return
    await asyncio.to_thread(_check_all, fmt, tools)


def _check_all(fmt: str | None, tools: list[dict[str, Any]] | None) -> None:
    if fmt is not None:
        check(fmt)
    if tools:
        check_tools(tools)


def tools_key(body: Mapping[str, Any]) -> str | None:
    """The canonical JSON of what a request's tools constrain: the functions, the choice
    (``auto``, ``required`` or a function's name) and whether calls may come in parallel; None
    when there are no tools or ``tool_choice`` is ``none``."""
    tools = body.get("tools")
    choice = body.get("tool_choice") or "auto"
    if not tools or choice == "none":
        return None
    if isinstance(choice, Mapping):
        choice = choice["function"]["name"]
    functions = [
        {"name": t["function"]["name"], "parameters": t["function"].get("parameters")}
        for t in tools
    ]
    parallel = body.get("parallel_tool_calls")
    spec = {"functions": functions, "choice": choice, "parallel": parallel is not False}
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def call_schema(functions: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema of one call, ``{"name": ..., "arguments": {...}}``, over the functions
    the choice allows: arguments always validate against the chosen function's parameters."""
    allowed = [f for f in functions if choice in ("auto", "required") or f["name"] == choice]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _closed(f["parameters"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in allowed
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


def _closed(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters a call is generated under: an object schema that does not say otherwise
    gets no properties beyond its own (a small model otherwise invents some; what it generates
    still validates against the schema as given)."""
    if parameters is None:
        return NO_ARGUMENTS
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def check_tools(tools: list[dict[str, Any]]) -> None:
    """Each function's parameters must be an enforceable JSON schema. Raises ``InvalidRequest``
    naming ``tools[i].function.parameters``."""
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is None:
            continue
        key = json.dumps(
            {"type": "json_schema", "json_schema": {"schema": parameters}}, sort_keys=True
        )
        try:
            check(key)
        except InvalidRequest as exc:
            reason = exc.message.removeprefix("response_format cannot be enforced: ")
            raise InvalidRequest(
                f"tools[{i}].function.parameters cannot be enforced: {reason}",
                param=f"tools[{i}].function.parameters",
                code="invalid_function_parameters",
            ) from None


@functools.lru_cache(maxsize=256)
def check(key: str) -> None:
    """Refuse, before any backend sees it, a ``response_format`` whose schema cannot be enforced
    (vLLM would answer some with a 500). Needs no tokenizer; cached per format. Raises
    ``InvalidRequest``."""
    import llguidance

    schema = schema_of(json.loads(key))
    check_schema(schema)
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None)
    if is_error:
        raise invalid(messages[0] if messages else "the schema cannot be enforced")


def check_schema(schema: dict[str, Any]) -> None:
    """The schema must be valid for its JSON Schema draft (2020-12 unless ``$schema`` says):
    a draft-4 tuple ``items: [...]`` under 2020-12, say, is refused here (vLLM answers it with
    a 500). Raises ``InvalidRequest``."""
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise invalid(f"{exc.message}" + (f" (at {where})" if where else "")) from None


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    if response_format.get("type") == "json_object":
        return ANY_OBJECT
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema")
    if schema is None:
        return ANY_OBJECT
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise invalid("the schema must be a JSON object")
    return schema


def invalid(reason: str) -> InvalidRequest:
    reason = reason.strip().splitlines()[0][:500] if reason.strip() else "invalid schema"
    return InvalidRequest(
        f"response_format cannot be enforced: {reason}",
        param="response_format",
        code="invalid_response_format",
    )


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    return validator_for(schema)(schema)


def _violation(schema: dict[str, Any], instance: Any) -> str | None:
    from jsonschema.exceptions import best_match

    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return error.message + (f" (at {where})" if where else "")


class OutputContract:
    """What an answer must be, from its request: JSON under the response format, tool calls
    to known functions whose arguments validate, a call at all when ``tool_choice`` requires
    one. Upstreams that do not constrain decoding (vLLM on CPU, measured: a required call came
    back as free text, arguments off the schema) are checked against it before the client
    sees the answer; the embedded engine's answers pass by construction."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        fmt = body.get("response_format") or {}
        kind = fmt.get("type", "text")
        self.schema: dict[str, Any] | None = None
        if kind == "json_object":
            self.schema = ANY_OBJECT
        elif kind == "json_schema":
            self.schema = schema_of(fmt)
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or ("auto" if tools else "none")
        self.functions: dict[str, dict[str, Any] | None] = (
            {t["function"]["name"]: t["function"].get("parameters") for t in tools}
            if choice != "none"
            else {}
        )
        self.required: str | None = None
        if choice == "required":
            self.required = "required"
        elif isinstance(choice, Mapping):
            self.required = choice["function"]["name"]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> OutputContract | None:
        fmt = (body.get("response_format") or {}).get("type", "text")
        if fmt == "text" and not (body.get("tools") and body.get("tool_choice") != "none"):
            return None
        return cls(body)

    def violation(self, text: str, calls: list[dict[str, Any]], finish: str | None) -> str | None:
        """Why one choice breaks the contract, or None. An answer cut by ``max_tokens`` is
        not judged (``finish_reason: length`` already says it is incomplete)."""
        if finish == "length":
            return None
        if calls:
            for call in calls:
                function = call.get("function") or {}
                name = function.get("name")
                if name not in self.functions:
                    return f"it calls {name!r}, which is not one of the request's tools"
                if self.required not in (None, "required", name):
                    return f"it calls {name!r}; tool_choice requires {self.required!r}"
                try:
                    arguments = json.loads(function.get("arguments") or "")
                except ValueError:
                    return f"the arguments of its call to {name!r} are not JSON"
                parameters = self.functions[name]
                schema = parameters if parameters is not None else NO_ARGUMENTS
                why = _violation(schema, arguments)
                if why is not None:
                    return f"the arguments of its call to {name!r} break the schema: {why}"
            return None
        if self.required is not None:
            return "it answered with text where tool_choice requires a tool call"
        if self.schema is not None:
            try:
                answer = json.loads(text)
            except ValueError:
                return "its answer is not JSON"
            why = _violation(self.schema, answer)
            if why is not None:
                return f"its answer breaks the response format's schema: {why}"
        return None

    def hold(
        self, text: str, calls: list[dict[str, Any]], finish: str | None, backend: Any
    ) -> None:
        """Raise ``InvalidOutput`` for a choice that breaks the contract."""
        why = self.violation(text, calls, finish)
        if why is not None:
            raise InvalidOutput(
                f"The model's answer was not passed on: {why} (backend {backend!r}). The "
                "backend did not constrain its output; retry, or serve this model where it can."
            )

    async def held(self, events: AsyncIterator[Event], ticket: Any) -> AsyncGenerator[Event, None]:
        """A stream checked as each choice finishes: a broken answer ends the stream with an
        error event (what was sent cannot be taken back; the error says it does not hold)."""
        texts: dict[int, str] = {}
        calls: dict[int, list[dict[str, Any]]] = {}
        try:
            async for event in events:
                if isinstance(event, Chunk):
                    texts[event.index] = texts.get(event.index, "") + event.text
                    deltas = (event.fields or {}).get("tool_calls")
                    if deltas:
                        calls[event.index] = merge_tool_calls(calls.get(event.index, []), deltas)
                    if event.finish_reason is not None:
                        found, text = calls.get(event.index, []), texts.get(event.index, "")
                        self.hold(text, found, event.finish_reason, ticket.served_by)
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
