"""The request pipeline: OpenAI request in, backend call, OpenAI response (JSON or SSE) out.

Stages that later issues add (auth, limits, safety, retrieval, templates) slot in here, in the
order drawn in DESIGN.md. Two kinds of backend sit behind it:

- ``GenerationRequest`` backends (the embedded engine): wire types end here, the backend sees
  internal types, and ``responses.py`` renders its events as OpenAI JSON or SSE;
- proxy backends (vLLM): the validated body is forwarded, and the upstream's OpenAI response is
  passed through (``ProxyCall`` / ``ProxyResult``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.admission import Admission, Ticket, usage_from
from gateway.backends.base import (
    Generation,
    GenerationParams,
    GenerationRequest,
    ProxyBackend,
    ProxyCall,
)
from gateway.backends.registry import BackendRegistry, Target
from gateway.cache import CachedResponse
from gateway.config import RagConfig, Settings
from gateway.errors import InvalidRequest, PermissionDenied, UnsupportedParameter
from gateway.http import until_disconnect
from gateway.prompting import PromptStage, Shaped
from gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from gateway.responses import (
    Prepared,
    chat_response,
    chat_sse,
    completion_response,
    completion_sse,
    new_id,
)
from gateway.retrieval import RagService, Retrieved
from gateway.safety import OutputGuard, SafetyStage
from gateway.sse import guarded

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"
_FINISH = re.compile(rb'"finish_reason": ?"')
_ID = re.compile(rb'"id": ?"([^"]{1,200})"')


def _ragline_info(shaped: Shaped | None) -> dict[str, Any] | None:
    """The response's ``ragline`` object: the prompt, and citations for the context it kept."""
    if shaped is None:
        return None
    info: dict[str, Any] = {"prompt": shaped.info}
    retrieved = shaped.retrieved
    if retrieved is not None:
        kept = min(len(retrieved.citations), int(shaped.info.get("context", 0)))
        info["citations"] = retrieved.citations[:kept]
        info["retrieval"] = {**retrieved.info, "hits": len(retrieved.citations), "used": kept}
    return info


def _params(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> GenerationParams:
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids (integers as strings); got {key!r}",
                param="logit_bias",
            ) from None
    if isinstance(req, ChatCompletionRequest):
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=tuple(bias),
        logprobs=logprobs,
        top_logprobs=top,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        registry: BackendRegistry,
        admission: Admission,
        prompts: PromptStage,
        rag: RagService,
        safety: SafetyStage,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.admission = admission
        self.prompts = prompts
        self.rag = rag
        self.safety = safety

    # -- entry points (one per route) ----------------------------------------------------------

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        return await self._handle(request, "/v1/chat/completions", body)

    async def completion(self, request: Request, body: CompletionRequest) -> Response:
        return await self._handle(request, "/v1/completions", body)

    async def _handle(
        self, request: Request, route: str, body: ChatCompletionRequest | CompletionRequest
    ) -> Response:
        target = self._resolve(body.model, body.n)
        screened = await self.safety.screen_input(request, body, target)  # stage 4
        shaped = await self._render(request, body, target)
        if isinstance(body, ChatCompletionRequest) and not target.proxied:
            self._check_supported_chat(body)
        wire = body.model_dump(exclude_unset=True, exclude={"ragline"})
        adapter = target.adapter.name if target.adapter else None
        variant = {"safety": screened.policy} if screened is not None else None
        ticket, hit = await self.admission.open(request, route, wire, target.base, adapter, variant)
        if shaped is not None:
            self._follow(request, ticket, shaped)
        if wire.get("max_tokens") is not None and body.max_tokens is None:
            body.max_tokens = wire["max_tokens"]  # the key's max_tokens became the default
        request.state.log_fields = ticket.log_fields()
        if hit is not None:
            await ticket.finish((hit.prompt_tokens, hit.completion_tokens))
            if hit.kind == "sse":
                return _sse(_once(hit.body), ticket.headers)
            return Response(hit.body, media_type=JSON, headers=ticket.headers)
        try:
            info = _ragline_info(shaped)
            guard = None
            if screened is not None:
                info = {**(info or {}), "safety": screened.info()}
                guard = screened.output
            if target.proxied:
                return await self._proxy(request, target, route, wire, body, ticket, info, guard)
            return await self._generate(request, target, body, ticket, info, guard)
        except BaseException as exc:
            await ticket.fail(exc)
            raise

    # -- stages --------------------------------------------------------------------------------

    async def _render(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, target: Target
    ) -> Shaped | None:
        """Stage 6: a templated chat request's messages and sampling settings are replaced."""
        if not isinstance(body, ChatCompletionRequest):
            templated = target.route is not None and (
                target.route.template or target.route.experiment
            )
            if templated or (body.ragline is not None and body.ragline.template):
                raise InvalidRequest(
                    "prompt templates apply to chat completions; use /v1/chat/completions.",
                    param="model" if templated else "ragline.template",
                )
            return None
        retrieved = await self._retrieve(request, body, target)
        context = retrieved.context if retrieved is not None else None
        shaped = await self.prompts.shape(request, body, target, context)
        if shaped is None:
            return None
        shaped.retrieved = retrieved
        body.messages = [ChatMessage.model_validate(m) for m in shaped.messages]
        for name, value in shaped.overrides.items():
            if name == "max_tokens" and body.max_completion_tokens is not None:
                body.max_completion_tokens = value
            else:
                setattr(body, name, value)
        return shaped

    async def _retrieve(
        self, request: Request, body: ChatCompletionRequest, target: Target
    ) -> Retrieved | None:
        """Stage 5: search the route's (or the request's) vector store for the last message."""
        config = target.route.rag if target.route is not None else None
        opts = body.ragline.rag if body.ragline is not None else None
        if (config is None and opts is None) or (opts is not None and not opts.enabled):
            return None
        principal = Admission.authorize(request, body.model)
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
        messages = body.messages
        if not messages or messages[-1].role != "user" or not messages[-1].text().strip():
            raise InvalidRequest(
                "retrieval searches the last message, which must be a non-empty user message",
                param="messages",
            )
        policy = self.safety.policy_for(principal, target)
        screen = None
        if policy is not None:

            def screen(text: str) -> str | None:
                return self.safety.screen_chunk(policy, text, principal)

        return await self.rag.retrieve(principal, config, messages[-1].text(), screen)

    def _follow(self, request: Request, ticket: Ticket, shaped: Shaped) -> None:
        """Count the templated request per variant and remember it for feedback."""
        request_id = getattr(request.state, "request_id", "")

        async def settled(status: int, usage: tuple[int, int]) -> None:
            ids = [request_id, ticket.response_id or ""]
            await self.prompts.finished(shaped, ticket.principal, ids, status, usage)

        ticket.hooks.append(settled)

    def _resolve(self, model: str, n: int | None) -> Target:
        target = self.registry.resolve(model)
        if (n or 1) > self.settings.max_n:
            raise InvalidRequest(
                f"n={n} is larger than this server allows ({self.settings.max_n}).", param="n"
            )
        return target

    async def _generate(
        self,
        request: Request,
        target: Target,
        body: ChatCompletionRequest | CompletionRequest,
        ticket: Ticket,
        info: dict[str, Any] | None = None,
        guard: OutputGuard | None = None,
    ) -> Response:
        """The embedded engine (any ``GenerationRequest`` backend)."""
        backend = target.backend
        chat = isinstance(body, ChatCompletionRequest)
        prepared = (
            [self.prepare_chat(body)]
            if isinstance(body, ChatCompletionRequest)
            else (self.prepare_completion(body))
        )
        prepared[0].ragline = info
        ticket.response_id = prepared[0].id
        if target.adapter is not None:
            for p in prepared:
                p.generation = replace(p.generation, adapter=target.adapter.name)
        if body.stream:
            events = ticket.observe(backend.stream(prepared[0].generation))
            first = await until_disconnect(request, anext(events))
            sse = (
                chat_sse(prepared[0], first, events)
                if chat
                else completion_sse(prepared[0], first, events, bool(getattr(body, "echo", False)))
            )
            if guard is not None:
                sse = guard.sse(sse)
            return _sse(ticket.tap_stream(sse, request), ticket.headers)
        generations: list[Generation] = await until_disconnect(
            request, asyncio.gather(*(backend.generate(p.generation) for p in prepared))
        )
        wire_response: BaseModel = (
            chat_response(prepared[0], generations[0])
            if isinstance(body, ChatCompletionRequest)
            else completion_response(prepared, generations, bool(body.echo))
        )
        payload = wire_response.model_dump_json(exclude=set() if info else {"ragline"}).encode()
        if guard is not None:
            payload = guard.json(payload)
        usage = (
            sum(g.usage.prompt_tokens for g in generations),
            sum(g.usage.completion_tokens for g in generations),
        )
        await ticket.finish(usage, store=CachedResponse("json", payload, *usage))
        request.state.log_fields = ticket.log_fields()
        return Response(payload, media_type=JSON, headers=ticket.headers)

    async def _proxy(
        self,
        request: Request,
        target: Target,
        endpoint: str,
        wire: dict[str, Any],
        body: ChatCompletionRequest | CompletionRequest,
        ticket: Ticket,
        info: dict[str, Any] | None = None,
        guard: OutputGuard | None = None,
    ) -> Response:
        backend = cast(ProxyBackend, target.backend)
        call = ProxyCall(
            endpoint=endpoint,
            body=wire,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            public_model=body.model,
            adapter=target.adapter,
            request_id=getattr(request.state, "request_id", None),
        )
        result = await until_disconnect(request, backend.proxy(call))
        if result.events is not None:
            events = result.events
            if guard is not None:
                events = guard.sse(events)
            if info is not None:
                events = _annotate_sse(events, info, body.n or 1, ticket)
            return _sse(ticket.tap_stream(events, request, lambda: call.usage), ticket.headers)
        if info is not None and result.status == 200:
            data = json.loads(result.body)
            data["ragline"] = info
            ticket.response_id = data.get("id")
            result.body = json.dumps(data, separators=(",", ":")).encode()
        if guard is not None and result.status == 200:
            result.body = guard.json(result.body)
        usage = usage_from(result.body) if result.status == 200 else (0, 0)
        store = (
            CachedResponse("json", result.body, *usage) if usage and result.status == 200 else None
        )
        await ticket.finish(usage, store=store, status=result.status)
        request.state.log_fields = ticket.log_fields()
        headers = ticket.headers if result.status == 200 else None
        return Response(result.body, status_code=result.status, media_type=JSON, headers=headers)

    @staticmethod
    def _check_supported_chat(req: ChatCompletionRequest) -> None:
        if req.response_format is not None and req.response_format.type != "text":
            raise UnsupportedParameter(
                f"response_format {req.response_format.type!r} is not supported by model "
                f"{req.model!r} on the embedded engine; use 'text', or serve it through vLLM.",
                param="response_format",
            )
        for i, message in enumerate(req.messages):
            if message.name is not None:
                raise UnsupportedParameter(
                    "message names are not supported by this model's chat template.",
                    param=f"messages[{i}].name",
                )

    # -- preparation for GenerationRequest backends --------------------------------------------

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        """Validate a chat request for a ``GenerationRequest`` backend (the embedded engine)."""
        n = req.n or 1
        messages = []
        for message in req.messages:
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": message.text()})
        prepared_id = new_id("chatcmpl")
        return Prepared(
            id=prepared_id,
            model=req.model,
            created=int(time.time()),
            generation=GenerationRequest(
                request_id=prepared_id,
                model=req.model,
                params=_params(req, req.requested_max_tokens()),
                n=n,
                messages=tuple(messages),
            ),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def prepare_completion(self, req: CompletionRequest) -> list[Prepared]:
        """Validate a completion request for a ``GenerationRequest`` backend; one per prompt."""
        n = req.n or 1
        if req.best_of not in (None, 1) and req.best_of != n:
            raise UnsupportedParameter("best_of is not supported; use n.", param="best_of")
        if req.suffix:
            raise UnsupportedParameter("suffix (insertion) is not supported.", param="suffix")
        prompts = req.prompts()
        if not prompts:
            raise InvalidRequest("prompt must not be empty.", param="prompt")
        if req.stream and len(prompts) > 1:
            raise UnsupportedParameter("streaming supports one prompt per request.", param="prompt")
        if req.echo and not all(isinstance(p, str) for p in prompts):
            raise UnsupportedParameter("echo needs text prompts.", param="echo")
        request_id, created = new_id("cmpl"), int(time.time())
        params = _params(req, req.max_tokens)
        out = []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else None
            ids = None if isinstance(prompt, str) else tuple(prompt)
            out.append(
                Prepared(
                    id=request_id,
                    model=req.model,
                    created=created,
                    generation=GenerationRequest(
                        request_id=request_id,
                        model=req.model,
                        params=params,
                        n=n,
                        prompt=text,
                        prompt_ids=ids,
                    ),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                )
            )
        return out


def _sse(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(
        guarded(events), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )


async def _once(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


async def _annotate_sse(
    events: AsyncIterator[bytes], info: dict[str, Any], n: int, ticket: Ticket
) -> AsyncIterator[bytes]:
    """Add ``ragline`` to the upstream's chunk that finishes the last choice."""
    finished = 0
    async for event in events:
        if ticket.response_id is None and (match := _ID.search(event)):
            ticket.response_id = match.group(1).decode()
        if finished < n and _FINISH.search(event) and event.startswith(b"data: {"):
            data = json.loads(event[6:])
            finished += sum(1 for c in data.get("choices", ()) if c.get("finish_reason"))
            if finished >= n:
                data["ragline"] = info
                event = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        yield event
