"""``POST /v1/responses`` (``gateway.responses_api``).

The front door sends this path straight to the pipeline; the route is here for the OpenAPI
schema and for mounting the FastAPI app without the front door.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway import responses_api
from gateway.openapi import BODIES
from gateway.responses_api import RESPONSES, ResponsesRequest
from gateway.routes.deps import PipelineDep, complete

router = APIRouter()


@router.post(RESPONSES, openapi_extra=BODIES.json(ResponsesRequest))
async def create_response(request: Request, pipeline: PipelineDep) -> Response:
    return await complete(request, pipeline, RESPONSES, responses_api.handle)
