"""Which backend serves which public model name; built once in the app's lifespan.

``BACKENDS`` is the one table from a model entry's ``backend:`` to the code that builds it:
adding a backend is one module, one config type (``config.py``) and one entry here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.backends.base import Backend, ModelInfo
from gateway.config import (
    AdapterConfig,
    EmbeddedModelConfig,
    FileConfig,
    HttpModelConfig,
    ModelConfig,
    OpenAIModelConfig,
    RouteConfig,
    Settings,
    VllmModelConfig,
)
from gateway.errors import ModelNotFound, Overloaded

log = logging.getLogger("ragline.backends")


@dataclass(frozen=True)
class BuildContext:
    settings: Settings
    config: FileConfig
    redis: Any | None


def _embedded(model: ModelConfig, ctx: BuildContext) -> Backend:
    from gateway.backends.embedded import EmbeddedBackend

    assert isinstance(model, EmbeddedModelConfig)
    path = model.path.expanduser() if model.path else ctx.settings.default_model_path()
    adapters = [a for a in ctx.config.adapters if a.base == model.name]
    return EmbeddedBackend(model, path, adapters)


def _api_key(model: HttpModelConfig) -> str | None:
    if model.api_key_env is None:
        return model.api_key
    key = os.environ.get(model.api_key_env)
    if not key:
        raise ValueError(f"model {model.name!r}: environment variable {model.api_key_env} is unset")
    return key


def _openai(model: ModelConfig, ctx: BuildContext) -> Backend:
    from gateway.backends.openai import OpenAIBackend

    assert isinstance(model, OpenAIModelConfig)
    return OpenAIBackend(model, _api_key(model))


def _vllm(model: ModelConfig, ctx: BuildContext) -> Backend:
    from gateway.backends.lora import MemoryPlacements, Placements, RedisPlacements
    from gateway.backends.vllm import VllmBackend

    assert isinstance(model, VllmModelConfig)
    placements: Placements = (
        RedisPlacements(ctx.redis, model.name) if ctx.redis is not None else MemoryPlacements()
    )
    adapters = [a for a in ctx.config.adapters if a.base == model.name]
    return VllmBackend(model, adapters, placements, _api_key(model))


BACKENDS: dict[str, Callable[[ModelConfig, BuildContext], Backend]] = {
    "embedded": _embedded,
    "openai": _openai,
    "vllm": _vllm,
}


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolves to: the backends to try, in order (the model's own,
    then its fallbacks), the adapter and the route."""

    backends: tuple[Backend, ...]
    base: str  # the model entry's name
    adapter: AdapterConfig | None = None
    route: RouteConfig | None = None

    @property
    def backend(self) -> Backend:
        return self.backends[0]


class BackendRegistry:
    def __init__(
        self,
        backends: dict[str, Backend],
        adapters: dict[str, AdapterConfig] | None = None,
        routes: dict[str, RouteConfig] | None = None,
        fallbacks: dict[str, list[str]] | None = None,
    ) -> None:
        self._backends = backends
        self._adapters = adapters or {}
        self._routes = routes or {}
        self._fallbacks = fallbacks or {}
        self._created = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(
        cls, settings: Settings, config: FileConfig, redis: Any | None = None
    ) -> BackendRegistry:
        ctx = BuildContext(settings, config, redis)
        backends = {model.name: BACKENDS[model.backend](model, ctx) for model in config.models}
        return cls(
            backends,
            {a.name: a for a in config.adapters},
            {r.name: r for r in config.routes},
            {m.name: list(m.fallbacks) for m in config.models},
        )

    def resolve(self, model: str) -> Target:
        """``model`` is a route, a base model, an adapter name, or ``base:adapter``.

        Raises ``ModelNotFound`` for anything else. Readiness is not checked here: a backend
        that is not ready is skipped for the next fallback when the request is sent.
        """
        route = self._routes.get(model)
        if route is not None:
            inner = self.resolve(route.model)
            return Target(inner.backends, inner.base, inner.adapter, route)
        base, _, adapter_name = model.partition(":")
        adapter = self._adapters.get(adapter_name or base)
        if adapter is not None and adapter_name and adapter.base != base:
            adapter = None
        if adapter is not None:
            base = adapter.base
        elif adapter_name:
            raise _not_found(model)
        primary = self._backends.get(base)
        if primary is None:
            raise _not_found(model)
        # an adapter lives on its base model only: no fallback can serve it
        others = () if adapter else tuple(self._backends[f] for f in self._fallbacks.get(base, ()))
        return Target((primary, *others), base, adapter)

    def adapter(self, name: str) -> tuple[Backend, AdapterConfig]:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ModelNotFound(f"No adapter named '{name}' is registered.", param="adapter")
        return self._backends[adapter.base], adapter

    def start_in_background(self) -> None:
        """Start every backend without blocking start-up: ``/health`` answers while they load."""
        for name, backend in self._backends.items():
            task = asyncio.create_task(backend.start(), name=f"start-{name}")
            task.add_done_callback(_log_start_failure)
            self._tasks.append(task)

    async def wait_ready(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(b.aclose() for b in self._backends.values()))

    @property
    def ready(self) -> bool:
        return all(b.ready for b in self._backends.values())

    def status(self) -> dict[str, dict[str, object]]:
        """Per model: ``status`` (ready, loading or failed: why) and the backend's own load."""
        out: dict[str, dict[str, object]] = {}
        for name, backend in self._backends.items():
            error = getattr(backend, "load_error", None)
            state = "ready" if backend.ready else f"failed: {error}" if error else "loading"
            out[name] = {"status": state, **backend.stats()}
        return out

    def models(self) -> list[ModelInfo]:
        routes = [
            ModelInfo(id=r.name, owned_by="ragline", created=self._created, parent=r.model)
            for r in self._routes.values()
        ]
        return [info for b in self._backends.values() for info in b.models()] + routes


def not_ready(backend: Backend) -> Overloaded:
    """Why ``backend`` cannot take a request now: still loading, or no healthy replica."""
    unavailable = getattr(backend, "unavailable", None)
    error = unavailable() if unavailable is not None else None
    return error or Overloaded(f"The model '{backend.name}' is not ready yet.", retry_after=5)


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("backend %s failed to start: %s", task.get_name(), task.exception())
