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


def format_key(response_format: Mapping[str, Any] | None) -> str | None:
    """The canonical JSON of a constraining ``response_format``; None for none or ``text``."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    return json.dumps(response_format, sort_keys=True, separators=(",", ":"))


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


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | bool:
    if response_format.get("type") == "json_object":
        return ANY_OBJECT
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema")
    if schema is None:
        return ANY_OBJECT
    if not isinstance(schema, dict | bool):
        raise invalid("the schema must be a JSON object")
    return schema


def invalid(reason: str) -> InvalidRequest:
    reason = reason.strip().splitlines()[0][:500] if reason.strip() else "invalid schema"
    return InvalidRequest(
        f"response_format cannot be enforced: {reason}",
        param="response_format",
        code="invalid_response_format",
    )
