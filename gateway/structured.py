"""Structured outputs on the request side: which ``response_format`` a request asks for, and a
check, before any backend sees it, that its schema can be enforced (llguidance's JSON-schema
compiler; no tokenizer needed, cached per format). The embedded engine enforces it token by
token (``gateway.backends.grammar``); vLLM and OpenAI-compatible upstreams get it forwarded.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequest

# compact JSON with the spaces a model has seen most: {"a": 1, "b": [2, 3]}
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def format_key(response_format: Mapping[str, Any] | None) -> str | None:
    """The canonical JSON of a constraining ``response_format``; None for none or ``text``."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    return json.dumps(response_format, sort_keys=True, separators=(",", ":"))


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

    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(
            schema_of(json.loads(key)), defaults=JSON_OPTIONS
        )
    except ValueError as exc:
        raise invalid(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None)
    if is_error:
        raise invalid(messages[0] if messages else "the schema cannot be enforced")


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
