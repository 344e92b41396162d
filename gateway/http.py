"""HTTP plumbing shared by the routes: body limits, body parsing, request ids, disconnects."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import InvalidRequest, PayloadTooLarge, RaglineError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

_TYPE_TAG = re.compile(r"[\[\(\-]|^(str|int|float|bool|list|dict|none|null)$")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 before any route reads them.

    Multipart file uploads have their own, larger limit. A declared ``Content-Length`` is
    checked up front; a chunked body is counted as it arrives and the read fails with
    ``PayloadTooLarge`` once it crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-type" and value.startswith(b"multipart/form-data"):
                limit = self.upload_bytes  # file uploads (/v1/files, vector store files)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_too_large(send, limit)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(_too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)


def _too_large_message(limit: int) -> str:
    return f"Request body is larger than this server accepts ({limit} bytes)."


async def _send_too_large(send: Send, limit: int) -> None:
    await send_error(send, PayloadTooLarge(_too_large_message(limit)), close=True)


async def send_error(send: Send, exc: RaglineError, close: bool = False) -> None:
    """Render an error from ASGI middleware (before any route runs), in OpenAI's shape."""
    data = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class InFlightMiddleware:
    """Count requests being served (``app.state.in_flight``), for the in-flight gauge."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1


_ID_PREFIX = uuid.uuid4().hex[:12]  # unique per process; the counter makes ids unique within it
_ID_COUNTER = itertools.count()


class RequestIdMiddleware:
    """Accept ``X-Request-Id`` from the client or make one; return it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
        request_id = request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """``('messages', 0, 'content', 'str')`` → ``'messages[0].content'`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The most specific pydantic error as an OpenAI ``invalid_request_error`` naming its param.

    A union (``content: str | list[part]``) fails once per member; the deepest location is the
    one that tells the user what to fix (``messages[0].content[0].type``, not ``content``);
    an unknown field counts only when nothing else is wrong.
    """
    errors: list[Any] = exc.errors(include_url=False)
    err = max(
        errors,
        key=lambda e: (e["type"] != "extra_forbidden", len(param_path(tuple(e["loc"])) or "")),
    )
    kind, loc = err["type"], tuple(err["loc"])
    param = param_path(loc)
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            f"but what was sent was not valid JSON: {err['ctx'].get('error', '')})",
            code="invalid_json",
        )
    if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unrecognized_argument",
        )
    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    message = str(err["msg"]).removeprefix("Value error, ")
    return InvalidRequest(
        f"Invalid value for '{param}': {message}" if param else message,
        param=param,
        code="invalid_value",
    )


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body; every failure is a 400 (or 413) in OpenAI's shape."""
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json"
        ) from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


class ClientDisconnected(Exception):
    """The client went away before the response started."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it when the client disconnects first.

    Used for responses that do not stream yet (non-streaming calls, and a stream before its
    first token): Starlette only notices a disconnect once the response is being sent. One
    watcher task per request; the work itself runs in the caller's task.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    def cancel_work(_: asyncio.Task[None]) -> None:
        nonlocal gone
        if not _.cancelled() and _.exception() is None:
            gone = True
            current.cancel()

    watcher = asyncio.create_task(_wait_disconnect(request))
    watcher.add_done_callback(cancel_work)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.remove_done_callback(cancel_work)
        watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
