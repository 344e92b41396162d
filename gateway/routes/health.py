"""``GET /health`` (the process answers) and ``GET /ready`` (every model is loaded and every
route's vector store exists)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.routes.deps import RegistryDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, registry: RegistryDep) -> JSONResponse:
    status = registry.status()
    routes = request.app.state.routes
    problems = await asyncio.to_thread(request.app.state.rag.route_problems, routes)
    ok = registry.ready and not problems
    body: dict[str, object] = {"status": "ready" if ok else "not_ready", "models": status}
    if problems:
        body["routes"] = problems
    return JSONResponse(
        body,
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )
