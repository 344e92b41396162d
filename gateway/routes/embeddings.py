"""``POST /v1/embeddings`` (``gateway.embeddings``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.background import BackgroundTask
from starlette.responses import Response

from gateway.auth import principal_of
from gateway.embeddings import EmbeddingService, EmbeddingsRequest, EmbeddingsResponse
from gateway.openapi import BODIES

router = APIRouter()


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    openapi_extra=BODIES.json(EmbeddingsRequest),
)
async def create_embeddings(request: Request) -> Response:
    service: EmbeddingService = request.app.state.embeddings
    no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
    reply = await service.create(principal_of(request.state), await request.body(), no_cache)
    request.state.log_fields = reply.log_fields
    return Response(
        reply.body,
        200,
        reply.headers,
        media_type="application/json",
        background=BackgroundTask(reply.after),
    )
