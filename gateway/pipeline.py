"""The request pipeline: the nine steps of DESIGN.md over one ``Call``.

    1 authenticate   the caller (the front door checked the key) and its validated request
    2 resolve        the model → backends (with fallbacks), adapter, route; the key may use it
    3 admit          the rate-limit reservation, before anything costly        admission.py
    4 input safety   the policy's scanners on what the client wrote             safety.py
    5 retrieve       the route's vector store searched for the last message     retrieval.py
    6 render         template, few-shot examples, context, token budget         prompting.py
    7 generate       the exact cache, else the backends in order until one answers
    8 output safety  redaction of the answer, JSON or stream, whatever the backend  safety.py
    9 settle         usage settles the reservation, metrics, hooks, once the response is sent

A request refused at step 3 costs no scan, no embedding and no rendering; a cache hit costs no
backend call. Each step takes the ``Call`` and returns a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway import tracing
from gateway.admission import Admission, Ticket
from gateway.backends.base import (
    CHAT,
    Backend,
    Chunk,
    Event,
    Generation,
    Usage,
)
from gateway.backends.registry import BackendRegistry, not_ready
from gateway.cache import CachedResponse
from gateway.call import (
    Call,
    check_supported,
    generation_request,
    message_text,
    requested_max_tokens,
)
from gateway.config import RagConfig, Settings
from gateway.errors import (
    BackendError,
    InvalidRequest,
    PermissionDenied,
    RaglineError,
)
from gateway.http import ClientDisconnected, HttpRequest, Reply, until_disconnect, validate_body
from gateway.metrics import Metrics
from gateway.prompting import PromptStage
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.responses import Meta, guarded, new_id, render_json, render_sse
from gateway.retrieval import RagService
from gateway.safety import SafetyStage
from gateway.structured import OutputContract, check_schemas

log = logging.getLogger("ragline.pipeline")
T = TypeVar("T")
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class StreamEnd:
    """How a stream ended, for step 9."""

    status: int = 499  # until it completes: the client went away first
    ttft: float | None = None
    texts: list[str] | None = None  # each choice's text, kept when citations need it
    span: Any = None  # the backend's trace span: a first_token event, ended with the stream


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        registry: BackendRegistry,
        admission: Admission,
        prompts: PromptStage,
        rag: RagService,
        safety: SafetyStage,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.admission = admission
        self.prompts = prompts
        self.rag = rag
        self.safety = safety
        self.metrics = metrics

    async def handle(self, endpoint: str, http: HttpRequest) -> Reply:
        call = self.authenticate(endpoint, http)  # 1
        call = self.resolve(call)  # 2
        with tracing.span("admission"):
            call = await self.admission.admit(call)  # 3
        ticket = call.ticket
        assert ticket is not None
        try:
            await check_schemas(call.body)  # a response format or tools that cannot be enforced
            with tracing.span("input_safety"):
                call = await self.safety.screen_input(call)  # 4
            with tracing.span("retrieval"):
                call = await self.retrieve(call)  # 5
            with tracing.span("rendering"):
                call = await self.render(call)  # 6
            with tracing.span("cache"):
                call, hit = await self.admission.lookup(call)  # 7
            if hit is not None:
                return self.replay(call, hit)
            return await self.generate(call, http)  # 7, 8, and 9 once sent
        except BaseException as exc:
            await ticket.settle(_status_of(exc))
            raise

    # -- 1, 2 ------------------------------------------------------------------------------------

    def authenticate(self, endpoint: str, http: HttpRequest) -> Call:
        """Step 1: the caller (its key was checked at the front door) and its request."""
        request: ChatCompletionRequest | CompletionRequest
        if endpoint == CHAT:
            request = validate_body(http.body, ChatCompletionRequest)
        else:
            request = validate_body(http.body, CompletionRequest)
        # the body as validated, not as sent: `"n": "2"` or `"prompt": [5.0]` pass validation
        # (lax, as OpenAI's and vLLM's servers) and every later step reads them as the numbers
        body = request.model_dump(exclude_unset=True, by_alias=True)
        body.pop("ragline", None)
        return Call(
            endpoint=endpoint,
            request_id=http.request_id,
            principal=http.principal,
            request=request,
            body=body,
            options=request.ragline,
            no_cache=http.no_cache,
        )

    def resolve(self, call: Call) -> Call:
        """Step 2: what the model names, whether this key may use it (checked here only), and
        whether its backend can honour the request."""
        if (call.request.n or 1) > self.settings.max_n:
            raise InvalidRequest(
                f"n={call.request.n} is larger than this server allows ({self.settings.max_n}).",
                param="n",
            )
        request = call.request
        wanted = requested_max_tokens(call.body) or 0
        prompts = len(request.prompts()) if isinstance(request, CompletionRequest) else 1
        total = (request.n or 1) * wanted * prompts
        if total > self.settings.max_completion_tokens:
            raise InvalidRequest(
                f"This request asks for up to {total} completion tokens (n × max_tokens"
                f"{' × prompts' if prompts > 1 else ''}); this server allows "
                f"{self.settings.max_completion_tokens} per request.",
                param="max_tokens",
            )
        if not call.principal.may_use(call.model):
            raise PermissionDenied(
                f"This key may not use the model '{call.model}'.",
                param="model",
                code="model_not_allowed",
            )
        target = self.registry.resolve(call.model)
        check_supported(call, target.backend.capabilities)
        if not call.chat:
            templated = target.route is not None and (
                target.route.template or target.route.experiment or target.route.rag
            )
            options = call.request.ragline
            asked = None
            if options is not None:
                asked = "ragline.template" if options.template else "ragline.rag"
                asked = asked if options.template or options.rag else None
            if templated or asked:
                raise InvalidRequest(
                    "prompt templates and retrieval apply to chat completions; use "
                    "/v1/chat/completions.",
                    param="model" if templated else asked,
                )
        return call.evolve(target=target)

    # -- 5, 6 ------------------------------------------------------------------------------------

    async def retrieve(self, call: Call) -> Call:
        """Step 5: search the route's (or the request's) vector store for the last message."""
        target, request = call.target, call.request
        assert target is not None
        if not isinstance(request, ChatCompletionRequest):
            return call
        config = target.route.rag if target.route is not None else None
        opts = request.ragline.rag if request.ragline is not None else None
        if (config is None and opts is None) or (opts is not None and not opts.enabled):
            return call
        principal = call.principal
        if opts is not None:
            if config is not None and not principal.policy.prompt_overrides:
                raise PermissionDenied(
                    "This key may not change retrieval per request.",
                    param="ragline.rag",
                    code="prompt_override_not_allowed",
                )
            changes = opts.model_dump(exclude_none=True, exclude={"enabled"})
            if config is None:
                if opts.store is None:
                    raise InvalidRequest(
                        "ragline.rag needs a `store` on a model without retrieval.",
                        param="ragline.rag.store",
                    )
                config = RagConfig(store=opts.store)
            config = config.model_copy(update=changes)
        assert config is not None
        messages = call.body["messages"]
        query = message_text(messages[-1]) if messages[-1].get("role") == "user" else ""
        if not query.strip():
            raise InvalidRequest(
                "retrieval searches the last message, which must be a non-empty user message",
                param="messages",
            )
        policy = self.safety.policy_for(principal, target)
        screen = None
        if policy is not None:

            def screen(text: str) -> str | None:
                return self.safety.screen_chunk(policy, text, principal)

        by_route = opts is None or opts.store is None  # the store is the route's, not the key's
        route = target.route.name if target.route is not None else ""
        retrieved = await self.rag.retrieve(principal, config, query, screen, by_route, route)
        return call.evolve(retrieved=retrieved)

    async def render(self, call: Call) -> Call:
        """Step 6: a templated chat request's messages and sampling settings are replaced."""
        if not call.chat:
            return call
        context = call.retrieved.context if call.retrieved is not None else None
        shaped = await self.prompts.shape(call, context)
        if shaped is None:
            return call
        changes: dict[str, Any] = {"messages": shaped.messages}
        for name, value in shaped.overrides.items():
            if name == "max_tokens" and call.body.get("max_completion_tokens") is not None:
                changes["max_completion_tokens"] = value
            else:
                changes[name] = value
        ticket = call.ticket
        assert ticket is not None

        async def count(status: int, usage: tuple[int, int]) -> None:
            self.prompts.count(shaped, status, usage)

        ticket.hooks.append(count)
        return call.evolve(body=call.with_body(**changes), shaped=shaped)

    async def _answered(self, call: Call, kind: str, payload: bytes | None) -> None:
        """A complete answer, before its last byte is sent: keep it for the cache (unless it
        carried an error) and, for a templated request, for feedback."""
        if payload is not None:
            await self.admission.store(call, kind, payload)
        if call.shaped is not None and call.ticket is not None:
            ids = [call.request_id, call.ticket.response_id or ""]
            await self.prompts.remember(call.shaped, call.principal, ids)

    def info(self, call: Call, answers: list[str] | None = None) -> dict[str, Any] | None:
        """The response's ``ragline`` object: the prompt, citations, safety. Citations are the
        chunks the prompt numbered ``[n]`` (those above the relevance floor); when the answers
        cite any of those numbers, only the ones they cite."""
        info: dict[str, Any] = {}
        shaped, retrieved = call.shaped, call.retrieved
        if shaped is not None:
            info["prompt"] = shaped.info
            if retrieved is not None:
                prompted = int(shaped.info.get("context", 0))  # the budget may drop the last
                info["citations"], info["retrieval"] = retrieved.cite(prompted, answers or [])
        if call.screened is not None:
            info["safety"] = call.screened.info()
        return info or None

    # -- 7, 8, 9 ---------------------------------------------------------------------------------

    def replay(self, call: Call, hit: CachedResponse) -> Reply:
        ticket = call.ticket
        assert ticket is not None
        after = _after(ticket, 200)
        if hit.kind == "sse":
            return Reply(
                200, {**SSE_HEADERS, **ticket.headers}, stream=_once(hit.body), after=after,
                log_fields=ticket.log_fields,
            )  # fmt: skip
        headers = {**JSON_HEADERS, **ticket.headers}
        return Reply(200, headers, hit.body, after=after, log_fields=ticket.log_fields)

    async def generate(self, call: Call, http: HttpRequest) -> Reply:
        ticket, target = call.ticket, call.target
        assert ticket is not None and target is not None
        request = call.request
        prefix = "chatcmpl" if call.chat else "cmpl"
        batch = request.prompts() if isinstance(request, CompletionRequest) else [None]
        meta = Meta(
            id=new_id(prefix),
            model=call.model,
            chat=call.chat,
            choices=(request.n or 1) * max(1, len(batch)),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        ticket.response_id = meta.id
        guard = call.screened.output if call.screened is not None else None
        contract = OutputContract.of(call.body)
        if not request.stream:
            with tracing.span("backend", **{"ragline.model": call.model}):
                generation = await until_disconnect(
                    http.receive, self._first(call, meta.id, _generate)
                )
            ticket.prompt_tokens = generation.usage.prompt_tokens
            ticket.completion_tokens = generation.usage.completion_tokens
            if contract is not None:
                for c in generation.choices:
                    calls = (c.fields or {}).get("tool_calls") or []
                    contract.hold(c.text, calls, c.finish_reason, ticket.served_by)
            if guard is not None:
                with tracing.span("output_safety"):
                    generation = guard.generation(generation)
            answers = [c.text for c in generation.choices] if call.retrieved else None
            payload = render_json(meta, generation, self.info(call, answers))
            await self._answered(call, "json", payload)
            return Reply(
                200, {**JSON_HEADERS, **ticket.headers}, payload, after=_after(ticket, 200),
                log_fields=ticket.log_fields,
            )  # fmt: skip
        backend = tracing.start("backend", **{"ragline.model": call.model, "ragline.stream": True})
        try:
            events = await until_disconnect(http.receive, self._first(call, meta.id, _open_stream))
        except BaseException:
            if backend is not None:
                backend.end()
            raise
        end = StreamEnd(span=backend)
        if contract is not None:
            events = contract.held(events, ticket)
        if guard is not None:
            events = guard.events(events)
        if call.retrieved is not None:
            end.texts = [""] * meta.choices  # the answers' [n] markers choose the citations
        events = _observe(events, ticket, end)
        sse = guarded(render_sse(meta, events, lambda: self.info(call, end.texts)))
        return Reply(
            200,
            {**SSE_HEADERS, **ticket.headers},
            stream=self._tap(call, sse, end),
            after=lambda: ticket.settle(end.status, end.ttft),
            log_fields=ticket.log_fields,
        )

    async def _first(
        self,
        call: Call,
        response_id: str,
        attempt: Callable[[Backend, Any], Awaitable[T]],
    ) -> T:
        """Try the target's backends in order until one answers; a retryable failure (not
        ready, a 5xx, a refused connection, a timeout) moves on, anything else is raised."""
        target, ticket = call.target, call.ticket
        assert target is not None and ticket is not None
        failure: RaglineError | None = None
        for i, backend in enumerate(target.backends):
            if failure is not None:
                self.metrics.fallbacks.labels(target.base, backend.name).inc()
                log.warning(
                    "model %s: %s failed (%s), trying fallback %s",
                    target.base, target.backends[i - 1].name, failure.message, backend.name,
                )  # fmt: skip
            if not backend.ready:
                failure = not_ready(backend)
                continue
            adapter = target.adapter.name if target.adapter is not None and i == 0 else None
            typed = not backend.capabilities.forwards_body
            request = generation_request(call, response_id, adapter, typed)
            started = time.perf_counter()
            try:
                result = await attempt(backend, request)
            except RaglineError as exc:
                if not exc.retryable:
                    raise
                failure = exc
                continue
            finally:  # every call counts (a stream: until its first event)
                m = self.metrics
                m.child(m.backend, backend.name).observe(time.perf_counter() - started)
            ticket.served_by = backend.name
            return result
        assert failure is not None
        raise failure

    async def _tap(
        self, call: Call, sse: AsyncGenerator[bytes, None], end: StreamEnd
    ) -> AsyncGenerator[bytes, None]:
        """Pass the stream through; keep a complete one for the cache (stored before its last
        byte is sent), note how it ended."""
        keep: list[bytes] | None = [] if call.cache_key is not None else None
        try:
            async for event in sse:
                if event.startswith(b'data: {"error"'):
                    keep = None
                    end.status = 502
                elif event.startswith(b"data: [DONE]") and end.status == 499:
                    end.status = 200  # complete (an error event would have set 502 before)
                    whole = b"".join(keep) + event if keep is not None else None
                    await self._answered(call, "sse", whole)
                if keep is not None:
                    keep.append(event)
                yield event
        finally:
            await sse.aclose()


async def _generate(backend: Backend, request: Any) -> Generation:
    return await backend.generate(request)


async def _open_stream(backend: Backend, request: Any) -> AsyncGenerator[Event, None]:
    """Start the stream and wait for its first event: until then, a failure may fall back."""
    events = backend.stream(request)
    try:
        first = await anext(events)
    except StopAsyncIteration:
        raise BackendError("The backend ended the stream without an answer.") from None
    except BaseException:
        await events.aclose()
        raise
    return _prepend(first, events)


async def _prepend(first: Event, rest: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()


async def _observe(
    events: AsyncGenerator[Event, None], ticket: Ticket, end: StreamEnd
) -> AsyncGenerator[Event, None]:
    """Note the usage (the client may not have asked for it) and the first text's time."""
    try:
        async for event in events:
            if isinstance(event, Usage):
                ticket.prompt_tokens = event.prompt_tokens
                ticket.completion_tokens = event.completion_tokens
            elif isinstance(event, Chunk) and event.text:
                if end.ttft is None:
                    end.ttft = time.perf_counter() - ticket.started
                    if end.span is not None:
                        end.span.add_event("first_token", {"ragline.ttft_ms": end.ttft * 1000})
                if end.texts is not None and 0 <= event.index < len(end.texts):
                    end.texts[event.index] += event.text
            yield event
    finally:
        if end.span is not None:
            end.span.end()
        await events.aclose()


async def _once(payload: bytes) -> AsyncGenerator[bytes, None]:
    yield payload


def _after(ticket: Ticket, status: int) -> Callable[[], Awaitable[None]]:
    return lambda: ticket.settle(status)


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, RaglineError):
        return exc.status_code
    if isinstance(exc, ClientDisconnected | asyncio.CancelledError):
        return 499  # the client went away first
    return 500
