"""``GET /v1/models`` and ``GET /v1/models/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.auth import principal_of
from gateway.backends.base import ModelInfo
from gateway.backends.registry import BackendRegistry
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


def _visible(request: Request, registry: BackendRegistry) -> list[ModelCard]:
    """What the caller may use; where things live on disk (adapter paths) only for admins."""
    principal = principal_of(request.state)
    cards = []
    for info in registry.models() + request.app.state.embeddings.models():
        if not principal.may_use(info.id):
            continue
        card = _card(info)
        if not principal.admin and info.parent is not None:
            card.root = None  # an adapter's directory on the serving hosts
        cards.append(card)
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    return ModelList(data=_visible(request, registry))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request, registry: RegistryDep) -> ModelCard:
    for card in _visible(request, registry):
        if card.id == model_id:
            return card
    raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
