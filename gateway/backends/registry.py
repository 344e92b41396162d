"""Which backend serves which public model name; built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.backends.base import Backend, ModelInfo
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.lora import MemoryPlacements, Placements, RedisPlacements
from gateway.backends.vllm import VllmBackend
from gateway.config import (
    AdapterConfig,
    EmbeddedModelConfig,
    FileConfig,
    RouteConfig,
    Settings,
)
from gateway.errors import ModelNotFound, Overloaded

log = logging.getLogger("ragline.backends")


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolves to."""

    backend: Backend
    base: str
    adapter: AdapterConfig | None = None
    route: RouteConfig | None = None

    @property
    def proxied(self) -> bool:
        """The backend forwards OpenAI requests as they are (``ProxyBackend``, i.e. vLLM)."""
        return hasattr(self.backend, "proxy")


class BackendRegistry:
    def __init__(
        self,
        backends: dict[str, Backend],
        adapters: dict[str, AdapterConfig] | None = None,
        routes: dict[str, RouteConfig] | None = None,
    ) -> None:
        self._backends = backends
        self._adapters = adapters or {}
        self._routes = routes or {}
        self._created = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(
        cls, settings: Settings, config: FileConfig, redis: Any | None = None
    ) -> BackendRegistry:
        backends: dict[str, Backend] = {}
        for model in config.models:
            if isinstance(model, EmbeddedModelConfig):
                path = model.path.expanduser() if model.path else settings.default_model_path()
                adapters = [a for a in config.adapters if a.base == model.name]
                backends[model.name] = EmbeddedBackend(model, path, adapters)
            else:
                placements: Placements = (
                    RedisPlacements(redis, model.name) if redis is not None else MemoryPlacements()
                )
                adapters = [a for a in config.adapters if a.base == model.name]
                backends[model.name] = VllmBackend(model, adapters, placements)
        return cls(
            backends, {a.name: a for a in config.adapters}, {r.name: r for r in config.routes}
        )

    def resolve(self, model: str) -> Target:
        """``model`` is a route, a base model, an adapter name, or ``base:adapter``.

        Raises ``ModelNotFound`` for anything else and ``Overloaded`` while the backend is not
        ready (loading, or no healthy replica).
        """
        route = self._routes.get(model)
        if route is not None:
            inner = self.resolve(route.model)
            return Target(inner.backend, inner.base, inner.adapter, route)
        base, _, adapter_name = model.partition(":")
        adapter = self._adapters.get(adapter_name or base)
        if adapter is not None and adapter_name and adapter.base != base:
            adapter = None
        if adapter is not None:
            base = adapter.base
        elif adapter_name:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            )
        return Target(self.get(base), base, adapter)

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

    def get(self, model: str) -> Backend:
        """The backend for ``model``; raises ``ModelNotFound`` or ``Overloaded`` (still loading)."""
        backend = self._backends.get(model)
        if backend is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            )
        if not backend.ready:
            # a started proxy whose replicas are all down says so (as a request that found
            # them down would), rather than "not ready yet"
            unavailable = getattr(backend, "unavailable", None)
            error = unavailable() if unavailable is not None else None
            raise error or Overloaded(f"The model '{model}' is not ready yet.", retry_after=5)
        return backend

    def models(self) -> list[ModelInfo]:
        routes = [
            ModelInfo(id=r.name, owned_by="ragline", created=self._created, parent=r.model)
            for r in self._routes.values()
        ]
        return [info for b in self._backends.values() for info in b.models()] + routes


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("backend %s failed to start: %s", task.get_name(), task.exception())
