"""``POST /v1/completions``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gateway.http import parse_body, until_disconnect
from gateway.pipeline import completion_response, completion_sse
from gateway.protocol import Completion, CompletionRequest
from gateway.routes.chat import SSE_HEADERS
from gateway.routes.deps import PipelineDep
from gateway.sse import guarded

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=Completion,
)
async def create_completion(request: Request, pipeline: PipelineDep) -> Response:
    body = await parse_body(request, CompletionRequest)
    prepared = pipeline.prepare_completion(body)
    if body.stream:
        events = pipeline.stream(prepared[0])
        first = await until_disconnect(request, anext(events))
        return StreamingResponse(
            guarded(completion_sse(prepared[0], first, events, bool(body.echo))),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    generations = await until_disconnect(
        request, asyncio.gather(*(pipeline.generate(p) for p in prepared))
    )
    return Response(
        completion_response(prepared, list(generations), bool(body.echo)).model_dump_json(
            exclude={"ragline"}
        ),
        media_type="application/json",
    )
