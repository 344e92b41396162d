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
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.backends.base import (
    Generation,
    GenerationParams,
    GenerationRequest,
    ProxyBackend,
    ProxyCall,
)
from gateway.backends.registry import BackendRegistry, Target
from gateway.config import Settings
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.http import until_disconnect
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.responses import (
    Prepared,
    chat_response,
    chat_sse,
    completion_response,
    completion_sse,
    new_id,
)
from gateway.sse import guarded

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"


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
    def __init__(self, settings: Settings, registry: BackendRegistry) -> None:
        self.settings = settings
        self.registry = registry

    # -- entry points (one per route) ----------------------------------------------------------

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        target = self._admit(body.model, body.n)
        if isinstance(target.backend, ProxyBackend):
            return await self._proxy(request, target, "/v1/chat/completions", body)
        self._check_supported_chat(body)
        prepared = self.prepare_chat(body)
        if body.stream:
            events = target.backend.stream(prepared.generation)
            first = await until_disconnect(request, anext(events))
            return _sse(chat_sse(prepared, first, events))
        generation = await until_disconnect(request, target.backend.generate(prepared.generation))
        return Response(
            chat_response(prepared, generation).model_dump_json(exclude={"ragline"}),
            media_type=JSON,
        )

    async def completion(self, request: Request, body: CompletionRequest) -> Response:
        target = self._admit(body.model, body.n)
        if isinstance(target.backend, ProxyBackend):
            return await self._proxy(request, target, "/v1/completions", body)
        prepared = self.prepare_completion(body)
        echo = bool(body.echo)
        if body.stream:
            events = target.backend.stream(prepared[0].generation)
            first = await until_disconnect(request, anext(events))
            return _sse(completion_sse(prepared[0], first, events, echo))
        backend = target.backend
        generations: list[Generation] = await until_disconnect(
            request, asyncio.gather(*(backend.generate(p.generation) for p in prepared))
        )
        return Response(
            completion_response(prepared, generations, echo).model_dump_json(exclude={"ragline"}),
            media_type=JSON,
        )

    # -- stages --------------------------------------------------------------------------------

    def _admit(self, model: str, n: int | None) -> Target:
        target = self.registry.resolve(model)
        if (n or 1) > self.settings.max_n:
            raise InvalidRequest(
                f"n={n} is larger than this server allows ({self.settings.max_n}).", param="n"
            )
        return target

    async def _proxy(
        self,
        request: Request,
        target: Target,
        endpoint: str,
        body: ChatCompletionRequest | CompletionRequest,
    ) -> Response:
        assert isinstance(target.backend, ProxyBackend)
        call = ProxyCall(
            endpoint=endpoint,
            body=body.model_dump(exclude_unset=True, exclude={"ragline"}),
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            public_model=body.model,
            adapter=target.adapter,
            request_id=getattr(request.state, "request_id", None),
        )
        result = await until_disconnect(request, target.backend.proxy(call))
        if result.events is not None:
            return _sse(result.events)
        return Response(result.body, status_code=result.status, media_type=JSON)

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


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(guarded(events), media_type="text/event-stream", headers=SSE_HEADERS)
