"""Token and cost budgets per key and per team, per UTC day and month (issue 19, item 2).

A request reserves, before it is served, what it may use at most (its prompt estimate plus
``max_tokens``, and that many tokens' cost at the model's price) against every budget that
applies to it: the key's and its team's, daily and monthly, in tokens and in cost. With Redis
one Lua script checks and takes all of them atomically, so any number of gateway processes
share a budget exactly; settling gives back what the answer did not use. A budget that would be
overdrawn refuses the request with 429 ``budget_exceeded``, naming the budget and when it resets.

Crossing a budget's soft threshold (``soft``, a fraction) logs a warning, counts
``ragline_budget_soft_limit_total`` and, when the budget names a ``webhook``, POSTs the event
there, once per budget and period. Budgets come from the config file (a key policy's
``budget``, a team's under ``teams``) or from ``PUT /admin/budgets/{key|team}/{id}``, which
overrides the file's until deleted (stored in Redis, so every process sees it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.errors import RateLimited

log = logging.getLogger("ragline.budgets")
Scope = Literal["key", "team"]
COST_UNIT = 1_000_000  # costs are counted in millionths, as integers: exact in Redis


MAX_LIMIT = 10**15  # tokens
MAX_COST = 1e12  # in the prices' unit


class Budget(BaseModel):
    """Limits for one key or team; unset: no limit of that kind."""

    model_config = ConfigDict(extra="forbid")

    # bounds keep every limit a finite integer of counted units (a cost of 1e307 overflowed)
    tokens_per_day: int | None = Field(default=None, ge=0, le=MAX_LIMIT)
    tokens_per_month: int | None = Field(default=None, ge=0, le=MAX_LIMIT)
    cost_per_day: float | None = Field(
        default=None, ge=0, le=MAX_COST, allow_inf_nan=False, description="In the prices' unit."
    )
    cost_per_month: float | None = Field(default=None, ge=0, le=MAX_COST, allow_inf_nan=False)
    soft: float = Field(default=0.8, gt=0, le=1, description="Warn at this share of a budget.")
    webhook: str | None = Field(
        default=None,
        pattern=r"^https?://",
        max_length=2048,
        description="POSTed once when `soft` is crossed.",
    )

    @field_validator("webhook")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the webhook URL is not valid UTF-8 text") from None
        return value

    def limits(self) -> list[tuple[str, str, int]]:
        """(period, unit, limit in counted units) for every limit set."""
        out = []
        for period in ("day", "month"):
            tokens = getattr(self, f"tokens_per_{period}")
            cost = getattr(self, f"cost_per_{period}")
            if tokens is not None:
                out.append((period, "tokens", int(tokens)))
            if cost is not None:
                out.append((period, "cost", int(round(cost * COST_UNIT))))
        return out


class BudgetExceeded(RateLimited):
    default_code = "budget_exceeded"


@dataclass
class Line:
    """One budget counter a request reserved against."""

    scope: Scope
    owner: str
    period: str
    unit: str
    limit: int
    period_id: str
    reset: float  # epoch seconds
    soft: float
    webhook: str | None
    reserved: int = 0
    used_before: int = 0

    @property
    def key(self) -> str:
        return f"ragline:budget:{self.scope}:{self.owner}:{self.period_id}:{self.unit}"


@dataclass
class BudgetReservation:
    lines: list[Line] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        """The tightest budget, as ``x-ratelimit-*-budget`` headers."""
        if not self.lines:
            return {}
        line = min(
            self.lines, key=lambda x: (x.limit - x.used_before - x.reserved) / max(x.limit, 1)
        )
        left = max(line.limit - line.used_before - line.reserved, 0)
        return {
            "x-ratelimit-limit-budget": _shown(line.limit, line.unit),
            "x-ratelimit-remaining-budget": _shown(left, line.unit),
            "x-ratelimit-reset-budget": f"{max(0, math.ceil(line.reset - time.time()))}s",
        }


def price_of(
    prices: dict[str, Any], model: str, prompt_tokens: int, completion_tokens: int
) -> float:
    """What the tokens cost at ``prices[model]`` (per million tokens); 0 without a price."""
    price = prices.get(model)
    if price is None:
        return 0.0
    return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6


def _shown(value: int, unit: str) -> str:
    return f"{value / COST_UNIT:g}" if unit == "cost" else str(value)


def periods(now: float | None = None) -> dict[str, tuple[str, float]]:
    """The current UTC day and month: their ids and when they end."""
    moment = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    day_end = datetime(moment.year, moment.month, moment.day, tzinfo=UTC) + timedelta(days=1)
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return {
        "day": (moment.strftime("%Y-%m-%d"), day_end.timestamp()),
        "month": (moment.strftime("%Y-%m"), next_month.timestamp()),
    }


# KEYS: one counter per line. ARGV: n, then (limit, amount, ttl ms) per line. All or nothing:
# returns {0, index of the first line that does not fit, its current value} or {1, values...}.
_RESERVE = """
local n = tonumber(ARGV[1])
local values = {}
for i = 1, n do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit, amount = tonumber(ARGV[2 + 3 * (i - 1)]), tonumber(ARGV[3 + 3 * (i - 1)])
  if v + amount > limit then return {0, i, v} end
  values[i] = v
end
local out = {1}
for i = 1, n do
  local amount, ttl = tonumber(ARGV[3 + 3 * (i - 1)]), tonumber(ARGV[4 + 3 * (i - 1)])
  redis.call('INCRBY', KEYS[i], amount)
  redis.call('PEXPIRE', KEYS[i], ttl)
  table.insert(out, values[i])
end
return out
"""
_OVERRIDES = "ragline:budgets"


class Budgets:
    def __init__(
        self,
        keys: dict[str, Budget],
        teams: dict[str, Budget],
        redis: Any | None,
        prices: dict[str, Any],
        metrics: Any,
    ) -> None:
        """``keys``: the config file's key budgets (a run-time key's comes with its policy)."""
        self.config: dict[tuple[str, str], Budget] = {("key", k): b for k, b in keys.items()}
        self.config |= {("team", t): b for t, b in teams.items()}
        self.redis = redis
        self.prices = prices
        self.metrics = metrics
        self._overrides: dict[tuple[str, str], Budget] = {}  # Redis's, refreshed every 2 s
        self._overrides_at = -math.inf
        self._counters: dict[str, int] = {}  # without Redis
        self._alerted: set[str] = set()  # without Redis
        self._lock = asyncio.Lock()
        self._script: Any = None

    # -- which budgets apply ------------------------------------------------------------------

    async def _refresh(self, force: bool = False) -> dict[tuple[str, str], Budget]:
        """The admin API's budgets: with Redis, read again at most every 2 s (one HGETALL per
        process, not one read per request), at once after a change here."""
        if self.redis is None or (not force and time.monotonic() - self._overrides_at < 2.0):
            return self._overrides
        raw = await self.redis.hgetall(_OVERRIDES)
        found = {}
        for name, value in raw.items():
            scope, _, owner = (name.decode() if isinstance(name, bytes) else name).partition(":")
            found[scope, owner] = Budget.model_validate_json(value)
        self._overrides, self._overrides_at = found, time.monotonic()
        return found

    async def budget(self, scope: str, owner: str) -> Budget | None:
        overrides = await self._refresh()
        return overrides.get((scope, owner)) or self.config.get((scope, owner))

    async def set(self, scope: str, owner: str, budget: Budget) -> None:
        if self.redis is not None:
            await self.redis.hset(_OVERRIDES, f"{scope}:{owner}", budget.model_dump_json())
            await self._refresh(force=True)
        else:
            self._overrides[scope, owner] = budget

    async def delete(self, scope: str, owner: str) -> bool:
        if self.redis is not None:
            removed = bool(await self.redis.hdel(_OVERRIDES, f"{scope}:{owner}"))
            await self._refresh(force=True)
            return removed
        return self._overrides.pop((scope, owner), None) is not None

    async def owners(self) -> list[tuple[str, str]]:
        return sorted(set(self.config) | set(await self._refresh(force=True)))

    def _cost_units(self, model: str, tokens: int) -> int:
        price = self.prices.get(model)
        if price is None:
            return 0
        per_token = max(price.prompt, price.completion) / 1e6
        return int(math.ceil(tokens * per_token * COST_UNIT))

    async def _lines(self, key_id: str, team: str | None, own: Budget | None) -> list[Line]:
        now = periods()
        lines = []
        for scope, owner in (("key", key_id), ("team", team)):
            if owner is None:
                continue
            budget = await self.budget(scope, owner)
            if budget is None and scope == "key":
                budget = own
            if budget is None:
                continue
            for period, unit, limit in budget.limits():
                period_id, reset = now[period]
                lines.append(Line(scope, owner, period, unit, limit, period_id, reset,  # type: ignore[arg-type]
                                  budget.soft, budget.webhook))  # fmt: skip
        return lines

    # -- reserve and settle ---------------------------------------------------------------------

    async def reserve(
        self, key_id: str, team: str | None, model: str, tokens: int, own: Budget | None = None
    ) -> BudgetReservation | None:
        """Reserve ``tokens`` (and their cost) against every budget of the key (``own``: the
        key policy's) and its team; None when none applies. Raises ``BudgetExceeded``."""
        overrides = await self._refresh()
        if not self.config and not overrides and own is None:
            return None
        lines = await self._lines(key_id, team, own)
        if not lines:
            return None
        for line in lines:
            line.reserved = tokens if line.unit == "tokens" else self._cost_units(model, tokens)
        values = await self._take(lines)
        if isinstance(values, tuple):
            index, current = values
            self._refuse(lines[index], current, lines[index].reserved)
        for line, used in zip(lines, values, strict=True):
            line.used_before = int(used)
        return BudgetReservation(lines)

    async def _take(self, lines: list[Line]) -> list[int] | tuple[int, int]:
        if self.redis is not None:
            if self._script is None:
                self._script = self.redis.register_script(_RESERVE)
            args: list[Any] = [len(lines)]
            for line in lines:
                ttl = int((line.reset - time.time() + 86400) * 1000)  # a day past the reset
                args += [line.limit, line.reserved, max(ttl, 1000)]
            result = await self._script(keys=[line.key for line in lines], args=args)
            if int(result[0]) == 0:
                return int(result[1]) - 1, int(result[2])
            return [int(v) for v in result[1:]]
        async with self._lock:
            values = []
            for i, line in enumerate(lines):
                current = self._counters.get(line.key, 0)
                if current + line.reserved > line.limit:
                    return i, current
                values.append(current)
            for line in lines:
                self._counters[line.key] = self._counters.get(line.key, 0) + line.reserved
            return values

    def _refuse(self, line: Line, current: int, needed: int) -> None:
        self.metrics.child(self.metrics.budget_rejections, line.scope, line.period, line.unit).inc()
        reset = datetime.fromtimestamp(line.reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        what = "token" if line.unit == "tokens" else "cost"
        period = "daily" if line.period == "day" else "monthly"
        limit, used = _shown(line.limit, line.unit), _shown(current, line.unit)
        retry = max(1, math.ceil(line.reset - time.time()))
        raise BudgetExceeded(
            f"The {period} {what} budget of {line.scope} '{line.owner}' ({limit}) is spent: "
            f"{used} used, this request may need {_shown(needed, line.unit)}. It resets at "
            f"{reset}.",
            headers={
                "x-ratelimit-limit-budget": limit,
                "x-ratelimit-remaining-budget": _shown(max(line.limit - current, 0), line.unit),
                "x-ratelimit-reset-budget": f"{retry}s",
                "Retry-After": str(retry),
            },
        )

    async def settle(self, reservation: BudgetReservation, model: str, used_tokens: int,
                     cost: float) -> None:  # fmt: skip
        """Give back what was reserved and not used; warn once when a soft threshold is
        crossed."""
        for line in reservation.lines:
            used = used_tokens if line.unit == "tokens" else int(math.ceil(cost * COST_UNIT))
            delta = used - line.reserved
            if self.redis is not None:
                total = int(await self.redis.incrby(line.key, delta)) if delta else None
            else:
                self._counters[line.key] = self._counters.get(line.key, 0) + delta
                total = self._counters[line.key]
            if total is None:
                total = line.used_before + used
            if total >= line.soft * line.limit:
                await self._soft(line, total)

    async def _soft(self, line: Line, total: int) -> None:
        mark = f"ragline:budget:alerted:{line.scope}:{line.owner}:{line.period_id}:{line.unit}"
        if self.redis is not None:
            first = await self.redis.set(
                mark, "1", nx=True, ex=int(line.reset - time.time()) + 86400
            )
        else:
            first = mark not in self._alerted
            self._alerted.add(mark)
        if not first:
            return
        self.metrics.child(self.metrics.budget_soft, line.scope, line.period, line.unit).inc()
        event = {
            "event": "budget.soft_limit", "scope": line.scope, "id": line.owner,
            "period": line.period, "unit": line.unit, "limit": _shown(line.limit, line.unit),
            "used": _shown(total, line.unit),
            "resets_at": datetime.fromtimestamp(line.reset, UTC).isoformat(),
        }  # fmt: skip
        log.warning("budget soft limit crossed: %s", json.dumps(event))
        if line.webhook:
            asyncio.get_running_loop().create_task(_post(line.webhook, event))

    # -- reading ---------------------------------------------------------------------------------

    async def status(self, scope: str, owner: str) -> dict[str, Any] | None:
        budget = await self.budget(scope, owner)
        if budget is None:
            return None
        now = periods()
        usage = []
        for period, unit, limit in budget.limits():
            period_id, reset = now[period]
            key = Line(scope, owner, period, unit, limit, period_id, reset, 1, None).key  # type: ignore[arg-type]
            if self.redis is not None:
                used = int(await self.redis.get(key) or 0)
            else:
                used = self._counters.get(key, 0)
            usage.append({
                "period": period, "unit": unit, "limit": _shown(limit, unit),
                "used": _shown(used, unit), "resets_at": datetime.fromtimestamp(reset, UTC)
                .isoformat(),
            })  # fmt: skip
        return {"scope": scope, "id": owner, "budget": budget.model_dump(), "usage": usage}


async def _post(url: str, event: dict[str, Any]) -> None:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=5) as client:
            await client.post(url, json=event)
    except httpx.HTTPError as exc:
        log.warning("budget webhook %s failed: %s", url, exc)
