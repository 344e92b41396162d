"""A/B experiments: weighted variants, assigned deterministically and stickily per user.

A unit (the request's ``user`` field, else the API key id) is hashed with the experiment's name
(SHA-256, first 8 bytes) to a point in [0, 1); the variant whose cumulative weight interval holds
the point serves it. The same unit always gets the same variant while the weights stay the same,
different experiments assign independently, and no state is stored to make it sticky.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prompts.template import NAME


class VariantParams(BaseModel):
    """Sampling settings a variant sets (they override the request's)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    weight: float = Field(gt=0)
    template: str | None = Field(default=None, description="Template reference for this arm.")
    params: VariantParams = Field(default_factory=VariantParams)


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    unit: Literal["user", "key"] = Field(
        default="user", description="Assign by the request's `user` field (else the key) or key."
    )
    variants: list[Variant] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[Variant]) -> list[Variant]:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique within an experiment")
        return variants

    def assign(self, unit_id: str) -> Variant:
        point = bucket(self.name, unit_id)
        total = sum(v.weight for v in self.variants)
        edge = 0.0
        for variant in self.variants:
            edge += variant.weight / total
            if point < edge:
                return variant
        return self.variants[-1]


def bucket(experiment: str, unit_id: str) -> float:
    digest = hashlib.sha256(f"{experiment}\x00{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Outcomes:
    """Which experiment arm answered which request, for ``POST /v1/feedback``.

    Kept in Redis when the gateway shares state (any replica can take the feedback), else in a
    bounded in-process map; entries expire after ``ttl`` seconds.
    """

    def __init__(self, redis: Any | None, ttl: int = 7 * 24 * 3600, max_entries: int = 100_000):
        self.redis = redis
        self.ttl = ttl
        self.max_entries = max_entries
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def remember(self, request_ids: list[str], value: str) -> None:
        ids = [i for i in request_ids if i]
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            for rid in ids:
                pipe.set(f"ragline:outcome:{rid}", value, ex=self.ttl)
            await pipe.execute()
            return
        now = time.monotonic()
        for rid in ids:
            self._local[rid] = (now + self.ttl, value)
            self._local.move_to_end(rid)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)

    async def lookup(self, request_id: str) -> str | None:
        if self.redis is not None:
            raw = await self.redis.get(f"ragline:outcome:{request_id}")
            return raw.decode() if isinstance(raw, bytes) else raw
        hit = self._local.get(request_id)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]
