"""``/admin/*``: operator actions. Guarded by ``RAGLINE_ADMIN_KEY`` (Bearer); without one, only
loopback clients may call them."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.backends.vllm import VllmBackend
from gateway.config import Settings
from gateway.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from gateway.routes.deps import RegistryDep

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def require_admin(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.admin_key is None:
        host = request.client.host if request.client else ""
        if host not in _LOOPBACK:
            raise PermissionDenied("Admin routes need RAGLINE_ADMIN_KEY when called remotely.")
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), settings.admin_key.encode()):
        raise AuthenticationFailed("A valid admin key is required for /admin routes.")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
AdapterName = Annotated[str, "adapter name"]


@router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict[str, object]:
    out = []
    for info in registry.models():
        if info.parent is None:
            continue
        backend, _ = registry.adapter(info.id)
        placements = getattr(backend, "placements", None)
        loaded = sorted(await placements.replicas_with(info.id)) if placements else []
        out.append({"name": info.id, "base": info.parent, "path": info.root, "loaded_on": loaded})
    return {"object": "list", "data": out}


@router.post("/adapters/{name}/load")
async def load_adapter(name: AdapterName, registry: RegistryDep) -> dict[str, object]:
    """Load the adapter on every healthy replica of its base model."""
    backend, adapter = registry.adapter(name)
    if not isinstance(backend, VllmBackend):
        raise InvalidRequest(f"Adapter '{name}' is not served by a vLLM pool.", param="adapter")
    replicas = backend.pool.available()
    await asyncio.gather(*(backend.load_adapter(adapter, r) for r in replicas))
    return {"name": name, "loaded_on": sorted(r.url for r in replicas)}


@router.post("/adapters/{name}/unload")
async def unload_adapter(name: AdapterName, registry: RegistryDep) -> dict[str, object]:
    """Unload the adapter from every replica that answers."""
    backend, adapter = registry.adapter(name)
    if not isinstance(backend, VllmBackend):
        raise InvalidRequest(f"Adapter '{name}' is not served by a vLLM pool.", param="adapter")
    replicas = backend.pool.available()
    await asyncio.gather(*(backend.unload_adapter(adapter, r) for r in replicas))
    return {"name": name, "unloaded_from": sorted(r.url for r in replicas)}
