"""``POST /v1/feedback``: an outcome score for a templated request (by response or request id)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import principal_of
from gateway.http import parse_body
from gateway.openapi import BODIES
from gateway.routes.deps import Charged, PipelineDep

router = APIRouter(dependencies=[Charged])  # every call counts against the key's RPM


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(
        min_length=1, max_length=200, description="The response `id` or the X-Request-ID."
    )
    score: float = Field(ge=-1e6, le=1e6, description="Your scale: thumbs 0/1, stars 1-5, ...")


@router.post("/v1/feedback", openapi_extra=BODIES.json(Feedback))
async def create_feedback(request: Request, pipeline: PipelineDep) -> dict[str, Any]:
    body = await parse_body(request, Feedback)
    principal = principal_of(request.state)
    return await pipeline.prompts.feedback(principal, body.request_id, body.score)
