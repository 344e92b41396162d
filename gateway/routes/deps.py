"""Typed accessors for what the lifespan put on ``app.state``, and the completion routes'
adapter from Starlette to the pipeline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import Response, StreamingResponse

from gateway.auth import principal_of
from gateway.backends.registry import BackendRegistry
from gateway.http import HttpRequest
from gateway.pipeline import Pipeline


async def get_pipeline(request: Request) -> Pipeline:
    # async: FastAPI runs sync dependencies in a thread pool, a costly hop per request
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def get_registry(request: Request) -> BackendRegistry:
    registry: BackendRegistry = request.app.state.registry
    return registry


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
RegistryDep = Annotated[BackendRegistry, Depends(get_registry)]


async def charge_request(request: Request) -> None:
    """One unit of the key's RPM for an API call that is not a completion (uploads, stores,
    searches, feedback): a key's limit covers everything it does. Raises ``RateLimited``."""
    principal = principal_of(request.state)
    limiter = request.app.state.pipeline.admission.limiter
    await limiter.reserve(principal.key_id, principal.policy, 0)


Charged = Depends(charge_request)


async def complete(request: Request, pipeline: Pipeline, endpoint: str, handler: Any) -> Response:
    """A completion route when the front door is not in front (the same pipeline, or
    ``handler(pipeline, http)`` when it is a function: the Responses API)."""
    http = HttpRequest(
        request_id=getattr(request.state, "request_id", ""),
        principal=principal_of(request.state),
        body=await request.body(),
        receive=request.receive,
        no_cache="no-cache" in request.headers.get("cache-control", "").lower(),
    )
    if callable(handler) and not isinstance(handler, type):
        reply = await handler(pipeline, http)
    else:
        reply = await pipeline.handle(endpoint, http)
    request.state.log_fields = reply.log_fields() if reply.log_fields else {}
    if reply.stream is None:
        return Response(reply.body, reply.status, reply.headers, background=_task(reply))
    return StreamingResponse(reply.stream, reply.status, reply.headers, background=_task(reply))


def _task(reply: Any) -> Any:
    from starlette.background import BackgroundTask

    return BackgroundTask(reply.after) if reply.after is not None else None
