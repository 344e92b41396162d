"""Pipeline steps 3 (admit), 7a (cache lookup) and 9 (settle) for one request.

``Admission.admit`` runs before anything costly: the key's ``max_tokens`` rule, then the rate
limit reservation (one Redis round trip, shared with other requests of the same moment).
``Admission.lookup`` finds a deterministic request's answer in the cache, after the request is
rendered. ``Ticket.settle`` runs once the response has been sent: the real usage settles the
token bucket (queued for the next Redis call), the answer is counted in Prometheus, the access
log gets its fields, and hooks (per-variant metrics of templates) run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.auth import Principal
from gateway.budgets import BudgetExceeded, BudgetReservation, Budgets, price_of
from gateway.cache import CachedResponse, ResponseCache, cache_key, is_deterministic
from gateway.call import Call, message_text, requested_max_tokens
from gateway.config import Settings
from gateway.errors import InvalidRequest, RaglineError
from gateway.ledger_db import UsageRecord
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter, Reservation

if TYPE_CHECKING:
    from gateway.ledger import Ledger

log = logging.getLogger("ragline.admission")


def estimate_prompt_tokens(body: dict[str, Any] | Any) -> int:
    """A cheap estimate (≈ 3 characters per token plus message framing) used only to reserve
    TPM; the real usage settles the difference."""
    messages = body.get("messages")
    if messages is not None:
        return sum(len(message_text(m)) for m in messages) // 3 + 8 * len(messages)
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return len(prompt) // 3 + 4
    if prompt and isinstance(prompt[0], int):
        return len(prompt) + 4
    return sum(len(p) // 3 if isinstance(p, str) else len(p) for p in prompt) + 4


@dataclass
class Ticket:
    """One admitted request, from its reservation to its settlement."""

    admission: Admission
    principal: Principal
    endpoint: str
    model: str
    reservation: Reservation
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_result: str = "bypass"
    response_id: str | None = None
    served_by: str | None = None  # the backend that answered (a fallback's name, maybe)
    request_id: str = ""
    adapter: str | None = None  # for the usage ledger
    variant: str | None = None  # experiment/variant (or the template) of a templated request
    budget: BudgetReservation | None = None
    settled: bool = False
    # run once the request is settled: (status, (prompt_tokens, completion_tokens))
    hooks: list[Callable[[int, tuple[int, int]], Awaitable[None]]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        h = self.reservation.headers()
        if self.budget is not None:
            h.update(self.budget.headers())
        h["X-Ragline-Cache"] = self.cache_result
        if self.served_by is not None and self.served_by != self.model:
            h["X-Ragline-Backend"] = self.served_by
        return h

    def log_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cache": self.cache_result,
        }

    def usage_record(self, status: int, ttft: float | None, elapsed: float) -> UsageRecord:
        now = time.time()
        ledger = self.admission.ledger
        assert ledger is not None
        return UsageRecord(
            request_id=self.request_id or uuid.uuid4().hex,
            ts=now,
            day=time.strftime("%Y-%m-%d", time.gmtime(now)),
            key_id=self.principal.key_id,
            team=self.principal.policy.team,
            model=self.model,
            route=self.endpoint.rsplit("/", 1)[-1],
            served_by=self.served_by,
            adapter=self.adapter,
            variant=self.variant,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached=self.cache_result == "hit",
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            ttft_ms=None if ttft is None else round(ttft * 1000, 3),
            cost=price_of(ledger.prices, self.model, self.prompt_tokens, self.completion_tokens),
        )

    async def settle(self, status: int, ttft: float | None = None) -> None:
        """Step 9, once: settle the token bucket, count, run the hooks. Never raises."""
        if self.settled:
            return
        self.settled = True
        a = self.admission
        try:
            used = self.prompt_tokens + self.completion_tokens
            await a.limiter.settle(self.reservation, used)
            if self.budget is not None and a.budgets is not None:
                cost = price_of(a.budgets.prices, self.model, self.prompt_tokens,
                                self.completion_tokens)  # fmt: skip
                await a.budgets.settle(self.budget, self.model, used, cost)
            elapsed = time.perf_counter() - self.started
            m, key = a.metrics, self.principal.key_id
            m.child(m.requests, self.endpoint, self.model, key, str(status)).inc()
            m.child(m.latency, self.endpoint, self.model).observe(elapsed)
            if self.prompt_tokens:
                m.child(m.prompt_tokens, self.model, key).inc(self.prompt_tokens)
            if self.completion_tokens:
                m.child(m.completion_tokens, self.model, key).inc(self.completion_tokens)
            if ttft is not None:
                m.child(m.ttft, self.model).observe(ttft)
                if self.completion_tokens > 1:
                    tpot = (elapsed - ttft) / (self.completion_tokens - 1)
                    m.child(m.tpot, self.model).observe(tpot)
            if a.ledger is not None:
                a.ledger.add(self.usage_record(status, ttft, elapsed))
            for hook in self.hooks:
                await hook(status, (self.prompt_tokens, self.completion_tokens))
        except Exception:  # the answer was sent; a failure here must not become the client's
            log.exception("settling request failed")


class Admission:
    def __init__(
        self, settings: Settings, limiter: RateLimiter, cache: ResponseCache, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.cache = cache
        self.metrics = metrics
        self.ledger: Ledger | None = None  # set by the lifespan when the ledger is on
        self.budgets: Budgets | None = None  # set by the lifespan

    async def admit(self, call: Call) -> Call:
        """Step 3: the key's ``max_tokens`` rule (its limit, and the default it sets), then the
        reservation. Raises ``InvalidRequest`` or ``RateLimited`` (or ``Overloaded`` when the
        limiter cannot be reached and fails closed)."""
        principal, body = call.principal, call.body
        policy = principal.policy
        requested = requested_max_tokens(body)
        if policy.max_tokens is not None:
            if requested is not None and requested > policy.max_tokens:
                raise InvalidRequest(
                    f"max_tokens={requested} is above this key's limit of {policy.max_tokens}.",
                    param="max_tokens",
                    code="max_tokens_exceeded",
                )
            if requested is None:
                requested = policy.max_tokens
                body = call.with_body(max_tokens=requested)
        n = max(1, int(body.get("n") or 1))
        prompts = body.get("prompt")
        batch = len(prompts) if isinstance(prompts, list) and not _is_ids(prompts) else 1
        completion = int(requested or self.settings.default_reserve_tokens) * n * batch
        cost = estimate_prompt_tokens(body) * n + completion
        try:
            reservation = await self.limiter.reserve(principal.key_id, policy, cost)
        except RaglineError as exc:
            if exc.status_code == 429:
                self.metrics.rate_limited.labels(principal.key_id).inc()
            raise
        budget = await self.reserve_budget(principal, call.model, cost, reservation)
        ticket = Ticket(self, principal, call.endpoint, call.model, reservation, call.started)
        ticket.budget = budget
        ticket.request_id = call.request_id
        target = call.target
        if target is not None and target.adapter is not None:
            ticket.adapter = target.adapter.name
        return call.evolve(body=body, ticket=ticket)

    async def reserve_budget(
        self, principal: Principal, model: str, tokens: int, reservation: Reservation
    ) -> BudgetReservation | None:
        """The key's and its team's budgets for ``tokens`` (of ``model``); on a refusal the
        rate-limit reservation is given back before the 429 goes out."""
        if self.budgets is None:
            return None
        policy = principal.policy
        try:
            return await self.budgets.reserve(
                principal.key_id, policy.team, model, tokens, policy.budget
            )
        except BudgetExceeded:
            await self.limiter.settle(reservation, 0)
            raise

    async def lookup(self, call: Call) -> tuple[Call, CachedResponse | None]:
        """Step 7a: the cache key of the rendered request, and the cached answer, if any."""
        ticket, target = call.ticket, call.target
        assert ticket is not None and target is not None
        if call.shaped is not None:
            experiment, arm, template = call.shaped.labels
            ticket.variant = f"{experiment}/{arm}" if experiment else template
        if not (ticket.principal.policy.cache and is_deterministic(call.body)):
            return call, None
        variant = _variant(call)
        adapter = target.adapter.name if target.adapter else None
        key = cache_key(call.endpoint, call.body, target.base, adapter, variant)
        ticket.cache_result = "miss"
        call = call.evolve(cache_key=key)
        if call.no_cache:
            return call, None
        hit = await self.cache.get(key)
        self.metrics.cache.labels("hit" if hit else "miss").inc()
        if hit is not None:
            ticket.cache_result = "hit"
            ticket.prompt_tokens = hit.prompt_tokens
            ticket.completion_tokens = hit.completion_tokens
        return call, hit

    async def store(self, call: Call, kind: str, payload: bytes) -> None:
        """Keep a complete answer for the next identical request (before it is sent, so a
        client that got it can rely on the next one hitting)."""
        ticket = call.ticket
        if call.cache_key is None or ticket is None:
            return
        entry = CachedResponse(kind, payload, ticket.prompt_tokens, ticket.completion_tokens)
        await self.cache.put(call.cache_key, entry)


def _variant(call: Call) -> dict[str, str] | None:
    """What, beyond the rendered request, makes an answer: the safety policy, and when the
    answer carries the client's own values back (placeholders restored), whose values they
    are: the key, the ``user`` and the values themselves. Without that, a second client sending
    the same words around other values would be served the first one's."""
    screened = call.screened
    if screened is None:
        return None
    variant = {"safety": screened.policy}
    holder = screened.output.placeholders if screened.output is not None else None
    if holder is not None and holder.forward:
        values = json.dumps(sorted(holder.forward.items())).encode()
        variant["key"] = call.principal.key_id
        variant["user"] = str(call.request.user or "")
        variant["values"] = hashlib.sha256(values).hexdigest()
    return variant


def _is_ids(value: list[Any]) -> bool:
    return bool(value) and isinstance(value[0], int)
