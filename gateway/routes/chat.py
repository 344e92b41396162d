"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.http import parse_body
from gateway.protocol import ChatCompletion, ChatCompletionRequest
from gateway.routes.deps import PipelineDep

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(request: Request, pipeline: PipelineDep) -> Response:
    return await pipeline.chat(request, await parse_body(request, ChatCompletionRequest))
