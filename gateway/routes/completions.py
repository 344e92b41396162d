"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.http import parse_body
from gateway.protocol import Completion, CompletionRequest
from gateway.routes.deps import PipelineDep

router = APIRouter()


@router.post("/v1/completions", response_model=Completion)
async def create_completion(request: Request, pipeline: PipelineDep) -> Response:
    return await pipeline.completion(request, await parse_body(request, CompletionRequest))
