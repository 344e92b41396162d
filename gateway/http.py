"""HTTP plumbing shared by the routes: body parsing and validation errors, the request and reply
types of the pipeline, disconnects."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import Receive, Send

from gateway.auth import Principal
from gateway.errors import InvalidRequest, PayloadTooLarge, RaglineError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

_TYPE_TAG = re.compile(r"[\[\(\-]|^(str|int|float|bool|list|dict|none|null)$")


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than this server accepts ({limit} bytes).")


async def send_error(
    send: Send,
    exc: RaglineError,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Render an error from ASGI code (before or instead of a route), in OpenAI's shape."""
    data = orjson.dumps(exc.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    headers += extra or []
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@dataclass(frozen=True)
class HttpRequest:
    """What the pipeline needs of an HTTP request; the front door makes it."""

    request_id: str
    principal: Principal
    body: bytes
    receive: Receive  # for noticing a client that leaves
    no_cache: bool = False  # Cache-Control: no-cache


@dataclass
class Reply:
    """A response for the front door to send: JSON bytes or a stream of SSE events. ``after``
    runs once it has been sent (settling the request)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    after: Callable[[], Awaitable[None]] | None = None
    log_fields: Callable[[], dict[str, Any]] | None = None  # for the access log, once sent


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
        # the last part is the client's own key, whatever it looks like (never a union tag)
        parent, key = param_path(loc[:-1]), str(loc[-1])
        param = f"{parent}.{key}" if parent else key
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param or repr(param)}",
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
    return validate_body(await request.body(), model)


def validate_body(body: bytes, model: type[M]) -> M:
    """Validate a JSON body; every failure is a 400 in OpenAI's shape."""
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


async def until_disconnect(receive: Receive, work: Awaitable[T], after: float = 0.02) -> T:
    """Await ``work`` but cancel it when the client disconnects first.

    For responses that do not stream yet (non-streaming calls, and a stream before its first
    event): the server only notices a disconnect when someone waits on ``receive``. The watcher
    task starts only once ``work`` has taken ``after`` seconds, so that a fast answer costs a
    timer rather than a task; a client that leaves is noticed within that much of leaving.
    """
    current = asyncio.current_task()
    assert current is not None
    loop = asyncio.get_running_loop()
    gone = False
    watcher: asyncio.Task[None] | None = None

    def cancel_work(task: asyncio.Task[None]) -> None:
        nonlocal gone
        if not task.cancelled() and task.exception() is None:
            gone = True
            current.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = loop.create_task(wait_disconnect(receive))
        watcher.add_done_callback(cancel_work)

    timer = loop.call_later(after, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.remove_done_callback(cancel_work)
            watcher.cancel()


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
