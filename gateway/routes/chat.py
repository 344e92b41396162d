"""``POST /v1/chat/completions``.

The front door sends this path straight to the pipeline; the route is here for the OpenAPI
schema and for mounting the FastAPI app without the front door.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.backends.base import CHAT
from gateway.openapi import BODIES
from gateway.protocol import ChatCompletion, ChatCompletionRequest
from gateway.routes.deps import PipelineDep, complete

router = APIRouter()


@router.post(CHAT, response_model=ChatCompletion, openapi_extra=BODIES.json(ChatCompletionRequest))
async def create_chat_completion(request: Request, pipeline: PipelineDep) -> Response:
    return await complete(request, pipeline, CHAT, ChatCompletionRequest)
