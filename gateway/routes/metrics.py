"""``GET /metrics``: Prometheus text format, for admins and keys with the ``metrics`` scope (the
labels name every key id)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ANONYMOUS, principal_of
from gateway.errors import PermissionDenied
from gateway.metrics import Metrics
from gateway.routes.deps import RegistryDep

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, registry: RegistryDep) -> Response:
    principal = principal_of(request.state)
    if not (principal.admin or principal.policy.metrics or principal is ANONYMOUS):
        raise PermissionDenied(
            "Reading /metrics needs an admin key or a key with `metrics: true` in its policy.",
            code="metrics_not_allowed",
        )
    await request.app.state.bookkeeping.flush()  # what the last responses left to count
    m: Metrics = request.app.state.metrics
    m.in_flight.set(request.app.state.in_flight)
    m.observe_backends(registry.status())
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
