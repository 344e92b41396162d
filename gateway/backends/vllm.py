"""The ``vllm`` backend: the ``openai`` backend in front of vLLM servers, plus LoRA adapters.

An adapter is loaded on a replica (``POST /v1/load_lora_adapter``) the first time a request for
it lands there; the placement is remembered (in Redis when configured, so every gateway process
agrees) and later requests prefer replicas that already hold it. A replica that restarted is
detected (a 404 for the adapter, or its re-admission after a failed health check) and the
adapter is loaded again. Requests for an adapter are sent with the adapter's name as ``model``.

A required or named ``tool_choice`` is sent as a ``json_schema`` response format of the calls
(``tool_calls.ForcedCalls``): vLLM on CPU does not constrain tool calls, but does constrain
JSON schemas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import replace

import orjson

from gateway.backends.base import Event, Generation, GenerationRequest, ModelInfo
from gateway.backends.lora import MemoryPlacements, Placements
from gateway.backends.openai import OpenAIBackend, upstream_error
from gateway.backends.replicas import Replica
from gateway.backends.tool_calls import ForcedCalls
from gateway.config import AdapterConfig, VllmModelConfig
from gateway.errors import BackendError

log = logging.getLogger("ragline.vllm")


class AdapterLoadFailed(BackendError):
    default_code = "adapter_load_failed"
    retryable = False  # another model would not have the adapter either


class VllmBackend(OpenAIBackend):
    def __init__(
        self,
        config: VllmModelConfig,
        adapters: list[AdapterConfig] | None = None,
        placements: Placements | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(config, api_key)
        self.adapters = {a.name: a for a in adapters or []}
        self.placements = placements or MemoryPlacements()
        for replica in self.pool.replicas:
            replica.on_readmit.append(self._forget_adapters)
        self._load_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def models(self) -> list[ModelInfo]:
        return super().models() + [
            ModelInfo(
                id=a.name,
                owned_by=self.config.owned_by,
                created=self._created,
                max_model_len=self.config.max_model_len,
                root=a.path,
                parent=a.base,
            )
            for a in self.adapters.values()
        ]

    # -- tool calls vLLM does not constrain ------------------------------------------------------

    def _forced(self, request: GenerationRequest) -> ForcedCalls | None:
        if not getattr(self.config, "constrain_tool_calls", True):
            return None
        return ForcedCalls.of(request.body)

    async def generate(self, request: GenerationRequest) -> Generation:
        forced = self._forced(request)
        if forced is None:
            return await super().generate(request)
        generation = await super().generate(replace(request, body=forced.body))
        return forced.generation(generation)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        forced = self._forced(request)
        if forced is None:
            events = super().stream(request)
        else:
            events = forced.events(super().stream(replace(request, body=forced.body)))
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    # -- the openai backend's hooks ------------------------------------------------------------

    def upstream_model(self, request: GenerationRequest) -> str:
        return request.adapter or self.config.upstream_model

    async def choose(self, request: GenerationRequest, tried: set[Replica]) -> Replica:
        if request.adapter is not None:
            candidates = self.pool.available(tried)
            holding = await self.placements.replicas_with(request.adapter)
            warm = [r for r in candidates if r.url in holding]
            if warm:
                return self.pool.pick(warm)
        return await super().choose(request, tried)

    async def prepare(self, request: GenerationRequest, replica: Replica) -> None:
        if request.adapter is not None:
            await self._ensure_loaded(self.adapters[request.adapter], replica)

    async def retry_client_error(
        self, request: GenerationRequest, replica: Replica, status: int
    ) -> bool:
        if status != 404 or request.adapter is None:
            return False
        # the placement was stale (the replica restarted): load again and retry there
        await self.placements.remove(request.adapter, replica.url)
        return True

    # -- adapters ------------------------------------------------------------------------------

    def _forget_adapters(self, replica: Replica) -> None:
        # A re-admitted replica may have restarted and lost its adapters.
        task = asyncio.ensure_future(
            self.placements.forget_replica(replica.url, list(self.adapters))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _ensure_loaded(self, adapter: AdapterConfig, replica: Replica) -> None:
        if replica.url in await self.placements.replicas_with(adapter.name):
            return
        lock = self._load_locks.setdefault((adapter.name, replica.url), asyncio.Lock())
        async with lock:
            if replica.url in await self.placements.replicas_with(adapter.name):
                return
            await self.load_adapter(adapter, replica)

    async def load_adapter(self, adapter: AdapterConfig, replica: Replica) -> None:
        """``POST /v1/load_lora_adapter`` on one replica; raises ``AdapterLoadFailed``."""
        body = {"lora_name": adapter.name, "lora_path": adapter.path}
        r = await self.post(replica, "/v1/load_lora_adapter", orjson.dumps(body))
        text = await r.read()
        if r.status != 200 and b"already" not in text.lower():
            raise AdapterLoadFailed(
                f"Adapter '{adapter.name}' could not be loaded on {replica.url}: "
                f"{upstream_error(r.status, text).message}",
                param="model",
            )
        await self.placements.add(adapter.name, replica.url)
        log.info("loaded adapter %s on %s", adapter.name, replica.url)

    async def unload_adapter(self, adapter: AdapterConfig, replica: Replica) -> None:
        body = {"lora_name": adapter.name}
        r = await self.post(replica, "/v1/unload_lora_adapter", orjson.dumps(body))
        text = await r.read()
        await self.placements.remove(adapter.name, replica.url)
        lowered = text.lower()
        if r.status != 200 and b"not found" not in lowered and b"not loaded" not in lowered:
            raise AdapterLoadFailed(
                f"Adapter '{adapter.name}' could not be unloaded from {replica.url}: "
                f"{upstream_error(r.status, text).message}",
                param="model",
            )
