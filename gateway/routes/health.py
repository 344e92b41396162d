"""``GET /health`` (the process answers) and ``GET /ready`` (every model is loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.routes.deps import RegistryDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(registry: RegistryDep) -> JSONResponse:
    status = registry.status()
    ok = registry.ready
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "models": status},
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )
