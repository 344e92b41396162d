"""Admission and settlement around one request: policy, rate limits, cache, metrics, access log.

``Admission.open`` runs before the backend (pipeline stage 3: who may call what, reserve tokens,
look up the cache); ``Ticket.finish`` runs after it (stage 9: settle the real usage, store the
answer, count it). Streams finish when their last event has been sent, or when the client left.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from gateway.auth import Principal, principal_of
from gateway.backends.base import Chunk, Usage
from gateway.cache import CachedResponse, ResponseCache, cache_key, is_deterministic
from gateway.config import Settings
from gateway.errors import InvalidRequest, PermissionDenied, RaglineError
from gateway.http import ClientDisconnected
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter, Reservation

_CONTENT = re.compile(rb'"(?:content|text)": ?"[^"]')
_USAGE = re.compile(rb'"usage": ?\{[^{}]*\}')


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap upper-ish estimate (≈ 3 characters per token plus message framing) used only to
    reserve TPM; the real usage settles the difference."""
    if "messages" in body:
        chars = sum(len(json.dumps(m.get("content", ""))) for m in body["messages"])
        return chars // 3 + 8 * len(body["messages"])
    prompt = body.get("prompt", "")
    return len(json.dumps(prompt)) // 3 + 4


def usage_from(payload: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI JSON body or usage event, if present."""
    match = _USAGE.search(payload)
    if match is None:
        return None
    usage = json.loads(match.group(0).split(b":", 1)[1])
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


@dataclass
class Ticket:
    """One admitted request, from reservation to settlement."""

    admission: Admission
    principal: Principal
    route: str
    model: str
    reservation: Reservation
    cache_key: str | None
    started: float = field(default_factory=time.perf_counter)
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_result: str = "bypass"
    response_id: str | None = None
    # run once the request is settled: (status, (prompt_tokens, completion_tokens))
    hooks: list[Callable[[int, tuple[int, int]], Awaitable[None]]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        h = self.reservation.headers()
        if self.cache_key is not None or self.cache_result == "bypass":
            h["X-Ragline-Cache"] = self.cache_result
        return h

    async def finish(
        self,
        usage: tuple[int, int] | None,
        *,
        ttft: float | None = None,
        store: CachedResponse | None = None,
        status: int = 200,
    ) -> None:
        a = self.admission
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage
        await a.limiter.settle(self.reservation, self.prompt_tokens + self.completion_tokens)
        if store is not None and self.cache_key is not None and status == 200:
            await a.cache.put(self.cache_key, store)
        elapsed = time.perf_counter() - self.started
        m, key = a.metrics, self.principal.key_id
        m.requests.labels(self.route, self.model, key, str(status)).inc()
        m.latency.labels(self.route, self.model).observe(elapsed)
        if self.prompt_tokens:
            m.prompt_tokens.labels(self.model, key).inc(self.prompt_tokens)
        if self.completion_tokens:
            m.completion_tokens.labels(self.model, key).inc(self.completion_tokens)
        if ttft is not None:
            m.ttft.labels(self.model).observe(ttft)
            if self.completion_tokens > 1:
                m.tpot.labels(self.model).observe((elapsed - ttft) / (self.completion_tokens - 1))
        for hook in self.hooks:
            await hook(status, (self.prompt_tokens, self.completion_tokens))

    async def fail(self, exc: BaseException) -> None:
        if isinstance(exc, RaglineError):
            status = exc.status_code
        elif isinstance(exc, ClientDisconnected | asyncio.CancelledError):
            status = 499  # the client went away first
        else:
            status = 500
        await self.finish((0, 0), status=status)

    def log_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache": self.cache_result,
        }

    async def observe(self, events: AsyncIterator[Chunk | Usage]) -> AsyncIterator[Chunk | Usage]:
        """Note the backend's usage as it streams by (the client may not have asked for it)."""
        async for event in events:
            if isinstance(event, Usage):
                self.prompt_tokens = event.prompt_tokens
                self.completion_tokens = event.completion_tokens
            yield event

    async def tap_stream(
        self,
        events: AsyncIterator[bytes],
        request: Request,
        usage_source: Callable[[], tuple[int, int] | None] | None = None,
    ) -> AsyncIterator[bytes]:
        """Pass SSE events through; on the way out settle usage, cache a complete stream, count."""
        keep: list[bytes] | None = [] if self.cache_key is not None else None
        usage: tuple[int, int] | None = None
        ttft: float | None = None
        complete = False
        try:
            async for event in events:
                if ttft is None and _CONTENT.search(event):
                    ttft = time.perf_counter() - self.started
                if b'"usage":{' in event or b'"usage": {' in event:
                    usage = usage_from(event) or usage
                if event.startswith(b"data: [DONE]"):
                    complete = True
                elif b'"error":' in event[:20]:
                    complete = False
                    keep = None
                if keep is not None:
                    keep.append(event)
                yield event
        finally:
            if usage is None and usage_source is not None:
                usage = usage_source()
            if usage is None and (self.prompt_tokens or self.completion_tokens):
                usage = (self.prompt_tokens, self.completion_tokens)
            store = None
            if complete and keep is not None and usage is not None:
                store = CachedResponse("sse", b"".join(keep), *usage)
            await self.finish(usage, ttft=ttft, store=store, status=200 if complete else 499)
            request.state.log_fields = self.log_fields()


class Admission:
    def __init__(
        self, settings: Settings, limiter: RateLimiter, cache: ResponseCache, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.cache = cache
        self.metrics = metrics

    @staticmethod
    def authorize(request: Request, model: str) -> Principal:
        """The caller, if its key may use ``model``; else ``PermissionDenied``."""
        principal = principal_of(request.state)
        if not principal.may_use(model):
            raise PermissionDenied(
                f"This key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
        return principal

    async def open(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        backend: str,
        adapter: str | None,
        variant: dict[str, str] | None = None,
    ) -> tuple[Ticket, CachedResponse | None]:
        """Check the key's policy, reserve, and look the answer up in the cache.

        ``body`` is the request as the client set it (it may be changed here: a key's
        ``max_tokens`` becomes the default). Raises ``PermissionDenied``, ``InvalidRequest`` or
        ``RateLimited``.
        """
        principal = self.authorize(request, str(body.get("model")))
        policy = principal.policy
        model = str(body.get("model"))
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        if policy.max_tokens is not None:
            if requested is not None and requested > policy.max_tokens:
                raise InvalidRequest(
                    f"max_tokens={requested} is above this key's limit of {policy.max_tokens}.",
                    param="max_tokens",
                    code="max_tokens_exceeded",
                )
            if requested is None:
                body["max_tokens"] = requested = policy.max_tokens
        cost = estimate_prompt_tokens(body) * max(1, int(body.get("n") or 1)) + (
            int(requested or self.settings.default_reserve_tokens) * max(1, int(body.get("n") or 1))
        )
        try:
            reservation = await self.limiter.reserve(principal.key_id, policy, cost)
        except RaglineError as exc:
            if exc.status_code == 429:
                self.metrics.rate_limited.labels(principal.key_id).inc()
            raise
        key = None
        cacheable = policy.cache and is_deterministic(body)
        if cacheable:
            key = cache_key(route, body, backend, adapter, variant)  # variant: safety policy
        ticket = Ticket(
            self,
            principal,
            route,
            model,
            reservation,
            key,
            cache_result="miss" if cacheable else "bypass",
        )
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        if key is None or no_cache:
            return ticket, None
        hit = await self.cache.get(key)
        self.metrics.cache.labels("hit" if hit else "miss").inc()
        if hit is not None:
            ticket.cache_result = "hit"
        return ticket, hit
