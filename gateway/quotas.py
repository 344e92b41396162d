"""Per-key quotas on what a key sends and keeps in bulk, beside its rate limits.

- **Upload bytes per UTC day**: every byte a key uploads (``POST /v1/files``, a multipart file
  or ``text`` posted to a store) counts, accepted or not, since receiving and parsing it cost
  the same; over the quota a request gets 429 ``insufficient_quota`` with ``Retry-After`` until
  midnight UTC. With Redis the count is shared by every gateway process (one atomic script per
  upload); without it, this process counts.
- **Vector stores per key**: a key owns at most so many stores; creating one more gets 429
  ``insufficient_quota`` until it deletes one.

A key's policy sets its own values (``upload_bytes_per_day``, ``max_vector_stores``); keys that
do not get the server's defaults (``RAGLINE_UPLOAD_BYTES_PER_DAY``, ``RAGLINE_MAX_VECTOR_STORES``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.auth import Principal
from gateway.config import Settings
from gateway.errors import Overloaded, RaglineError

log = logging.getLogger("ragline.quotas")

DAY = 86_400

# KEYS[1] the day's counter; ARGV: bytes, limit, ttl. Returns (accepted, used after).
_CHARGE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + n > limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, used}
"""


class QuotaExceeded(RaglineError):
    status_code = 429
    error_type = "insufficient_quota"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


class Quotas:
    def __init__(self, settings: Settings, redis: Any | None) -> None:
        self.settings = settings
        self._redis = redis
        self._script: Any = redis.register_script(_CHARGE) if redis is not None else None
        self._memory: dict[tuple[str, int], int] = {}  # (key id, UTC day) -> bytes

    # -- uploads --------------------------------------------------------------------------------

    def upload_limit(self, principal: Principal) -> int | None:
        own = principal.policy.upload_bytes_per_day
        return own if own is not None else self.settings.upload_bytes_per_day

    async def charge_upload(self, principal: Principal, nbytes: int) -> None:
        """Count ``nbytes`` against the key's quota for today; raises ``QuotaExceeded`` (and
        counts nothing) when they do not fit."""
        limit = self.upload_limit(principal)
        if limit is None:
            return
        now = time.time()
        day = int(now // DAY)
        if self._script is None:
            used = self._memory.get((principal.key_id, day), 0)
            accepted = used + nbytes <= limit
            if accepted:
                used += nbytes
                self._memory = {k: v for k, v in self._memory.items() if k[1] == day}
                self._memory[(principal.key_id, day)] = used
        else:
            key = f"ragline:quota:upload:{principal.key_id}:{day}"
            try:
                ok, used = await self._script(keys=[key], args=[nbytes, limit, 2 * DAY])
            except Exception as exc:  # Redis down: as the rate limiter does
                if self.settings.redis_failure == "open":
                    log.warning("upload quota unavailable, failing open: %s", type(exc).__name__)
                    return
                raise Overloaded(
                    "The quota store (Redis) is unavailable; retry shortly.",
                    code="quota_unavailable",
                    retry_after=2,
                ) from exc
            accepted, used = bool(int(ok)), int(used)
        if not accepted:
            reset = int((day + 1) * DAY - now) + 1
            raise QuotaExceeded(
                f"This upload ({_size(nbytes)}) does not fit in this key's quota of "
                f"{_size(limit)} per day: {_size(used)} uploaded today (UTC). The quota resets "
                f"at midnight UTC, in {reset // 3600}h{reset % 3600 // 60:02d}m.",
                param="file",
                code="upload_quota_exceeded",
                headers={"Retry-After": str(reset)},
            )

    # -- stores ---------------------------------------------------------------------------------

    def store_limit(self, principal: Principal) -> int | None:
        own = principal.policy.max_vector_stores
        return own if own is not None else self.settings.max_vector_stores

    def check_stores(self, principal: Principal, owned: int) -> None:
        """Raise ``QuotaExceeded`` when a key that owns ``owned`` stores may not make one more."""
        limit = self.store_limit(principal)
        if limit is not None and owned >= limit:
            raise QuotaExceeded(
                f"This key owns {owned} vector stores, its limit; delete one to create another.",
                param="name",
                code="vector_store_quota_exceeded",
            )
