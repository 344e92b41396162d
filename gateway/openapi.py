"""The OpenAPI schema describes every request body as the code validates it.

Routes parse their bodies themselves (``parse_body``: OpenAI-shaped 400s naming the parameter),
so FastAPI does not see the models; ``BODIES.json(Model)`` and ``BODIES.upload()`` put them into
the route's ``openapi_extra``, and ``install`` adds the models to the schema's components. Every
operation's errors are declared as they are sent (``{"error": {...}}`` for any 4xx or 5xx, not
FastAPI's 422 shape), and the two completion routes may answer an event stream. The schema is
what clients generate code from and what the API fuzzer (schemathesis) checks answers against.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.protocol import ChatCompletionChunk, Completion, ErrorResponse

_REF = "#/components/schemas/{model}"
_ERROR = {
    "description": "An OpenAI-shaped error",
    "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
}
# the event stream of ``stream: true``: each event's data is a chunk (JSON), the last ``[DONE]``
_STREAMS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": Completion,
}
_TEXT = {"/metrics": "text/plain"}


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json"}
    data["contentSchema"] = {"$ref": _REF.format(model=chunk.__name__)}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"if": {"const": "[DONE]"}, "else": data}},
    }


class BodySchemas:
    """The request-body models of the routes, by name; one, ``BODIES``, filled at import like
    the routers that use it."""

    def __init__(self) -> None:
        self.models: dict[str, type[BaseModel]] = {}

    def json(self, model: type[BaseModel]) -> dict[str, Any]:
        """``openapi_extra`` for a route whose JSON body is ``model``."""
        self.models[model.__name__] = model
        schema = {"$ref": _REF.format(model=model.__name__)}
        return {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        }

    @staticmethod
    def upload(*fields: str) -> dict[str, Any]:
        """``openapi_extra`` for a multipart upload: a ``file`` part and text ``fields``."""
        properties: dict[str, Any] = {"file": {"type": "string", "format": "binary"}}
        properties.update({name: {"type": "string"} for name in fields})
        schema = {"type": "object", "properties": properties, "required": ["file"]}
        return {
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": schema}},
            }
        }

    def install(self, app: FastAPI) -> None:
        """Make ``app.openapi()`` include the body models (with what they refer to)."""

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is not None:
                return app.openapi_schema
            spec = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            spec.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}
            }
            spec["security"] = [{"bearer": []}]  # /docs' Authorize button sends it
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)  # never sent: validation errors are 400s, as OpenAI's
            for path, item in spec["paths"].items():
                for operation in item.values():
                    _declare_responses(path, operation["responses"])
            extra: list[type[BaseModel]] = [ErrorResponse, *_STREAMS.values()]
            for name, model in {**self.models, **{m.__name__: m for m in extra}}.items():
                schema = model.model_json_schema(ref_template=_REF)
                components.update(schema.pop("$defs", {}))
                components[name] = schema
            app.openapi_schema = spec
            return spec

        app.openapi = openapi  # type: ignore[method-assign]


def _declare_responses(path: str, responses: dict[str, Any]) -> None:
    responses.pop("422", None)
    responses["4XX"] = responses["5XX"] = _ERROR
    success = next(code for code in responses if code.startswith("2"))
    content = responses[success].setdefault("content", {})
    if path in _STREAMS:
        content["text/event-stream"] = {"schema": _event(_STREAMS[path])}
    if path in _TEXT:
        content.clear()
        content[_TEXT[path]] = {"schema": {"type": "string"}}


BODIES = BodySchemas()
