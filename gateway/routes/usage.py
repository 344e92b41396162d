"""``GET /admin/usage`` (everyone's usage, grouped) and ``GET /v1/usage`` (the calling key's
own), from the usage ledger, as JSON or CSV."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from gateway.auth import principal_of
from gateway.errors import InvalidRequest, NotFound
from gateway.ledger import Ledger
from gateway.ledger_db import GROUPS, as_csv

router = APIRouter()

GroupBy = Annotated[
    str,
    Query(
        max_length=200,
        description=f"Comma-separated, of {', '.join(GROUPS)}; empty: one total.",
    ),
]
Time = Annotated[
    str | None,
    Query(max_length=40, description="ISO 8601 time or date (UTC when no offset), or epoch s."),
]
Format = Annotated[Literal["json", "csv"], Query()]


@router.get("/admin/usage")
async def admin_usage(
    request: Request,
    group_by: GroupBy = "key_id,model",
    start: Time = None,
    end: Time = None,
    format: Format = "json",
    key_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    return await _usage(request, group_by, start, end, format, key_id)


@router.get("/v1/usage")
async def own_usage(
    request: Request,
    group_by: GroupBy = "model,day",
    start: Time = None,
    end: Time = None,
    format: Format = "json",
) -> Response:
    principal = principal_of(request.state)
    return await _usage(request, group_by, start, end, format, principal.key_id)


async def _usage(
    request: Request,
    group_by: str,
    start: str | None,
    end: str | None,
    format: str,
    key_id: str | None,
) -> Response:
    ledger: Ledger | None = request.app.state.ledger
    if ledger is None:
        raise NotFound("The usage ledger is off on this gateway (RAGLINE_USAGE_LEDGER=false).")
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or len(set(groups)) != len(groups):
        raise InvalidRequest(
            f"group_by takes distinct names among {', '.join(GROUPS)}; got {group_by!r}.",
            param="group_by",
        )
    since, until = _time(start, "start"), _time(end, "end")
    await request.app.state.bookkeeping.flush()  # the responses just sent are settled first
    rows = await ledger.summarize(group_by=groups, start=since, end=until, key_id=key_id)
    if format == "csv":
        return PlainTextResponse(as_csv(rows), media_type="text/csv")
    body: dict[str, Any] = {"object": "list", "group_by": groups, "data": rows}
    body["start"], body["end"] = since, until
    return JSONResponse(body)


def _time(value: str | None, param: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{param} must be an ISO 8601 time or date, or epoch seconds; got {value!r}.",
            param=param,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
