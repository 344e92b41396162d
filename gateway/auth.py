"""API keys: who is calling, and what their key allows.

Keys arrive as ``Authorization: Bearer <key>``, as every OpenAI client sends them. Only SHA-256
digests are stored: config keys list their digest (``ragline keys hash KEY``), keys created at
run time (``POST /admin/keys``) are kept in Redis (or in-process without Redis) under their digest,
and the plain key is shown once, at creation. A digest found by lookup is compared again with
``hmac.compare_digest``.

Every route except ``/health`` and ``/ready`` needs a key. With no key configured at all (no
config keys, no admin key) the gateway runs open, which ``ragline serve`` allows only on a
loopback address and announces at start-up.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import KeyConfig, KeyPolicy
from gateway.errors import AuthenticationFailed, Overloaded, PermissionDenied

log = logging.getLogger("ragline.auth")
audit = logging.getLogger("ragline.audit")

PUBLIC_PATHS = frozenset({"/health", "/ready"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_digest = functools.lru_cache(maxsize=4096)(hash_key)  # presented keys repeat on every request


def new_key() -> str:
    return "rl-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str = ""
    admin: bool = False
    policy: KeyPolicy = field(default_factory=KeyPolicy)

    def may_use(self, model: str) -> bool:
        patterns = self.policy.models
        return "*" in patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


ANONYMOUS = Principal(key_id="anonymous")


class KeyStore:
    """Config keys, the admin key and run-time keys (Redis, or this process)."""

    _HASHES = "ragline:keys"  # digest -> JSON record
    _IDS = "ragline:key-ids"  # id -> digest

    def __init__(self, keys: list[KeyConfig], admin_key: str | None, redis: Any | None) -> None:
        self._config = {k.sha256: k for k in keys}
        self._admin_digest = hash_key(admin_key) if admin_key else None
        self._redis = redis
        self._memory: dict[str, str] = {}
        self._memory_ids: dict[str, str] = {}

    @property
    def open(self) -> bool:
        """No key of any kind is configured: requests need none (loopback only)."""
        return not self._config and self._admin_digest is None

    async def lookup(self, presented: str) -> Principal | None:
        """The principal for a presented key, or None; raises ``Overloaded`` when the run-time
        key store cannot be reached."""
        digest = _digest(presented)
        config = self._config.get(digest)
        if config is not None and hmac.compare_digest(config.sha256, digest):
            return Principal(config.id, config.name, config.admin, config.policy)
        if self._admin_digest is not None and hmac.compare_digest(self._admin_digest, digest):
            return Principal("admin", "admin key", admin=True)
        record = await self._get(digest)
        if record is None:
            return None
        data = json.loads(record)
        if not hmac.compare_digest(data["sha256"], digest):
            return None
        return Principal(
            data["id"],
            data.get("name", ""),
            bool(data.get("admin")),
            KeyPolicy.model_validate(data.get("policy", {})),
        )

    async def _get(self, digest: str) -> str | None:
        if self._redis is None:
            return self._memory.get(digest)
        try:
            value = await self._redis.hget(self._HASHES, digest)
        except Exception as exc:  # redis-py raises several connection error types
            raise Overloaded(
                "The key store (Redis) is unavailable; retry shortly.",
                code="key_store_unavailable",
                retry_after=2,
            ) from exc
        return value.decode() if isinstance(value, bytes) else value

    async def create(
        self, name: str, policy: KeyPolicy, admin: bool = False
    ) -> tuple[str, dict[str, Any]]:
        """A new run-time key: returns the plain key (shown once) and its stored record."""
        key = new_key()
        digest = hash_key(key)
        key_id = "key-" + secrets.token_hex(6)
        record = {
            "id": key_id,
            "name": name,
            "admin": admin,
            "sha256": digest,
            "policy": policy.model_dump(),
            "created": int(time.time()),
        }
        encoded = json.dumps(record)
        if self._redis is None:
            self._memory[digest] = encoded
            self._memory_ids[key_id] = digest
        else:
            async with self._redis.pipeline(transaction=True) as pipe:
                await (
                    pipe.hset(self._HASHES, digest, encoded)
                    .hset(self._IDS, key_id, digest)
                    .execute()
                )
        return key, record

    async def update(
        self, key_id: str, policy: KeyPolicy, name: str | None = None
    ) -> dict[str, Any] | None:
        """Replace a run-time key's policy (and name); effective for its very next request.
        None: no run-time key with that id (config keys change in the file)."""
        if self._redis is None:
            digest = self._memory_ids.get(key_id)
            raw = self._memory.get(digest) if digest else None
        else:
            stored = await self._redis.hget(self._IDS, key_id)
            digest = stored.decode() if isinstance(stored, bytes) else stored
            raw = await self._redis.hget(self._HASHES, digest) if digest else None
        if digest is None or raw is None:
            return None
        record = json.loads(raw)
        record["policy"] = policy.model_dump()
        if name is not None:
            record["name"] = name
        if self._redis is None:
            self._memory[digest] = json.dumps(record)
        else:
            await self._redis.hset(self._HASHES, digest, json.dumps(record))
        return {k: v for k, v in record.items() if k != "sha256"}

    async def revoke(self, key_id: str) -> bool:
        """Delete a run-time key; effective for the very next request."""
        if self._redis is None:
            digest = self._memory_ids.pop(key_id, None)
            return digest is not None and self._memory.pop(digest, None) is not None
        digest = await self._redis.hget(self._IDS, key_id)
        if digest is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.hdel(self._HASHES, digest).hdel(self._IDS, key_id).execute()
        return True

    async def list(self) -> list[dict[str, Any]]:
        if self._redis is None:
            records = list(self._memory.values())
        else:
            records = list((await self._redis.hgetall(self._HASHES)).values())
        out = []
        for raw in records:
            data = json.loads(raw)
            data.pop("sha256", None)
            out.append(data)
        out += [
            {
                "id": k.id,
                "name": k.name,
                "admin": k.admin,
                "policy": k.policy.model_dump(),
                "source": "config",
            }
            for k in self._config.values()
        ]
        return sorted(out, key=lambda d: d["id"])


async def authenticate(
    store: KeyStore,
    authorization: bytes,
    path: str,
    client: tuple[str, int] | None,
    method: str = "GET",
) -> Principal:
    """The caller of ``path`` from its ``Authorization`` header (step 1 of the pipeline, for
    every route but ``/health`` and ``/ready``); raises ``AuthenticationFailed``,
    ``PermissionDenied`` (an admin path without an admin key; a key with the ``console``
    scope may read them, GET only) or ``Overloaded``."""
    admin_path = path.startswith("/admin")
    if store.open:
        if admin_path and (client or ("", 0))[0] not in LOOPBACK_HOSTS:
            raise PermissionDenied("Admin routes need an admin key when called remotely.")
        return ANONYMOUS
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    if not token or scheme.lower() != "bearer":
        raise AuthenticationFailed(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    principal = await store.lookup(token.strip())
    if principal is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    reading = principal.policy.console and method in ("GET", "HEAD")  # the console scope
    if admin_path and not principal.admin and not reading:
        raise PermissionDenied("This key may not use the admin routes.", code="not_admin")
    return principal


def principal_of(scope_state: Any) -> Principal:
    principal = getattr(scope_state, "principal", None)
    return principal if isinstance(principal, Principal) else ANONYMOUS
