"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gateway.http import parse_body, until_disconnect
from gateway.pipeline import chat_response, chat_sse
from gateway.protocol import ChatCompletion, ChatCompletionRequest
from gateway.routes.deps import PipelineDep
from gateway.sse import guarded

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
)
async def create_chat_completion(request: Request, pipeline: PipelineDep) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    prepared = pipeline.prepare_chat(body)
    if body.stream:
        events = pipeline.stream(prepared)
        first = await until_disconnect(request, anext(events))
        return StreamingResponse(
            guarded(chat_sse(prepared, first, events)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    generation = await until_disconnect(request, pipeline.generate(prepared))
    return Response(
        chat_response(prepared, generation).model_dump_json(exclude={"ragline"}),
        media_type="application/json",
    )
