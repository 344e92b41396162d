"""Exact-match response cache for deterministic requests.

A request is cacheable when it is deterministic: ``temperature == 0`` or a fixed ``seed``. The key
is a SHA-256 over the canonical request (sorted JSON, ``user`` left out; ``stream`` and
``stream_options`` kept, since they change the bytes sent), the endpoint, the backend it resolved
to, the adapter, and the versions of anything else that shapes the answer (template and vector-
store versions, as those features arrive). A streamed request is stored as its SSE events and
replayed as a stream; a non-streamed one as its JSON body. ``Cache-Control: no-cache`` skips the
lookup (the fresh answer is still stored). Hits are marked with ``X-Ragline-Cache: hit``.

Redis stores entries with a TTL; without Redis an in-process LRU (single process only) does.
Entries larger than ``cache_max_entry_bytes`` are not stored. A cache that cannot be reached is a
miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("ragline.cache")

_IGNORED_FIELDS = ("user", "ragline")


@dataclass
class CachedResponse:
    kind: str  # "json" or "sse"
    body: bytes  # the JSON body, or the SSE events concatenated
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def encode(self) -> bytes:
        head = json.dumps({"kind": self.kind, "p": self.prompt_tokens, "c": self.completion_tokens})
        return head.encode() + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedResponse:
        head, _, body = raw.partition(b"\n")
        meta = json.loads(head)
        return cls(meta["kind"], body, meta["p"], meta["c"])


def is_deterministic(body: Mapping[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(
    endpoint: str,
    body: Mapping[str, Any],
    backend: str,
    adapter: str | None,
    versions: dict[str, str] | None = None,
) -> str:
    canonical = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS}
    material = json.dumps(
        {
            "endpoint": endpoint,
            "backend": backend,
            "adapter": adapter,
            "body": canonical,
            "versions": versions or {},
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "ragline:cache:" + hashlib.sha256(material.encode()).hexdigest()


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedResponse | None: ...

    async def put(self, key: str, value: CachedResponse) -> None: ...


class RedisResponseCache:
    def __init__(self, redis: Any, ttl: int, max_entry_bytes: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._max = max_entry_bytes

    async def get(self, key: str) -> CachedResponse | None:
        try:
            raw = await self._redis.get(key)
        except Exception as exc:
            log.warning("cache unavailable: %s", type(exc).__name__)
            return None
        return CachedResponse.decode(raw) if raw else None

    async def put(self, key: str, value: CachedResponse) -> None:
        data = value.encode()
        if len(data) > self._max:
            return
        try:
            await self._redis.set(key, data, ex=self._ttl)
        except Exception as exc:
            log.warning("cache unavailable: %s", type(exc).__name__)


class MemoryResponseCache:
    """An LRU with TTL in this process."""

    def __init__(self, ttl: int, max_entry_bytes: int, max_entries: int) -> None:
        self._ttl = ttl
        self._max = max_entry_bytes
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._max_entries = max_entries

    async def get(self, key: str) -> CachedResponse | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: CachedResponse) -> None:
        if len(value.body) > self._max:
            return
        self._entries[key] = (time.monotonic() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
