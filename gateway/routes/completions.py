"""``POST /v1/completions`` (see ``chat.py``: the front door sends it to the pipeline)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.backends.base import COMPLETIONS
from gateway.openapi import BODIES
from gateway.protocol import Completion, CompletionRequest
from gateway.routes.deps import PipelineDep, complete

router = APIRouter()


@router.post(COMPLETIONS, response_model=Completion, openapi_extra=BODIES.json(CompletionRequest))
async def create_completion(request: Request, pipeline: PipelineDep) -> Response:
    return await complete(request, pipeline, COMPLETIONS, CompletionRequest)
