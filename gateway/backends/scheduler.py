"""Continuous batching for the embedded engine: one thread that owns the model.

Requests wait in a bounded queue; between two decode steps the scheduler admits as many as fit in
``max_batch`` slots (a request with ``n`` choices takes ``n`` slots: its prompt is prefilled once
and the cache copied), prefills the new prompts together in one padded forward pass, then decodes
one token for every running sequence in a single forward pass. Finished and cancelled sequences
leave at once and the last running sequence moves into the freed slot, so the batch always occupies
slots ``0..n-1``.

Events (``Chunk``, ``Usage`` or an exception) are handed to the asyncio loop once per step with
one ``call_soon_threadsafe``; each request's events land in its own ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Chunk, GenerationParams, TokenInfo, Usage
from gateway.backends.detokenize import IncrementalDetokenizer, StopStrings
from gateway.backends.grammar import Grammar
from gateway.backends.llama import LlamaRunner
from gateway.backends.sampling import Sampler, TokenChoice, sample_batch
from gateway.errors import BackendError, InvalidRequest, Overloaded

log = logging.getLogger("ragline.engine")

Event = Chunk | Usage | Exception

# Padded prompt tokens per prefill pass: one pass for several short prompts (far cheaper than one
# pass each on a memory-bound CPU), several passes for long ones (bounded activation memory).
PREFILL_TOKEN_BUDGET = 4096


@dataclass(eq=False)
class Job:
    """A submitted request as the scheduler sees it."""

    prompt_ids: list[int]
    params: GenerationParams
    n: int
    max_tokens: int
    queue: asyncio.Queue[Event]
    adapter: int = 0  # the runner's adapter index; 0: the base model
    grammar: Grammar | None = None  # structured output: every choice follows it
    cancelled: bool = False
    completion_tokens: int = 0
    unfinished: int = 0


@dataclass(eq=False)
class _Sequence:
    job: Job
    index: int
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    position: int  # tokens in this sequence's cache slot
    last_token: int = -1
    generated: int = 0
    finished: bool = False
    held_tokens: list[TokenInfo] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        runner: LlamaRunner,
        tokenizer: Any,
        *,
        eos_ids: frozenset[int],
        max_batch: int,
        max_waiting: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._runner = runner
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._max_batch = min(max_batch, runner.max_slots)
        self._max_waiting = max_waiting
        self._loop = loop
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[_Sequence] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ragline-engine", daemon=True)
        self._token_text: dict[int, str] = {}

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``Overloaded`` when the waiting queue is full."""
        with self._cv:
            if (
                len(self._waiting) >= self._max_waiting
                and self._busy_slots() + job.n > self._max_batch
            ):
                raise Overloaded(
                    "The embedded engine's queue is full; retry after a moment.", retry_after=1
                )
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def adapter_index(self, name: str) -> int | None:
        return self._runner.adapters.get(name)

    @property
    def load(self) -> tuple[int, int]:
        """(running sequences, waiting requests)."""
        return len(self._running), len(self._waiting)

    def _busy_slots(self) -> int:
        return len(self._running) + sum(j.n for j in self._waiting)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            events: list[tuple[Job, Event]] = []
            live = [job for job in admitted if not job.cancelled and self._acceptable(job, events)]
            try:
                if live:
                    self._prefill(live, events)
                if self._running:
                    self._decode(events)
            except Exception as exc:  # the model failed: fail every running request, keep serving
                log.exception("engine step failed")
                error = BackendError(f"The embedded engine failed: {type(exc).__name__}")
                failed = {s.job for s in self._running} | set(live)
                events.extend((job, error) for job in failed)  # none is left waiting forever
                for s in self._running:
                    s.finished = True
            self._reap()
            if events:
                self._loop.call_soon_threadsafe(_dispatch, events)
        self._fail_all(BackendError("The embedded engine is shutting down."))

    def _acceptable(self, job: Job, events: list[tuple[Job, Event]]) -> bool:
        """Build the job's samplers before it joins a batch: a request whose settings the
        sampler refuses fails alone, with a 400, instead of failing the step for everyone."""
        try:
            for index in range(job.n):
                Sampler(job.params, index=index, eos_ids=self._eos_ids, grammar=job.grammar)
        except (ValueError, RuntimeError, OverflowError) as exc:
            events.append((job, InvalidRequest(f"Invalid sampling settings: {exc}")))
            return False
        return True

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        free = self._max_batch - len(self._running)
        while self._waiting and (self._waiting[0].cancelled or self._waiting[0].n <= free):
            job = self._waiting.popleft()
            if not job.cancelled:
                free -= job.n
                admitted.append(job)
        return admitted

    def _prefill(self, jobs: list[Job], events: list[tuple[Job, Event]]) -> None:
        """Prefill newly admitted jobs, as few forward passes as the token budget allows."""
        group: list[Job] = []
        for job in jobs:
            longest = max([len(j.prompt_ids) for j in group] + [len(job.prompt_ids)])
            if group and longest * (len(group) + 1) > PREFILL_TOKEN_BUDGET:
                self._prefill_group(group, events)
                group = []
            group.append(job)
        if group:
            self._prefill_group(group, events)

    def _prefill_group(self, jobs: list[Job], events: list[tuple[Job, Event]]) -> None:
        first_slot = len(self._running)
        logits = self._runner.prefill(
            first_slot, [job.prompt_ids for job in jobs], [job.adapter for job in jobs]
        )
        # Slots first_slot + i hold job i's first choice; further choices get copies after them.
        per_job: list[list[_Sequence]] = [[] for _ in jobs]
        for i in range(len(jobs)):
            per_job[i].append(self._new_sequence(jobs[i], 0))
        for i, job in enumerate(jobs):
            for index in range(1, job.n):
                self._runner.move_slot(first_slot + i, len(self._running), len(job.prompt_ids))
                per_job[i].append(self._new_sequence(job, index))
        for i, job in enumerate(jobs):
            job.unfinished = job.n
            rows = logits[i].unsqueeze(0).expand(job.n, -1).clone()
            choices = sample_batch(rows, [s.sampler for s in per_job[i]])
            for seq, choice in zip(per_job[i], choices, strict=True):
                self._advance(seq, choice, events)

    def _new_sequence(self, job: Job, index: int) -> _Sequence:
        seq = _Sequence(
            job=job,
            index=index,
            sampler=Sampler(job.params, index=index, eos_ids=self._eos_ids, grammar=job.grammar),
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stops=StopStrings(job.params.stop),
            position=len(job.prompt_ids),
        )
        self._running.append(seq)
        return seq

    def _decode(self, events: list[tuple[Job, Event]]) -> None:
        live = [s for s in self._running if not s.finished]
        if len(live) != len(self._running):
            self._reap()
            live = self._running
        if not live:
            return
        logits = self._runner.decode([s.last_token for s in live], [s.position for s in live])
        choices = sample_batch(logits, [s.sampler for s in live])
        for seq, choice in zip(live, choices, strict=True):
            seq.position += 1
            self._advance(seq, choice, events)

    def _advance(
        self, seq: _Sequence, choice: TokenChoice, events: list[tuple[Job, Event]]
    ) -> None:
        job = seq.job
        token = choice.token_id
        seq.last_token = token
        seq.generated += 1
        job.completion_tokens += 1
        if choice.logprob is not None:
            seq.held_tokens.append(self._token_info(choice))
        finish: str | None = None
        if token in self._eos_ids and not job.params.ignore_eos:
            finish = "stop"
            text, hit = seq.stops.feed(seq.detokenizer.flush())
            if not hit:
                text += seq.stops.flush()
        else:
            text, hit = seq.stops.feed(seq.detokenizer.add(token))
            if hit:
                finish = "stop"
            elif seq.generated >= job.max_tokens or seq.position >= self._runner.max_len:
                tail, hit = seq.stops.feed(seq.detokenizer.flush())
                text += tail if hit else tail + seq.stops.flush()
                finish = "stop" if hit else "length"
        if text or finish:
            tokens = seq.held_tokens if job.params.logprobs else None
            seq.held_tokens = []
            events.append((job, Chunk(seq.index, text, finish, tokens)))
        if finish:
            seq.finished = True
            job.unfinished -= 1
            if job.unfinished == 0:
                events.append((job, Usage(len(job.prompt_ids), job.completion_tokens)))

    def _token_info(self, choice: TokenChoice) -> TokenInfo:
        assert choice.logprob is not None
        top = tuple((self._text_of(t), lp) for t, lp in choice.top or ())
        return TokenInfo(self._text_of(choice.token_id), choice.logprob, top)

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self._tokenizer.decode([token_id]))
        return text

    def _reap(self) -> None:
        """Drop finished and cancelled sequences, moving the last ones into their slots."""
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            if seq.finished or seq.job.cancelled:
                last = self._running.pop()
                if last is not seq:
                    self._runner.move_slot(len(self._running), i, last.position)
                    self._running[i] = last
                continue
            i += 1

    def _fail_all(self, error: Exception) -> None:
        with self._cv:
            jobs = {s.job for s in self._running} | set(self._waiting)
            self._waiting.clear()
            self._running.clear()
        if jobs:
            events: list[tuple[Job, Event]] = [(job, error) for job in jobs]
            self._loop.call_soon_threadsafe(_dispatch, events)


def _dispatch(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        if not job.cancelled:
            job.queue.put_nowait(event)


def on_cpu_with_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
