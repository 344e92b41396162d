"""``GET /docs``: the API reference (Swagger UI 5, which reads OpenAPI 3.1) in a browser, with
its assets served from the installed ``fastapi-offline`` package (no CDN at run time). The page,
its assets and ``/openapi.json`` need no key: a browser sends none; the page's Authorize button
takes one for the calls made from it."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
STATIC = Path(fastapi_offline.__file__).resolve().parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="ragline API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon.png",
    )


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="docs-assets")


def is_public(path: str) -> bool:
    """The documentation's paths, served without a key."""
    return path in ("/docs", "/openapi.json") or path.startswith(ASSETS + "/")
