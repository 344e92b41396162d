"""Where LoRA adapters are loaded: which replica holds which adapter.

vLLM loads adapters at run time (``POST /v1/load_lora_adapter``, with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). The gateway loads an adapter on a replica the first
time a request for it lands there and remembers the placement, so that later requests go to a
replica that already holds it. With Redis configured the placement is shared by every gateway
process (a set per adapter); without it, it lives in this process.
"""

from __future__ import annotations

from typing import Any, Protocol


class Placements(Protocol):
    async def replicas_with(self, adapter: str) -> set[str]: ...

    async def add(self, adapter: str, replica: str) -> None: ...

    async def remove(self, adapter: str, replica: str) -> None: ...

    async def forget_replica(self, replica: str, adapters: list[str]) -> None: ...


class MemoryPlacements:
    """Single-process placement memory."""

    def __init__(self) -> None:
        self._where: dict[str, set[str]] = {}

    async def replicas_with(self, adapter: str) -> set[str]:
        return set(self._where.get(adapter, ()))

    async def add(self, adapter: str, replica: str) -> None:
        self._where.setdefault(adapter, set()).add(replica)

    async def remove(self, adapter: str, replica: str) -> None:
        self._where.get(adapter, set()).discard(replica)

    async def forget_replica(self, replica: str, adapters: list[str]) -> None:
        for adapter in adapters:
            await self.remove(adapter, replica)


class RedisPlacements:
    """Placement shared through Redis: ``SET ragline:lora:{base}:{adapter} -> replica URLs``."""

    def __init__(self, redis: Any, namespace: str) -> None:
        self._redis = redis
        self._prefix = f"ragline:lora:{namespace}:"

    async def replicas_with(self, adapter: str) -> set[str]:
        members = await self._redis.smembers(self._prefix + adapter)
        return {m.decode() if isinstance(m, bytes) else m for m in members}

    async def add(self, adapter: str, replica: str) -> None:
        await self._redis.sadd(self._prefix + adapter, replica)

    async def remove(self, adapter: str, replica: str) -> None:
        await self._redis.srem(self._prefix + adapter, replica)

    async def forget_replica(self, replica: str, adapters: list[str]) -> None:
        for adapter in adapters:
            await self.remove(adapter, replica)
