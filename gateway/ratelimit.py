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

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import KeyPolicy
from gateway.errors import InvalidRequest, Overloaded, RateLimited
from gateway.resp import RespConnection

log = logging.getLogger("ragline.ratelimit")

# One call reserves for a batch of requests and applies a batch of settlements, atomically, on
# Redis's clock. ARGV[1] = settlements S, ARGV[2] = reservations R; KEYS: S token buckets, then a
# (requests, tokens) pair per reservation; ARGV after the counts: (refund, cap) per settlement,
# then (rpm, tpm, cost) per reservation. Returns (ok, requests left, tokens left, wait ms) each.
_BATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s, r = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, s do
  local v = redis.call('HMGET', KEYS[i], 'l', 't')
  if v[1] then
    local cap = tonumber(ARGV[2 + 2 * i])
    local l = math.min(cap, tonumber(v[1]) + tonumber(ARGV[1 + 2 * i]))
    redis.call('HSET', KEYS[i], 'l', tostring(l))
  end
end
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60000)
end
local out = {}
for j = 1, r do
  local a, k = 2 + 2 * s + 3 * (j - 1), s + 2 * (j - 1)
  local rpm, tpm, cost = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local rl, tl = 0, 0
  if rpm > 0 then rl = level(KEYS[k + 1], rpm) end
  if tpm > 0 then tl = level(KEYS[k + 2], tpm) end
  local wait = 0
  if rpm > 0 and rl < 1 then wait = math.max(wait, (1 - rl) * 60000 / rpm) end
  if tpm > 0 and tl < cost then wait = math.max(wait, (cost - tl) * 60000 / tpm) end
  if wait > 0 then
    table.insert(out, 0)
  else
    if rpm > 0 then
      rl = rl - 1
      redis.call('HSET', KEYS[k + 1], 'l', tostring(rl), 't', now)
      redis.call('PEXPIRE', KEYS[k + 1], 120000)
    end
    if tpm > 0 then
      tl = tl - cost
      redis.call('HSET', KEYS[k + 2], 'l', tostring(tl), 't', now)
      redis.call('PEXPIRE', KEYS[k + 2], 120000)
    end
    table.insert(out, 1)
  end
  table.insert(out, tostring(rl))
  table.insert(out, tostring(tl))
  table.insert(out, tostring(wait))
end
return out
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

    async def aclose(self) -> None: ...


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
    """Exact limits shared by every gateway process, at one Redis round trip per batch.

    Reservations made in the same event-loop turn, and the settlements (refunds) queued since
    the last call, go to Redis in one script call; at most one call is in flight, and what
    arrives meanwhile waits for the next (group commit). A settlement with no reservation to
    ride along is sent after ``settle_delay`` seconds, and ``aclose`` sends what is left.
    """

    def __init__(
        self,
        redis: Any,
        fail_open: bool,
        settle_delay: float = 0.01,
        connection: RespConnection | None = None,
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(_BATCH)
        self._connection = connection  # the lean one for the request path, when the URL allows
        self._fail_open = fail_open
        self._settle_delay = settle_delay
        self._waiting: list[tuple[list[str], list[int], asyncio.Future[list[Any]]]] = []
        self._refunds: dict[str, tuple[int, int]] = {}  # token bucket -> (refund, cap)
        self._running: asyncio.Task[None] | None = None
        self._leading = False  # a reserve() is sending its batch itself
        self._timer: asyncio.TimerHandle | None = None

    async def reserve(self, key_id: str, policy: KeyPolicy, tokens: int) -> Reservation:
        reservation = _start(key_id, policy, tokens)
        if not policy.rpm and not policy.tpm:
            return reservation
        keys = [f"ragline:rl:{key_id}:req", f"ragline:rl:{key_id}:tok"]
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, [policy.rpm or 0, policy.tpm or 0, reservation.tokens], future))
        if self._running is None and not self._leading:
            # nothing in flight: send now, from this task (no task to create and schedule)
            self._leading = True
            try:
                await self._call()
            finally:
                self._leading = False
                self._kick()  # what queued meanwhile
        try:
            ok, req_left, tok_left, wait_ms = await future
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
        """Queue the refund (or the extra charge) of the difference; it rides with the next
        batch of reservations."""
        if not reservation.tokens or used_tokens == reservation.tokens:
            return
        key = f"ragline:rl:{reservation.key_id}:tok"
        refund, _ = self._refunds.get(key, (0, 0))
        cap = reservation.policy.tpm or 0
        self._refunds[key] = (refund + reservation.tokens - used_tokens, cap)
        if self._timer is None and self._running is None and not self._leading:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._settle_delay, self._kick)

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is None and not self._leading and (self._waiting or self._refunds):
            self._running = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._waiting or self._refunds:
                await self._call()
        finally:
            self._running = None

    async def _call(self) -> None:
        """One script call for everything queued now."""
        batch, self._waiting = self._waiting, []
        refunds, self._refunds = self._refunds, {}
        keys = list(refunds)
        args: list[Any] = [len(refunds), len(batch)]
        for refund, cap in refunds.values():
            args += [refund, cap]
        for batch_keys, batch_args, _ in batch:
            keys += batch_keys
            args += batch_args
        try:
            if self._connection is not None:
                out = await self._connection.script(_BATCH, keys, args)
            else:
                out = await self._script(keys=keys, args=args)
        except BaseException as exc:  # the others in the batch must not wait forever
            if refunds:
                log.warning("could not settle tokens: %s", type(exc).__name__)
            failure = exc if isinstance(exc, Exception) else ConnectionError("cancelled")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for i, (_, _, future) in enumerate(batch):
            if not future.done():
                future.set_result(out[4 * i : 4 * i + 4])

    async def aclose(self) -> None:
        """Send the settlements still queued (at shutdown)."""
        self._kick()
        if self._running is not None:
            await asyncio.shield(self._running)
        if self._connection is not None:
            await self._connection.aclose()


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

    async def aclose(self) -> None:
        return None
