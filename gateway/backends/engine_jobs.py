"""What the embedded engine's scheduler (``scheduler.py``) works on: a submitted request
(``Job``) and each of its choices (``Sequence``), and the events a request's queue receives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.backends.base import Chunk, GenerationParams, TokenInfo, Usage
from gateway.backends.detokenize import IncrementalDetokenizer, StopStrings
from gateway.backends.grammar import Grammar
from gateway.backends.sampling import Sampler

Event = Chunk | Usage | Exception


@dataclass(eq=False)
class Job:
    """A submitted request as the scheduler sees it."""

    prompt_ids: list[int]
    params: GenerationParams
    n: int
    max_tokens: int
    queue: asyncio.Queue[Event]
    adapter: int = 0  # the runner's adapter index; 0: the base model
    tenant: str = ""  # prefix-cache scope: blocks are shared only between equal tenants

    @property
    def cache_salt(self) -> bytes:
        """What a block's hash is salted with: the adapter (its keys and values differ) and the
        tenant (``prefix_cache_scope: key``)."""
        return f"{self.adapter}\0{self.tenant}".encode()

    grammar: Grammar | None = None  # structured output: every choice follows it
    cancelled: bool = False
    completion_tokens: int = 0
    unfinished: int = 0


@dataclass(eq=False)
class Sequence:
    """One choice of a job: its tokens, its blocks in the KV cache and its output state."""

    job: Job
    index: int
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    tokens: list[int]  # prompt and generated tokens; the first ``position`` are in the cache
    position: int
    table: list[int] = field(default_factory=list)  # the KV blocks, in order
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks, chained
    generated: int = 0
    finished: bool = False
    held_tokens: list[TokenInfo] = field(default_factory=list)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]
