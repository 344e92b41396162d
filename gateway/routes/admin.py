"""``/admin/*``: operator actions. The auth middleware lets only admin keys in (or loopback
clients when the gateway runs without keys). Every action is written to the audit log."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import KeyStore, principal_of
from gateway.backends.registry import BackendRegistry
from gateway.backends.vllm import VllmBackend
from gateway.config import AdapterConfig, KeyPolicy
from gateway.errors import InvalidRequest, NotFound
from gateway.http import parse_body
from gateway.logs import audit_event
from gateway.openapi import BODIES
from gateway.routes.deps import PipelineDep, RegistryDep
from prompts.template import PromptError

router = APIRouter(prefix="/admin")


class RunTimeKeyPolicy(KeyPolicy):
    """A run-time key starts with least privilege: no model and no store until the admin
    names them (config keys keep ``*``: whoever writes the file decides in the open)."""

    models: list[str] = Field(default_factory=list)
    vector_stores: list[str] = Field(default_factory=list)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200)
    admin: bool = False
    policy: RunTimeKeyPolicy = Field(default_factory=RunTimeKeyPolicy)


def _keys(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


@router.post("/keys", status_code=201, openapi_extra=BODIES.json(NewKey))
async def create_key(request: Request) -> dict[str, object]:
    """Create a run-time key; the plain key is in this response and nowhere else."""
    spec = await parse_body(request, NewKey)
    known = request.app.state.pipeline.safety.specs
    if spec.policy.safety_policy not in {*known, "off"}:
        raise InvalidRequest(
            f"Unknown safety policy {spec.policy.safety_policy!r}; configured: "
            f"{', '.join(sorted({*known, 'off'}))}.",
            param="policy.safety_policy",
        )
    key, record = await _keys(request).create(spec.name, spec.policy, spec.admin)
    audit_event(
        "key.created", by=principal_of(request.state).key_id, key_id=record["id"], admin=spec.admin
    )
    record = {k: v for k, v in record.items() if k != "sha256"}
    return {**record, "key": key}


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, object]:
    return {"object": "list", "data": await _keys(request).list()}


class KeyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    policy: RunTimeKeyPolicy


@router.patch("/keys/{key_id}", openapi_extra=BODIES.json(KeyChange))
async def update_key(key_id: str, request: Request) -> dict[str, object]:
    """Replace a run-time key's policy (models, limits, team, budget, ...); at once."""
    change = await parse_body(request, KeyChange)
    known = request.app.state.pipeline.safety.specs
    if change.policy.safety_policy not in {*known, "off"}:
        raise InvalidRequest(
            f"Unknown safety policy {change.policy.safety_policy!r}.", param="policy.safety_policy"
        )
    record = await _keys(request).update(key_id, change.policy, change.name)
    if record is None:
        raise NotFound(f"No run-time key with id '{key_id}'.", param="key_id")
    audit_event("key.updated", by=principal_of(request.state).key_id, key_id=key_id)
    return record


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict[str, object]:
    if not await _keys(request).revoke(key_id):
        raise NotFound(f"No run-time key with id '{key_id}'.", param="key_id")
    audit_event("key.revoked", by=principal_of(request.state).key_id, key_id=key_id)
    return {"id": key_id, "deleted": True}


@router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict[str, object]:
    out = []
    for info in registry.models():
        if info.parent is None:
            continue
        backend, _ = registry.adapter(info.id)
        placements = getattr(backend, "placements", None)
        # an embedded model loads its adapters with the weights, in this process
        loaded = sorted(await placements.replicas_with(info.id)) if placements else ["in-process"]
        out.append({"name": info.id, "base": info.parent, "path": info.root, "loaded_on": loaded})
    return {"object": "list", "data": out}


def _pool_adapter(registry: BackendRegistry, name: str) -> tuple[VllmBackend, AdapterConfig]:
    backend, adapter = registry.adapter(name)
    if not isinstance(backend, VllmBackend):
        raise InvalidRequest(f"Adapter '{name}' is not served by a vLLM pool.", param="adapter")
    return backend, adapter


@router.post("/adapters/{name}/load")
async def load_adapter(name: str, request: Request, registry: RegistryDep) -> dict[str, object]:
    """Load the adapter on every healthy replica of its base model."""
    backend, adapter = _pool_adapter(registry, name)
    replicas = backend.pool.available()
    await asyncio.gather(*(backend.load_adapter(adapter, r) for r in replicas))
    audit_event("adapter.loaded", by=principal_of(request.state).key_id, adapter=name)
    return {"name": name, "loaded_on": sorted(r.url for r in replicas)}


@router.post("/adapters/{name}/unload")
async def unload_adapter(name: str, request: Request, registry: RegistryDep) -> dict[str, object]:
    """Unload the adapter from every replica that answers."""
    backend, adapter = _pool_adapter(registry, name)
    replicas = backend.pool.available()
    await asyncio.gather(*(backend.unload_adapter(adapter, r) for r in replicas))
    audit_event("adapter.unloaded", by=principal_of(request.state).key_id, adapter=name)
    return {"name": name, "unloaded_from": sorted(r.url for r in replicas)}


@router.get("/prompts")
async def list_prompts(pipeline: PipelineDep) -> dict[str, object]:
    catalog = pipeline.prompts.catalog
    return {
        "object": "list",
        "directory": str(catalog.directory) if catalog.directory else None,
        "generation": catalog.generation,
        "data": catalog.current.describe(),
    }


@router.post("/prompts/reload")
async def reload_prompts(request: Request, pipeline: PipelineDep) -> dict[str, object]:
    """Load the template directory again; on any error the current templates keep serving."""
    catalog = pipeline.prompts.catalog
    try:
        registry = await asyncio.to_thread(catalog.reload)
    except PromptError as exc:
        raise InvalidRequest(exc.message, code="invalid_prompt_templates") from None
    audit_event("prompts.reloaded", by=principal_of(request.state).key_id, versions=len(registry))
    return {"object": "list", "generation": catalog.generation, "data": registry.describe()}
