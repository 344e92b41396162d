"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.backends.base import ModelInfo
from gateway.errors import ModelNotFound
from gateway.protocol import ModelCard, ModelList
from gateway.routes.deps import RegistryDep

router = APIRouter()


def _card(info: ModelInfo) -> ModelCard:
    return ModelCard(
        id=info.id,
        created=info.created,
        owned_by=info.owned_by,
        root=info.root,
        parent=info.parent,
        max_model_len=info.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[_card(m) for m in registry.models()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, registry: RegistryDep) -> ModelCard:
    for info in registry.models():
        if info.id == model_id:
            return _card(info)
    raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
