"""``create_app``: the gateway (its front door around the FastAPI app), the lifespan that builds
every long-lived service, and the one error renderer of the FastAPI routes."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import tracing
from gateway.admission import Admission
from gateway.auth import KeyStore
from gateway.backends.registry import BackendRegistry
from gateway.cache import MemoryResponseCache, RedisResponseCache, ResponseCache
from gateway.config import FileConfig, Settings
from gateway.config_file import load_file_config
from gateway.embeddings import EmbeddingService
from gateway.errors import (
    InvalidRequest,
    RaglineError,
    as_ragline_error,
    error_body,
    library_errors,
)
from gateway.frontdoor import FrontDoor
from gateway.http import ClientDisconnected, param_path
from gateway.metrics import Metrics
from gateway.openapi import BODIES
from gateway.pipeline import Pipeline
from gateway.prompting import PromptStage
from gateway.quotas import Quotas
from gateway.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from gateway.resp import RespConnection
from gateway.retrieval import RagService
from gateway.routes import (
    admin,
    budgets,
    chat,
    completions,
    console,
    docs,
    embeddings,
    feedback,
    health,
    models,
    responses,
    usage,
    vector_stores,
)
from gateway.routes import metrics as metrics_route
from gateway.safety import SafetyStage
from gateway.workers import WorkerPool

log = logging.getLogger("ragline")


def create_app(settings: Settings | None = None, config: FileConfig | None = None) -> FrontDoor:
    """Build the gateway; models load in the background once it starts (see ``/ready``)."""
    settings = settings or Settings()
    config = config or load_file_config(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not tracing.enabled():
            tracing.configure_from_environment()  # OTEL_* variables; off by default
        redis = _redis_client(settings)
        registry = BackendRegistry.from_config(settings, config, redis)
        metrics = Metrics()
        app.state.settings = settings
        app.state.registry = registry
        app.state.metrics = metrics
        app.state.keys = KeyStore(config.keys, settings.admin_key, redis)
        limiter: RateLimiter
        cache: ResponseCache
        if redis is None:
            limiter = MemoryRateLimiter()
            cache = MemoryResponseCache(
                settings.cache_ttl, settings.cache_max_entry_bytes, settings.cache_max_entries
            )
        else:
            limiter = RedisRateLimiter(
                redis,
                fail_open=settings.redis_failure == "open",
                connection=RespConnection.from_url(settings.redis_url or ""),
            )
            cache = RedisResponseCache(redis, settings.cache_ttl, settings.cache_max_entry_bytes)
        admission = Admission(settings, limiter, cache, metrics)
        ledger = None
        if settings.usage_ledger:
            from gateway.ledger import Ledger

            ledger = Ledger(
                settings.ledger_url(),
                settings.usage_spool_dir,
                config.prices,
                settings.usage_buffer,
                settings.usage_flush_seconds,
                settings.usage_retention_days,
            )
            await ledger.start()
        admission.ledger = app.state.ledger = ledger
        from gateway.budgets import Budgets

        key_budgets = {k.id: k.policy.budget for k in config.keys if k.policy.budget is not None}
        team_budgets = {t: c.budget for t, c in config.teams.items() if c.budget is not None}
        admission.budgets = app.state.budgets = Budgets(
            key_budgets, team_budgets, redis, config.prices, metrics
        )
        embedder = settings.embedder()  # one model for few-shot selection and retrieval
        prompts = PromptStage(config, metrics, redis, embedder)
        workers = WorkerPool(settings.parse_workers, settings.parse_timeout)
        app.state.rag = RagService(settings, embedder, metrics, workers)
        app.state.routes = config.routes
        for route, problem in app.state.rag.route_problems(config.routes).items():
            log.warning("route %s is not ready: %s", route, problem)
        app.state.quotas = Quotas(settings, redis)
        safety = SafetyStage(config, embedder, metrics, prompts.chat_format)
        await asyncio.to_thread(safety.warm)  # policies' models load before serving
        await prompts.warm()  # and the tokenizers templates fit budgets with
        await workers.warm()
        app.state.embeddings = EmbeddingService(settings, embedder, admission)
        app.state.pipeline = Pipeline(
            settings, registry, admission, prompts, app.state.rag, safety, metrics
        )
        watcher = asyncio.create_task(prompts.catalog.watch()) if prompts.watch else None
        if app.state.keys.open:
            log.warning(
                "no API keys are configured: requests need no key; this is allowed on "
                "a loopback address only (set keys or RAGLINE_ADMIN_KEY to require them)"
            )
        log.info(
            "state: %s",
            "Redis (shared by all gateway processes)"
            if redis is not None
            else "in-process (single process only: limits, cache and run-time keys)",
        )
        registry.start_in_background()
        # what start-up built lives as long as the process: out of the collector's way, so
        # that its collections walk what requests make, not the libraries and models
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await app.state.bookkeeping.flush()
            if ledger is not None:
                await ledger.aclose()  # what is pending: to the database, else the spool
            await limiter.aclose()  # settlements still queued
            await registry.aclose()
            await asyncio.to_thread(workers.close)
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="ragline",
        summary="OpenAI-compatible LLM serving and RAG gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # gateway/routes/docs.py serves /docs with local assets
        redoc_url=None,
    )
    routers = (
        chat.router,
        completions.router,
        embeddings.router,
        responses.router,
        feedback.router,
        vector_stores.router,
        models.router,
        health.router,
        admin.router,
        metrics_route.router,
        usage.router,
        budgets.router,
    )
    for router in routers:
        app.include_router(router)
    docs.install(app)
    console.install(app)
    _install_error_handlers(app)
    BODIES.install(app)
    app.state.in_flight = 0
    return FrontDoor(app, settings)


def app_from_environment() -> FrontDoor:
    """One worker of ``ragline serve --workers N``: settings from the environment."""
    from gateway.logs import configure

    settings = Settings()
    configure(settings.log_level, settings.log_format)
    return create_app(settings)


def _redis_client(settings: Settings) -> Any:
    if not settings.redis_url:
        return None
    import redis.asyncio as aioredis

    # Short timeouts: when Redis goes away, requests fail (or pass) fast instead of hanging.
    return aioredis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)


def _json_error(
    request: Request,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Response:
    error = body["error"]
    request.state.error_code = error.get("code") or error.get("type")  # metrics, access log
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RaglineError)
    async def ragline_error(request: Request, exc: RaglineError) -> Response:
        if exc.status_code >= 500:
            log.warning("request failed: %s (%s)", exc.message, type(exc).__name__)
        return _json_error(request, exc.status_code, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> Response:
        # Bodies are parsed by ``parse_body``; this covers path and query parameters.
        err = exc.errors()[0] if exc.errors() else {}
        loc = tuple(p for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        param = param_path(loc)
        invalid = InvalidRequest(f"Invalid value for '{param}': {err.get('msg')}", param=param)
        return _json_error(request, 400, invalid.body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        message = "Unknown request URL." if exc.status_code == 404 else str(exc.detail)
        body = error_body(message, kinds.get(exc.status_code, "invalid_request_error"))
        return _json_error(request, exc.status_code, body, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)

    async def library_error(request: Request, exc: Exception) -> Response:
        mapped = as_ragline_error(exc)  # a vector store's, a loader's or a template's error
        assert mapped is not None
        return await ragline_error(request, mapped)

    for kind in library_errors():
        app.add_exception_handler(kind, library_error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return _json_error(
            request,
            500,
            error_body("The server had an error processing your request.", "server_error"),
        )
