"""Which backend serves which public model name; built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging

from gateway.backends.base import Backend, ModelInfo
from gateway.backends.embedded import EmbeddedBackend
from gateway.config import FileConfig, Settings
from gateway.errors import ModelNotFound, Overloaded

log = logging.getLogger("ragline.backends")


class BackendRegistry:
    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = backends
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(cls, settings: Settings, config: FileConfig) -> BackendRegistry:
        backends: dict[str, Backend] = {}
        for model in config.models:
            path = model.path.expanduser() if model.path else settings.default_model_path()
            backends[model.name] = EmbeddedBackend(model, path)
        return cls(backends)

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
            raise Overloaded(f"The model '{model}' is not ready yet.", retry_after=5)
        return backend

    def models(self) -> list[ModelInfo]:
        return [info for b in self._backends.values() for info in b.models()]


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("backend %s failed to start: %s", task.get_name(), task.exception())
