"""Replica selection and health for upstream pools: least outstanding requests, active health
checks, passive ejection, re-admission.

A replica is *in rotation* when its last active check passed and it is not ejected. Passive
ejection: a connection failure ejects at once (the process is gone or not listening);
``max_failures`` consecutive server errors or timeouts eject too. An ejected replica comes back
after ``eject_seconds`` once an active ``/health`` check passes again; it may have restarted, so
everything remembered about it (loaded adapters) is forgotten at that point.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from gateway.config import HealthPolicy

log = logging.getLogger("ragline.replicas")


@dataclass(eq=False)
class Replica:
    url: str
    outstanding: int = 0
    healthy: bool = False  # set by the first active check
    failures: int = 0
    ejected_until: float = 0.0
    checked: bool = False
    on_readmit: list[Callable[[Replica], None]] = field(default_factory=list)

    def in_rotation(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until


class ReplicaPool:
    def __init__(self, urls: Iterable[str], policy: HealthPolicy) -> None:
        self.replicas = [Replica(url) for url in urls]
        self.policy = policy
        self._task: asyncio.Task[None] | None = None
        self._checked = asyncio.Event()

    # -- selection -----------------------------------------------------------------------------

    def available(self, exclude: set[Replica] | None = None) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas if r.in_rotation(now) and r not in (exclude or set())]

    def pick(self, candidates: list[Replica]) -> Replica:
        """Least outstanding requests; ties broken at random so load spreads."""
        least = min(r.outstanding for r in candidates)
        return random.choice([r for r in candidates if r.outstanding == least])

    @property
    def any_healthy(self) -> bool:
        now = time.monotonic()
        return any(r.in_rotation(now) for r in self.replicas)

    def retry_after(self) -> int:
        """Seconds until an ejected replica may come back (at least one health interval)."""
        now = time.monotonic()
        waits = [r.ejected_until - now for r in self.replicas if r.ejected_until > now]
        return max(1, int(min(waits, default=self.policy.interval) + 0.999))

    # -- passive health ------------------------------------------------------------------------

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0

    def failed(self, replica: Replica, *, connection: bool, reason: str) -> None:
        replica.failures += 1
        if connection or replica.failures >= self.policy.max_failures:
            if replica.in_rotation(time.monotonic()):
                log.warning("ejecting replica %s: %s", replica.url, reason)
            replica.healthy = False
            replica.ejected_until = time.monotonic() + self.policy.eject_seconds

    # -- active health -------------------------------------------------------------------------

    def start(self, check: Callable[[Replica], Awaitable[bool]]) -> None:
        self._task = asyncio.create_task(self._loop(check), name="replica-health")

    async def wait_checked(self) -> None:
        await self._checked.wait()

    async def _loop(self, check: Callable[[Replica], Awaitable[bool]]) -> None:
        while True:
            await asyncio.gather(*(self._check_one(r, check) for r in self.replicas))
            self._checked.set()
            await asyncio.sleep(self.policy.interval)

    async def _check_one(
        self, replica: Replica, check: Callable[[Replica], Awaitable[bool]]
    ) -> None:
        try:
            ok = await asyncio.wait_for(check(replica), self.policy.timeout)
        except Exception:
            ok = False
        now = time.monotonic()
        if ok and not replica.healthy and now >= replica.ejected_until:
            if replica.checked:
                log.info("re-admitting replica %s", replica.url)
            replica.healthy = True
            replica.failures = 0
            for hook in replica.on_readmit:
                hook(replica)
        elif not ok and replica.healthy:
            log.warning("replica %s failed its health check", replica.url)
            replica.healthy = False
        replica.checked = True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
