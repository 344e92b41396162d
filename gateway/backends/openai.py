"""The ``openai`` backend: any OpenAI-compatible HTTP server (llama.cpp's, TGI, vLLM, another
ragline, a hosted API), as a pool of replicas.

- **Client**: per replica, a pool of keep-alive HTTP/1.1 connections (``http1.py``: httptools
  parsing, 40% of aiohttp's CPU per request, measured).
- **Forwarding**: the pipeline's body goes upstream with only ``model`` rewritten and, for
  streams, ``stream_options.include_usage`` forced on (usage settles the rate limits whether or
  not the client asked for it). Fields we do not model travel through unchanged, both ways:
  what the upstream sends beside the text lands in ``Chunk.fields`` / ``Chunk.extra``.
- **Failover**: a refused connection, a 5xx or a timeout moves the request to another replica,
  but only before its first event arrived; a stream is never replayed. After that, a failure ends
  the stream with an error event. When no replica can answer the error is ``retryable``: the
  pipeline tries the model's fallbacks.
- **Errors**: an upstream 4xx is an ``UpstreamError`` with the upstream's status, message, type,
  param and code, for the client to fix.
- **Cancellation**: closing the stream (client gone) closes the upstream connection, and the
  server aborts the request (vLLM does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway import tracing
from gateway.backends.base import (
    CHAT,
    Capabilities,
    Choice,
    Chunk,
    Event,
    Generation,
    GenerationRequest,
    ModelInfo,
    Usage,
)
from gateway.backends.http1 import HttpPool, PoolExhausted, Response, UpstreamConnectionError
from gateway.backends.replicas import Replica, ReplicaPool
from gateway.config import HttpModelConfig
from gateway.errors import BackendError, Overloaded, UpstreamError

log = logging.getLogger("ragline.upstream")

_MAX_EVENT_BYTES = 16 << 20
_CHOICE_KNOWN = frozenset({"index", "delta", "message", "text", "finish_reason"})
_MESSAGE_KNOWN = frozenset({"role", "content"})


class OpenAIBackend:
    capabilities = Capabilities()
    load_error: str | None = None

    def __init__(self, config: HttpModelConfig, api_key: str | None = None) -> None:
        self.name = config.name
        self.config = config
        self.pool = ReplicaPool(config.upstreams, config.health)
        headers = {"Content-Type": "application/json"}
        if api_key or config.api_key:
            headers["Authorization"] = f"Bearer {api_key or config.api_key}"
        self.clients = {
            r.url: HttpPool(
                r.url,
                max_connections=config.max_connections,
                connect_timeout=config.timeouts.connect,
                headers=headers,
            )
            for r in self.pool.replicas
        }
        # health checks on connections of their own: requests that hold every pooled
        # connection (slow readers) must not make a healthy replica look dead
        self._probes = {
            r.url: HttpPool(
                r.url, max_connections=1, connect_timeout=config.timeouts.connect, headers=headers
            )
            for r in self.pool.replicas
        }
        self._started = False
        self._created = int(time.time())

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._started and self.pool.any_healthy

    def unavailable(self) -> Overloaded:
        """Why requests cannot be served now: not started yet, or every replica is ejected."""
        if not self._started:
            return Overloaded(f"The model '{self.name}' is not ready yet.", retry_after=5)
        return self._no_upstream("no replica is healthy right now")

    def _no_upstream(self, why: str) -> Overloaded:
        return Overloaded(
            f"No upstream for model '{self.name}' could answer ({why}).",
            retry_after=self.pool.retry_after(),
            code="no_healthy_upstream",
        )

    async def start(self) -> None:
        self._started = True
        path = self.config.health_path()
        if path is None:
            for replica in self.pool.replicas:  # passive health only
                replica.healthy = replica.checked = True
        else:
            self.pool.start(lambda replica: self._health(replica, path))
            await self.pool.wait_checked()
        log.info(
            "model %s: %d of %d upstream replicas healthy",
            self.name,
            len(self.pool.available()),
            len(self.pool.replicas),
        )

    async def aclose(self) -> None:
        self._started = False
        await self.pool.aclose()
        for client in (*self.clients.values(), *self._probes.values()):
            await client.aclose()

    async def _health(self, replica: Replica, path: str) -> bool:
        response = await self._probes[replica.url].request("GET", path)
        await response.read()
        return response.status == 200

    async def post(self, replica: Replica, path: str, body: bytes) -> Response:
        """A POST to one replica (the admin's adapter loads use it too)."""
        return await self.clients[replica.url].request("POST", path, body)

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=self.name,
                owned_by=self.config.owned_by,
                created=self._created,
                max_model_len=self.config.max_model_len,
                root=self.config.upstream_model,
            )
        ]

    def stats(self) -> dict[str, int | str]:
        return {
            "replicas": len(self.pool.replicas),
            "healthy": len(self.pool.available()),
            "running": sum(r.outstanding for r in self.pool.replicas),
            "waiting": 0,
        }

    # -- hooks for subclasses (vLLM: adapters) --------------------------------------------------

    def upstream_model(self, request: GenerationRequest) -> str:
        return self.config.upstream_model

    async def choose(self, request: GenerationRequest, tried: set[Replica]) -> Replica:
        candidates = self.pool.available(tried)
        if not candidates:
            raise self._no_upstream("no healthy replica left to try")
        return self.pool.pick(candidates)

    async def prepare(self, request: GenerationRequest, replica: Replica) -> None:
        """Run before a request is sent to ``replica`` (vLLM loads the adapter)."""

    async def retry_client_error(
        self, request: GenerationRequest, replica: Replica, status: int
    ) -> bool:
        """Whether a 4xx from ``replica`` should be retried there once (a stale adapter)."""
        return False

    # -- requests ------------------------------------------------------------------------------

    def _payload(self, request: GenerationRequest, stream: bool) -> bytes:
        body = dict(request.body) if request.body is not None else _body_of(request)
        body["model"] = self.upstream_model(request)
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        try:
            return orjson.dumps(body)
        except TypeError:  # an integer beyond 64 bits somewhere in a client's schema, say
            return json.dumps(body, separators=(",", ":")).encode()

    async def _exchange(
        self, request: GenerationRequest, stream: bool
    ) -> tuple[Replica, Response, bytes, float]:
        """Send to a replica, with failover, until one answers: returns the replica, the open
        response, its first SSE event (a stream) or whole body (JSON), and the deadline."""
        assert self._started, f"backend {self.name!r} is not started"
        data = self._payload(request, stream)
        headers = tracing.outgoing_headers({"X-Request-Id": request.request_id})
        t = self.config.timeouts
        loop = asyncio.get_running_loop()
        tried: set[Replica] = set()
        retried = False
        last_error = "no replica was tried"
        while True:
            if tried and not self.pool.available(tried):
                raise self._no_upstream(last_error)
            replica = await self.choose(request, tried)
            tried.add(replica)
            replica.outstanding += 1
            kept = False
            response: Response | None = None
            try:
                await self.prepare(request, replica)
                deadline = loop.time() + t.total
                # a JSON answer's head arrives when it is complete: one timeout covers it all
                async with asyncio.timeout(
                    t.first_token if stream else min(t.first_token, t.total)
                ):
                    response = await self.clients[replica.url].request(
                        "POST", request.endpoint, data, headers, wait=t.pool_wait
                    )
                    if response.status >= 500:
                        last_error = f"{replica.url} answered {response.status}"
                        response.close()
                        self.pool.failed(replica, connection=False, reason=last_error)
                        continue
                    if response.status >= 400:
                        payload = await response.read()
                        if not retried and await self.retry_client_error(
                            request, replica, response.status
                        ):
                            tried.discard(replica)
                            retried = True
                            continue
                        raise upstream_error(response.status, payload)
                    if stream:
                        first = await _next_event(response)
                        if first is None:
                            raise UpstreamConnectionError("the stream ended before any event")
                    else:
                        first = await response.read()
                self.pool.succeeded(replica)
                kept = stream
                return replica, response, first, deadline
            except UpstreamConnectionError as exc:
                last_error = f"{replica.url}: {exc}"
                self.pool.failed(replica, connection=True, reason=last_error)
            except PoolExhausted as exc:  # busy here, not sick there: no ejection
                last_error = str(exc)
            except TimeoutError:
                last_error = f"{replica.url} timed out"
                self.pool.failed(replica, connection=False, reason=last_error)
            finally:
                if not kept:
                    replica.outstanding -= 1
                    if response is not None:
                        response.close()  # no-op once read to the end

    async def generate(self, request: GenerationRequest) -> Generation:
        _, _, payload, _ = await self._exchange(request, stream=False)
        try:
            return parse_completion(orjson.loads(payload), request.endpoint == CHAT)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError(f"The upstream sent a malformed response: {exc}") from exc

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        replica, response, event, deadline = await self._exchange(request, stream=True)
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                if event.startswith(b"data: [DONE]"):
                    finished = True
                    return
                for item in parse_event(event):
                    yield item
                async with asyncio.timeout(_left(loop, deadline)):
                    next_event = await _next_event(response)
                if next_event is None:
                    raise BackendError("The upstream closed the stream before it finished.")
                event = next_event
        except UpstreamConnectionError as exc:
            self.pool.failed(replica, connection=True, reason=f"stream broke: {exc}")
            raise BackendError(
                "The upstream connection broke in the middle of the response.",
                code="upstream_disconnected",
            ) from exc
        except TimeoutError as exc:
            raise BackendError(
                "The upstream did not finish in time.", code="upstream_timeout"
            ) from exc
        finally:
            replica.outstanding -= 1
            if not finished:
                response.close()  # closes the connection: the upstream aborts the request


# -- parsing the upstream's OpenAI responses ---------------------------------------------------


def parse_event(event: bytes) -> list[Event]:
    """One SSE ``data:`` event as internal events (usage, or a chunk per choice)."""
    payload = orjson.loads(event[5:])
    if "error" in payload and not payload.get("choices"):
        error = payload["error"] if isinstance(payload["error"], dict) else {}
        raise BackendError(f"The upstream failed: {error.get('message', 'no details')}")
    out: list[Event] = []
    for choice in payload.get("choices") or ():
        delta = choice.get("delta")
        holder = delta if isinstance(delta, dict) else choice
        text = holder.get("content") if delta is not None else choice.get("text")
        fields = _extra(holder, _MESSAGE_KNOWN) if delta is not None else None
        extra = _extra(choice, _CHOICE_KNOWN)
        finish = choice.get("finish_reason")
        if text or finish or fields or extra:
            out.append(Chunk(int(choice.get("index", 0)), text or "", finish, None, fields, extra))
    usage = payload.get("usage")
    if usage and not payload.get("choices"):
        out.append(Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])))
    return out


def parse_completion(payload: dict[str, Any], chat: bool) -> Generation:
    choices = []
    for c in payload["choices"]:
        message = c.get("message") or {}
        text = message.get("content") if chat else c.get("text")
        choices.append(
            Choice(
                index=int(c.get("index", 0)),
                text=text or "",
                finish_reason=c.get("finish_reason"),
                fields=_extra(message, _MESSAGE_KNOWN) if chat else None,
                extra=_extra(c, _CHOICE_KNOWN),
            )
        )
    u = payload.get("usage") or {}
    usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
    return Generation(choices, usage)


def _extra(obj: dict[str, Any], known: frozenset[str]) -> dict[str, Any] | None:
    extra = {k: v for k, v in obj.items() if k not in known and v is not None}
    return extra or None


def upstream_error(status: int, payload: bytes) -> UpstreamError:
    """An upstream's 4xx as our error, keeping its message, type, param and code."""
    error: dict[str, Any] = {}
    try:
        data = orjson.loads(payload)
        if isinstance(data, dict):
            inner = data.get("error", data)
            error = inner if isinstance(inner, dict) else {"message": str(inner)}
    except ValueError:
        pass
    message = str(error.get("message") or payload.decode(errors="replace").strip()[:500] or "")
    return UpstreamError(
        status,
        message or f"The upstream answered {status}.",
        error_type=str(error.get("type") or "invalid_request_error"),
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        code=str(error["code"]) if error.get("code") is not None else None,
    )


def _body_of(request: GenerationRequest) -> dict[str, Any]:
    """An OpenAI body from the typed fields (for callers that built no wire body: evaluations)."""
    p = request.params
    body: dict[str, Any] = {
        "n": request.n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
    }
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.ignore_eos:
        body["ignore_eos"] = True
    if p.min_tokens:
        body["min_tokens"] = p.min_tokens
    if request.messages is not None:
        body["messages"] = list(request.messages)
    elif request.batch:
        body["prompt"] = [list(x) if isinstance(x, tuple) else x for x in request.batch]
    else:
        body["prompt"] = list(request.prompt_ids) if request.prompt_ids else request.prompt
    return body


async def _next_event(response: Response) -> bytes | None:
    """The next ``data: ...`` event including its blank line, or None at the end of the body."""
    while True:
        event = await response.read_event(_MAX_EVENT_BYTES)
        if event is None or event.startswith(b"data:"):
            return event
        # blank keep-alives, comments and other SSE fields are not part of OpenAI's stream


def _left(loop: asyncio.AbstractEventLoop, deadline: float) -> float:
    return max(deadline - loop.time(), 0.001)
