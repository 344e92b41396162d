"""Per-key rate limits: token buckets for requests (RPM) and tokens (TPM).

A bucket holds up to ``limit`` units and refills continuously at ``limit`` per minute. A request
takes one request unit and *reserves* ``prompt tokens + max_tokens`` token units before it is
served; when the real usage is known the difference is given back (or taken) — ``settle``.

With Redis both buckets are checked and updated by one Lua script, atomically, with Redis's own
clock, so any number of gateway processes share the limits exactly. Without Redis an in-process
implementation of the same arithmetic serves a single process.

A rejection carries OpenAI's headers: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` and the ``-tokens``
counterparts, plus ``Retry-After``; successful responses carry the same headers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import KeyPolicy
from gateway.errors import InvalidRequest, Overloaded, RateLimited

log = logging.getLogger("ragline.ratelimit")

_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000)
end
local rl, tl = 0, 0
if rpm > 0 then rl = level(KEYS[1], rpm) end
if tpm > 0 then tl = level(KEYS[2], tpm) end
local wait = 0
if rpm > 0 and rl < 1 then wait = math.max(wait, (1 - rl) * 60000 / rpm) end
if tpm > 0 and tl < cost then wait = math.max(wait, (cost - tl) * 60000 / tpm) end
if wait > 0 then return {0, tostring(rl), tostring(tl), tostring(wait)} end
if rpm > 0 then
  rl = rl - 1
  redis.call('HSET', KEYS[1], 'l', tostring(rl), 't', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  tl = tl - cost
  redis.call('HSET', KEYS[2], 'l', tostring(tl), 't', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
return {1, tostring(rl), tostring(tl), '0'}
"""

_SETTLE = """
local v = redis.call('HMGET', KEYS[1], 'l', 't')
if not v[1] then return 0 end
local l = math.min(tonumber(ARGV[2]), tonumber(v[1]) + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'l', tostring(l))
return 1
"""


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    seconds = math.ceil(seconds)
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Reservation:
    key_id: str
    tokens: int  # reserved token units (0 when the key has no TPM)
    policy: KeyPolicy
    remaining_requests: float = 0.0
    remaining_tokens: float = 0.0
    enforced: bool = True  # False when the limiter was unreachable and failed open

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if not self.enforced:
            return h
        p = self.policy
        if p.rpm:
            left = max(self.remaining_requests, 0.0)
            h["x-ratelimit-limit-requests"] = str(p.rpm)
            h["x-ratelimit-remaining-requests"] = str(int(left))
            h["x-ratelimit-reset-requests"] = duration((p.rpm - left) * 60 / p.rpm)
        if p.tpm:
            left = max(self.remaining_tokens, 0.0)
            h["x-ratelimit-limit-tokens"] = str(p.tpm)
            h["x-ratelimit-remaining-tokens"] = str(int(left))
            h["x-ratelimit-reset-tokens"] = duration((p.tpm - left) * 60 / p.tpm)
        return h


class RateLimiter(Protocol):
    async def reserve(self, key_id: str, policy: KeyPolicy, tokens: int) -> Reservation: ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None: ...


def _start(key_id: str, policy: KeyPolicy, tokens: int) -> Reservation:
    """A reservation of ``tokens`` (if the key has a TPM); refuses one that can never fit."""
    _check_cost(policy, tokens)
    return Reservation(key_id, tokens if policy.tpm else 0, policy)


def _check_cost(policy: KeyPolicy, tokens: int) -> None:
    if policy.tpm and tokens > policy.tpm:
        raise InvalidRequest(
            f"This request needs up to {tokens} tokens (prompt + max_tokens), more than this "
            f"key's limit of {policy.tpm} tokens per minute; lower max_tokens.",
            param="max_tokens",
            code="exceeds_tpm",
        )


def _rejection(reservation: Reservation, wait_s: float) -> RateLimited:
    which = (
        "requests" if reservation.policy.rpm and reservation.remaining_requests < 1 else "tokens"
    )
    headers = reservation.headers()
    headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
    return RateLimited(
        f"Rate limit reached for key '{reservation.key_id}' on {which} per minute. "
        f"Please try again in {duration(wait_s)}.",
        headers=headers,
    )


class RedisRateLimiter:
    def __init__(self, redis: Any, fail_open: bool) -> None:
        self._redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._fail_open = fail_open

    async def reserve(self, key_id: str, policy: KeyPolicy, tokens: int) -> Reservation:
        reservation = _start(key_id, policy, tokens)
        if not policy.rpm and not policy.tpm:
            return reservation
        cost = reservation.tokens
        keys = [f"ragline:rl:{key_id}:req", f"ragline:rl:{key_id}:tok"]
        try:
            ok, req_left, tok_left, wait_ms = await self._reserve(
                keys=keys, args=[policy.rpm or 0, policy.tpm or 0, cost]
            )
        except Exception as exc:  # connection refused, timeout, ...
            return self._unavailable(reservation, exc)
        reservation.remaining_requests = float(req_left)
        reservation.remaining_tokens = float(tok_left)
        if not int(ok):
            reservation.tokens = 0
            raise _rejection(reservation, float(wait_ms) / 1000)
        return reservation

    def _unavailable(self, reservation: Reservation, exc: Exception) -> Reservation:
        if self._fail_open:
            log.warning("rate limiter unavailable, failing open: %s", type(exc).__name__)
            reservation.tokens = 0
            reservation.enforced = False
            return reservation
        raise Overloaded(
            "The rate limiter (Redis) is unavailable; retry shortly.",
            code="rate_limiter_unavailable",
            retry_after=2,
        ) from exc

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if not reservation.tokens or used_tokens == reservation.tokens:
            return
        try:
            await self._settle(
                keys=[f"ragline:rl:{reservation.key_id}:tok"],
                args=[reservation.tokens - used_tokens, reservation.policy.tpm],
            )
        except Exception as exc:
            log.warning(
                "could not settle tokens for %s: %s", reservation.key_id, type(exc).__name__
            )


class MemoryRateLimiter:
    """The same buckets in this process (single-process deployments only)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (level, at)

    def _level(self, key: str, cap: int, now: float) -> float:
        level, at = self._buckets.get(key, (float(cap), now))
        return min(float(cap), level + (now - at) * cap / 60)

    async def reserve(self, key_id: str, policy: KeyPolicy, tokens: int) -> Reservation:
        reservation = _start(key_id, policy, tokens)
        if not policy.rpm and not policy.tpm:
            return reservation
        cost = reservation.tokens
        now = time.monotonic()
        rk, tk = f"{key_id}:req", f"{key_id}:tok"
        rl = self._level(rk, policy.rpm, now) if policy.rpm else 0.0
        tl = self._level(tk, policy.tpm, now) if policy.tpm else 0.0
        reservation.remaining_requests, reservation.remaining_tokens = rl, tl
        wait = 0.0
        if policy.rpm and rl < 1:
            wait = max(wait, (1 - rl) * 60 / policy.rpm)
        if policy.tpm and tl < cost:
            wait = max(wait, (cost - tl) * 60 / policy.tpm)
        if wait > 0:
            reservation.tokens = 0
            raise _rejection(reservation, wait)
        if policy.rpm:
            self._buckets[rk] = (rl - 1, now)
            reservation.remaining_requests = rl - 1
        if policy.tpm:
            self._buckets[tk] = (tl - cost, now)
            reservation.remaining_tokens = tl - cost
        return reservation

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if not reservation.tokens or not reservation.policy.tpm:
            return
        key = f"{reservation.key_id}:tok"
        level, at = self._buckets.get(key, (float(reservation.policy.tpm), time.monotonic()))
        refund = reservation.tokens - used_tokens
        self._buckets[key] = (min(float(reservation.policy.tpm), level + refund), at)
