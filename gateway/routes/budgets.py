"""``/admin/budgets``: read and set token and cost budgets per key and team (admins only; the
front door lets only admin keys into ``/admin``). A budget set here overrides the config file's
until deleted, on every gateway process sharing Redis."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request

from gateway.auth import principal_of
from gateway.budgets import Budget, Budgets
from gateway.errors import NotFound
from gateway.http import parse_body
from gateway.logs import audit_event
from gateway.openapi import BODIES

router = APIRouter(prefix="/admin/budgets")
ScopeParam = Annotated[Literal["key", "team"], Path(description="`key` or `team`.")]
Owner = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Key id or team.")]


def _budgets(request: Request) -> Budgets:
    budgets: Budgets = request.app.state.budgets
    return budgets


@router.get("")
async def list_budgets(request: Request) -> dict[str, Any]:
    budgets = _budgets(request)
    out = [await budgets.status(scope, owner) for scope, owner in await budgets.owners()]
    return {"object": "list", "data": [b for b in out if b is not None]}


@router.get("/{scope}/{owner}")
async def get_budget(request: Request, scope: ScopeParam, owner: Owner) -> dict[str, Any]:
    found = await _budgets(request).status(scope, owner)
    if found is None:
        raise NotFound(f"No budget for {scope} '{owner}'.", param="owner")
    return found


@router.put("/{scope}/{owner}", openapi_extra=BODIES.json(Budget))
async def set_budget(request: Request, scope: ScopeParam, owner: Owner) -> dict[str, Any]:
    budget = await parse_body(request, Budget)
    await _budgets(request).set(scope, owner, budget)
    audit_event("budget.set", by=principal_of(request.state).key_id, scope=scope, id=owner)
    status = await _budgets(request).status(scope, owner)
    assert status is not None
    return status


@router.delete("/{scope}/{owner}")
async def delete_budget(request: Request, scope: ScopeParam, owner: Owner) -> dict[str, Any]:
    if not await _budgets(request).delete(scope, owner):
        raise NotFound(f"No budget set at run time for {scope} '{owner}'.", param="owner")
    audit_event("budget.deleted", by=principal_of(request.state).key_id, scope=scope, id=owner)
    return {"scope": scope, "id": owner, "deleted": True}
