"""Continuous batching for the embedded engine: one thread that owns the model and its KV cache.

Requests wait in a bounded queue. Between two decode steps the scheduler admits waiting requests
while the batch is under ``max_batch`` sequences (a cap) and the paged KV cache (``kv_blocks.py``)
has free blocks for their prompts: a prompt that starts with blocks already cached (the same
system prompt, few-shot examples or chat history) takes those and computes only the rest. New
prompts are prefilled together in padded forward passes, then one token is decoded for every
running sequence in a single forward pass. A request with ``n`` choices is prefilled once; its
choices share the prompt's full blocks and each gets a copy of the partial last one.

When a decode step needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are released (the full ones stay in the prefix cache) and it waits at the
head of the queue; when memory frees up it is resumed by recomputing its tokens (mostly prefix
hits), then decodes on from where it stopped, with its sampler and detokenizer untouched. Memory
pressure slows requests down; it never fails them.

Events (``Chunk``, ``Usage`` or an exception) are handed to the asyncio loop once per step with
one ``call_soon_threadsafe`` (and once after a prefill, so that a first token does not wait for
the decode step that follows it); each request's events land in its own ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

from gateway.backends.base import Chunk, TokenInfo, Usage
from gateway.backends.detokenize import IncrementalDetokenizer, StopStrings
from gateway.backends.engine_jobs import Event, Job, Sequence
from gateway.backends.kv_blocks import BlockPool, block_hashes
from gateway.backends.llama import LlamaRunner, PrefillItem
from gateway.backends.sampling import Sampler, TokenChoice, sample_batch
from gateway.errors import BackendError, InvalidRequest, Overloaded

log = logging.getLogger("ragline.engine")

# Padded prompt tokens per prefill pass: one pass for several short prompts (far cheaper than one
# pass each on a memory-bound CPU), several passes for long ones (bounded activation memory).
PREFILL_TOKEN_BUDGET = 4096


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
        prefix_caching: bool = True,
    ) -> None:
        """Built by the engine thread, which loaded the model and then calls ``run()``."""
        self._runner = runner
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._max_batch = min(max_batch, runner.max_slots)
        self._max_waiting = max_waiting
        self._loop = loop
        self.pool = BlockPool(runner.num_blocks, runner.block_size, prefix_caching=prefix_caching)
        self._bs = runner.block_size
        # new work leaves this many blocks free while others run, so that running sequences can
        # grow for a while before one is preempted (vLLM's watermark)
        self._watermark = max(1, runner.num_blocks // 100)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._preempted: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._starting: list[Sequence] = []  # admitted, prompt not yet computed
        self._stopping = False
        self._thread = threading.current_thread()
        self._token_text: dict[int, str] = {}
        self.peak_batch = 0  # the most sequences decoded in one step so far

    # -- called from the event loop ------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, in the thread that built the scheduler."""
        assert threading.current_thread() is self._thread
        self._run()

    def request_stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def stop(self) -> None:
        self.request_stop()
        if self._thread.is_alive():
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
        """(running sequences, waiting requests and preempted sequences)."""
        return len(self._running), len(self._waiting) + len(self._preempted)

    def _busy_slots(self) -> int:
        return len(self._running) + len(self._preempted) + sum(j.n for j in self._waiting)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait()
                if self._stopping:
                    break
                events: list[tuple[Job, Event]] = []
                live, resumed = self._admit(events)
            try:
                if live or resumed:
                    self._prefill(live, resumed, events)
                    if events:  # first tokens go out now, not after the next decode step
                        self._loop.call_soon_threadsafe(_dispatch, events)
                        events = []
                if self._running:
                    self._decode(events)
            except Exception as exc:  # the model failed: fail every running request, keep serving
                log.exception("engine step failed")
                error = BackendError(f"The embedded engine failed: {type(exc).__name__}")
                failed = {s.job for s in self._running} | set(live) | {s.job for s in resumed}
                events.extend((job, error) for job in failed)  # none is left waiting forever
                for s in self._running:
                    s.finished = True
                for s in resumed:
                    self.pool.release(s.table)
                    s.table = []
            self._reap()
            if events:
                self._loop.call_soon_threadsafe(_dispatch, events)
        self._fail_all(BackendError("The embedded engine is shutting down."))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._preempted)

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

    # -- admission -----------------------------------------------------------------------------

    @property
    def _reserve(self) -> int:
        """Blocks new work leaves free while others run (the watermark)."""
        return self._watermark if self._running else 0

    def _admit(self, events: list[tuple[Job, Event]]) -> tuple[list[Job], list[Sequence]]:
        """Preempted sequences first, then waiting jobs in order, while they fit. A job whose
        sampling settings are refused fails here (``events``)."""
        resumed: list[Sequence] = []
        budget = PREFILL_TOKEN_BUDGET * 4  # tokens computed by the prefill of one step
        while self._preempted:
            seq = self._preempted[0]
            if seq.job.cancelled:
                self._preempted.popleft()
                continue
            plan = self.pool.plan(seq.tokens[: seq.position], seq.job.cache_salt, keep_one=False)
            full = len(self._running) + len(resumed) >= self._max_batch
            if full or not self.pool.fits(plan, 0, self._reserve):
                return [], resumed
            self._preempted.popleft()
            seq.table, seq.hashes = self.pool.take(plan), plan.hashes
            seq.position = len(plan.hits) * self._bs
            resumed.append(seq)
            budget -= len(plan.tokens) - len(plan.hits) * self._bs
        admitted: list[Job] = []
        busy = len(self._running) + len(resumed)
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if busy + job.n > self._max_batch or (admitted and budget <= 0):
                break
            plan = self.pool.plan(job.prompt_ids, job.cache_salt, keep_one=True)
            partial = 1 if len(job.prompt_ids) % self._bs else 0
            if not self.pool.fits(plan, (job.n - 1) * partial, self._reserve):
                break
            self._waiting.popleft()
            if not self._acceptable(job, events):
                continue
            self.pool.stats.queried_tokens += len(job.prompt_ids)
            self.pool.stats.hit_tokens += len(plan.hits) * self._bs
            job.unfinished = job.n
            seq = self._new_sequence(job, 0)
            seq.table, seq.hashes = self.pool.take(plan), plan.hashes
            seq.position = len(plan.hits) * self._bs  # cached so far; prefill computes the rest
            admitted.append(job)
            busy += job.n
            budget -= len(job.prompt_ids) - seq.position
        return admitted, resumed

    # -- prefill -------------------------------------------------------------------------------

    def _prefill(
        self, jobs: list[Job], resumed: list[Sequence], events: list[tuple[Job, Event]]
    ) -> None:
        """Compute what admitted jobs and resumed sequences lack, in as few forward passes as
        the token budget allows; sample each job's first token."""
        pending = {id(s.job): s for s in self._admitted_firsts(jobs)}
        work = [s for s in resumed if s.position < len(s.tokens) - 1] + list(pending.values())
        group: list[Sequence] = []
        for seq in work:
            longest = max([self._todo(s) for s in group] + [self._todo(seq)])
            if group and longest * (len(group) + 1) > PREFILL_TOKEN_BUDGET:
                self._prefill_group(group, pending, events)
                group = []
            group.append(seq)
        if group:
            self._prefill_group(group, pending, events)
        for seq in resumed:
            seq.position = len(seq.tokens) - 1
            self._running.append(seq)

    def _admitted_firsts(self, jobs: list[Job]) -> list[Sequence]:
        wanted = {id(job) for job in jobs}
        return [s for s in self._starting if id(s.job) in wanted]

    def _todo(self, seq: Sequence) -> int:
        """Tokens of ``seq`` still to compute: a new prompt's whole remainder; a resumed
        sequence's all but its pending last token."""
        end = len(seq.tokens) if seq.job.unfinished and seq.generated == 0 else len(seq.tokens) - 1
        return end - seq.position

    def _prefill_group(
        self,
        group: list[Sequence],
        pending: dict[int, Sequence],
        events: list[tuple[Job, Event]],
    ) -> None:
        items = []
        for seq in group:
            end = seq.position + self._todo(seq)
            items.append(
                PrefillItem(
                    seq.tokens[seq.position : end], seq.position, seq.table, seq.job.adapter
                )
            )
        logits = self._runner.prefill(items)
        for row, seq in enumerate(group):
            seq.position += len(items[row].tokens)
            self._register_full_blocks(seq)
            if pending.get(id(seq.job)) is seq:
                self._start_job(seq, logits[row], events)

    def _start_job(self, first: Sequence, logits: Any, events: list[tuple[Job, Event]]) -> None:
        """A job's prompt is in the cache: fork its other choices, sample every first token."""
        job = first.job
        self._starting.remove(first)
        choices = [first]
        partial = first.position % self._bs
        for index in range(1, job.n):
            seq = self._new_sequence(job, index)
            self._starting.remove(seq)
            full = first.table[: first.position // self._bs]
            for block in full:
                self.pool.share(block)
            seq.table = list(full)
            if partial:
                copy = self.pool.allocate()
                assert copy is not None  # admission reserved it
                self._runner.copy_block(first.table[len(full)], copy)
                seq.table.append(copy)
            seq.hashes, seq.position = list(first.hashes), first.position
            choices.append(seq)
        self._running.extend(choices)
        rows = logits.unsqueeze(0).expand(job.n, -1).clone()
        for seq, choice in zip(
            choices, sample_batch(rows, [s.sampler for s in choices]), strict=True
        ):
            self._advance(seq, choice, events)

    def _new_sequence(self, job: Job, index: int) -> Sequence:
        seq = Sequence(
            job=job,
            index=index,
            sampler=Sampler(job.params, index=index, eos_ids=self._eos_ids, grammar=job.grammar),
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            stops=StopStrings(job.params.stop),
            tokens=list(job.prompt_ids),
            position=0,
        )
        self._starting.append(seq)
        return seq

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks that ``seq`` has filled so later prompts can reuse them."""
        full = seq.position // self._bs
        if len(seq.hashes) < full:
            start = seq.hashes[-1] if seq.hashes else b""
            done = len(seq.hashes) * self._bs
            seq.hashes += block_hashes(
                seq.tokens[done : full * self._bs], self._bs, seq.job.cache_salt, start
            )
        for i in range(full):
            self.pool.register(seq.table[i], seq.hashes[i])

    # -- decode --------------------------------------------------------------------------------

    def _decode(self, events: list[tuple[Job, Event]]) -> None:
        if any(s.finished or s.job.cancelled for s in self._running):
            self._reap()
        self._grow()
        live = self._running
        if not live:
            return
        self.peak_batch = max(self.peak_batch, len(live))
        logits = self._runner.decode(
            [s.last_token for s in live],
            [s.position for s in live],
            [s.table for s in live],
            [s.job.adapter for s in live],
        )
        choices = sample_batch(logits, [s.sampler for s in live])
        for seq, choice in zip(list(live), choices, strict=True):
            seq.position += 1
            if seq.position % self._bs == 0:
                self._register_full_blocks(seq)
            self._advance(seq, choice, events)

    def _grow(self) -> None:
        """Give every running sequence the block its next token goes to, preempting the most
        recently admitted sequences while none is free."""
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            if seq.position // self._bs < len(seq.table):
                i += 1
                continue
            block = self.pool.allocate()
            if block is None:
                self._preempt(self._running[-1])
                continue  # retry this sequence (or stop, if it was the one preempted)
            seq.table.append(block)
            i += 1

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.pool.release(seq.table)
        seq.table, seq.hashes = [], []
        seq.position = len(seq.tokens) - 1  # what resuming must recompute, up to here
        self._preempted.appendleft(seq)
        self.pool.stats.preemptions += 1
        log.info("KV cache full: preempted a sequence of %d tokens", len(seq.tokens))

    def _advance(self, seq: Sequence, choice: TokenChoice, events: list[tuple[Job, Event]]) -> None:
        job = seq.job
        token = choice.token_id
        seq.tokens.append(token)
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
        """Drop finished and cancelled sequences and release their blocks."""
        keep = []
        for seq in self._running:
            if seq.finished or seq.job.cancelled:
                self.pool.release(seq.table)
                seq.table = []
            else:
                keep.append(seq)
        self._running = keep
        for seq in self._starting:  # a failed prefill leaves these behind
            self.pool.release(seq.table)
            seq.table = []
        self._starting.clear()

    def _fail_all(self, error: Exception) -> None:
        with self._cv:
            jobs = (
                {s.job for s in self._running}
                | set(self._waiting)
                | {s.job for s in self._preempted}
            )
            self._waiting.clear()
            self._running.clear()
            self._preempted.clear()
        if jobs:
            events: list[tuple[Job, Event]] = [(job, error) for job in jobs]
            self._loop.call_soon_threadsafe(_dispatch, events)


def _dispatch(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        if not job.cancelled:
            job.queue.put_nowait(event)
