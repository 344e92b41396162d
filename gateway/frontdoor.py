"""The one ASGI entry of the gateway, in front of the FastAPI app.

Every HTTP request passes here once, with no stack of middlewares: its request id (the client's
``X-Request-Id`` or a new one, returned on every response), the in-flight count, the body limit
(413 before a route reads it), the API key (every path but ``/health`` and ``/ready``), and an
access log line after the response. The two completion routes go straight to the pipeline (no
router, no dependency injection, no Starlette response objects on the hot path); every other
route is the FastAPI app's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from gateway import logs, responses_api, tracing
from gateway.auth import PUBLIC_PATHS, authenticate
from gateway.backends.base import CHAT, COMPLETIONS
from gateway.config import Settings
from gateway.errors import RaglineError, as_ragline_error
from gateway.http import (
    ClientDisconnected,
    HttpRequest,
    Reply,
    send_error,
    too_large,
    wait_disconnect,
)
from gateway.logs import access_log
from gateway.responses_api import RESPONSES
from gateway.routes import console, docs

log = logging.getLogger("ragline")

_ID_PREFIX = uuid.uuid4().hex[:12]  # unique per process; the counter makes ids unique within it
_FAST = {CHAT, COMPLETIONS, RESPONSES}
# the routes that take multipart file uploads: the larger upload limit applies to their
# multipart bodies alone (a multipart header elsewhere buys nothing)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_UPLOADS = re.compile(r"^/v1/(files|vector_stores/[^/]+/files)$")


class Bookkeeping:
    """What follows a response (settling its reservation, metrics, the access log), done in
    batches off the request path: ``delay`` seconds after the first job, or when a reader needs
    it done (``flush``: ``/metrics``, shutdown). A job that fails is logged, never raised."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self._jobs: list[Callable[[], Awaitable[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None

    def add(self, job: Callable[[], Awaitable[None]]) -> None:
        self._jobs.append(job)
        if self._timer is None and self._running is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._running is None and self._jobs:
            self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._jobs:
                jobs, self._jobs = self._jobs, []
                with logs.batch():  # the batch's access lines in one write
                    for job in jobs:
                        try:
                            await job()
                        except Exception:
                            log.exception("bookkeeping after a response failed")
        finally:
            self._running = None

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._start()
        if self._running is not None:
            await asyncio.shield(self._running)


class FrontDoor:
    def __init__(self, api: Any, settings: Settings) -> None:
        self.api = api  # the FastAPI app: its routes, its lifespan, its state
        self.max_bytes = settings.max_request_bytes
        self.upload_bytes = settings.max_upload_bytes
        self.send_timeout = settings.send_timeout
        self.bookkeeping = Bookkeeping()
        api.state.bookkeeping = self.bookkeeping
        self._ids = itertools.count()

    @property
    def state(self) -> Any:
        return self.api.state

    @property
    def routes(self) -> Any:
        return self.api.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # the lifespan
            return
        if tracing.enabled():
            with tracing.server_span(scope["method"], scope["path"], scope["headers"]) as span:
                await self._serve(scope, receive, send, span)
            return
        await self._serve(scope, receive, send, None)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, span: Any) -> None:
        started = time.perf_counter()
        request_id, cache_control, length, authorization = "", b"", -1, b""
        multipart = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"authorization":
                authorization = value
            elif name == b"cache-control":
                cache_control = value
            elif name == b"content-type":
                multipart = value.startswith(b"multipart/form-data")
            elif name == b"traceparent" and span is None:  # tracing off: passed on as sent
                tracing.incoming.set({"traceparent": value.decode("latin-1")})
        request_id = request_id or f"{_ID_PREFIX}{next(self._ids):012x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        path = scope["path"]
        limit = self.upload_bytes if multipart and _UPLOADS.match(path) else self.max_bytes
        app_state = self.api.state
        app_state.in_flight += 1
        try:
            if length > limit:
                refused = too_large(limit)
                state["error_code"] = refused.code or refused.error_type
                await send_error(send_with_id, refused, close=True)
                return
            try:
                if (
                    path not in PUBLIC_PATHS
                    and not docs.is_public(path)
                    and not (console.is_public(path))
                ):
                    with tracing.span("authenticate"):
                        state["principal"] = await authenticate(
                            app_state.keys,
                            authorization,
                            path,
                            scope.get("client"),
                            scope["method"],
                        )
                if path in _FAST and scope["method"] == "POST":
                    status = await self._complete(
                        scope, receive, send, path, limit, cache_control, id_header
                    )
                    return
            except RaglineError as exc:
                state["error_code"] = exc.code or exc.error_type
                await send_error(send_with_id, exc)
                return
            await self.api(scope, _limited(receive, limit), send_with_id)
        finally:
            app_state.in_flight -= 1
            principal = state.get("principal")
            key_id = getattr(principal, "key_id", None)
            code = state.get("error_code")
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("ragline.request_id", request_id)
                if key_id is not None:
                    span.set_attribute("ragline.key_id", key_id)
                if code is not None:
                    span.set_attribute("error.type", code)
            fields = state.get("log_fields")
            if code is not None:
                fields = {**(fields or {}), "error": code}
            line = (
                request_id,
                scope["method"],
                path,
                status,
                (time.perf_counter() - started) * 1000,
                key_id,
                fields,
            )
            self.bookkeeping.add(lambda: self._account(scope, line, code))

    async def _account(self, scope: Scope, line: tuple[Any, ...], code: str | None) -> None:
        """After a response, in a batch: the access line, and the response counted by route
        template (never the raw path: a client choosing paths must not choose series)."""
        access_log(*line)
        metrics = getattr(self.api.state, "metrics", None)
        if metrics is None:
            return
        route = scope.get("route")
        template = getattr(route, "path", None) or _route_template(self.api.routes, scope)
        _, method, _, status, _, key_id, _ = line
        method = method if method in _METHODS else "OTHER"
        labels = (template, method, str(status), code or "", key_id or "-")
        metrics.child(metrics.responses, *labels).inc()

    async def _complete(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        limit: int,
        cache_control: bytes,
        id_header: tuple[bytes, bytes],
    ) -> int:
        """``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/responses``: straight to
        the pipeline. Returns the status sent."""
        body = await _read_body(receive, limit)
        request = HttpRequest(
            request_id=scope["state"]["request_id"],
            principal=scope["state"]["principal"],
            body=body,
            receive=receive,
            no_cache=b"no-cache" in cache_control.lower(),
        )
        try:
            if path == RESPONSES:
                reply = await responses_api.handle(self.state.pipeline, request)
            else:
                reply = await self.state.pipeline.handle(path, request)
        except Exception as exc:
            mapped = as_ragline_error(exc)
            if mapped is None:
                if isinstance(exc, ClientDisconnected):
                    return 499
                log.exception("unhandled error", exc_info=exc)
                mapped = RaglineError(_SERVER_ERROR)
            elif mapped.status_code >= 500:
                log.warning("request failed: %s (%s)", mapped.message, type(mapped).__name__)
            scope["state"]["error_code"] = mapped.code or mapped.error_type
            await send_error(send, mapped, extra=[id_header])
            return mapped.status_code
        if reply.status >= 400 and reply.stream is None:
            scope["state"]["error_code"] = _error_code(reply.body)
        try:
            await send_reply(send, receive, reply, id_header, timeout=self.send_timeout)
        finally:
            if reply.after is not None:
                self.bookkeeping.add(reply.after)
            if reply.log_fields is not None:
                scope["state"]["log_fields"] = reply.log_fields()
        return reply.status


_SERVER_ERROR = "The server had an error processing your request."


async def send_reply(
    send: Send,
    receive: Receive,
    reply: Reply,
    *extra: tuple[bytes, bytes],
    timeout: float | None = None,
) -> None:
    """Send ``reply``; a stream is cancelled when the client leaves, or stops reading for
    ``timeout`` seconds (a slow reader must not hold an upstream connection forever)."""
    headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    headers += extra
    if reply.stream is None:
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
    else:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await _stream(send, receive, reply.stream, timeout)


def _route_template(routes: Any, scope: Scope) -> str:
    """The path template of the route ``scope`` matches, for a response sent before routing
    (a failed key, a body too large); ``unmatched`` for none (404)."""
    path = str(scope["path"])
    if path in _FAST:
        return path
    for route in _flat_routes(routes):
        if route.path_regex.match(path):
            return str(route.path)
    return "unmatched"


def _flat_routes(routes: Any) -> list[Any]:
    """The app's routes, those of included routers in their place (none has a prefix)."""
    out: list[Any] = []
    for route in routes:
        if hasattr(route, "path_regex"):
            out.append(route)
        elif hasattr(route, "original_router"):
            out += _flat_routes(route.original_router.routes)
    return out


def _error_code(body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or "error")
    except (orjson.JSONDecodeError, AttributeError):
        return "error"


async def _stream(send: Send, receive: Receive, events: Any, timeout: float | None) -> None:
    sender = asyncio.current_task()
    assert sender is not None
    watcher = asyncio.create_task(wait_disconnect(receive))
    watcher.add_done_callback(lambda t: t.cancelled() or sender.cancel())
    try:
        async for event in events:
            async with asyncio.timeout(timeout):  # the client's socket buffer stays full
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    except TimeoutError:
        log.info("a client stopped reading its stream for %ss; it was closed", timeout)
    except asyncio.CancelledError:
        if not watcher.done() or watcher.cancelled():
            raise
        sender.uncancel()  # the client left: the stream was closed, nothing more to send
    finally:
        watcher.cancel()
        await events.aclose()


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that fails once a chunked body crosses ``limit``."""
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return limited_receive
