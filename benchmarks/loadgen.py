"""An async load generator for OpenAI-compatible servers (the gateway, vLLM, anything).

Closed loop (``concurrency`` requests in flight) or open loop (``rate`` requests/s with Poisson
arrivals, or gamma arrivals with a ``burstiness`` factor: < 1 burstier, > 1 steadier, as in
``vllm bench serve``). Warm-up requests run first and are not recorded. Every run is bounded by a
request count and a time limit. Streaming requests always ask for ``include_usage`` so output
tokens come from the server's own count.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.metrics import RequestRecord


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    prompt_tokens: int = 0  # an estimate; the server's usage replaces it


@dataclass
class LoadSpec:
    base_url: str  # ".../v1"
    model: str
    api_key: str | None = None
    endpoint: str = "chat"  # "chat" or "completions"
    stream: bool = True
    concurrency: int | None = 1
    rate: float | None = None  # requests/s; when set, open loop
    burstiness: float = 1.0
    num_requests: int = 32
    warmup: int = 2
    max_seconds: float = 600.0
    adapters: list[str] = field(default_factory=list)  # models assigned round-robin
    ignore_eos: bool = True
    temperature: float = 0.0
    # Measure generation, not ragline's response cache (deterministic requests would hit it).
    headers: dict[str, str] = field(default_factory=lambda: {"Cache-Control": "no-cache"})

    def models(self) -> Iterable[str]:
        return itertools.cycle(self.adapters or [self.model])


# -- datasets ---------------------------------------------------------------------------------

_WORDS = (
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
)


def random_prompts(
    n: int, input_len: int, output_len: int, seed: int = 0, tokenizer: Any | None = None
) -> list[Prompt]:
    """``n`` prompts of about ``input_len`` tokens (exact with a tokenizer) asking for
    ``output_len`` tokens each."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(input_len)]
        text = " ".join(words)
        if tokenizer is not None:
            ids = tokenizer.encode(text, add_special_tokens=False)[:input_len]
            text = tokenizer.decode(ids)
        prompts.append(Prompt(text, output_len, input_len))
    return prompts


def jsonl_prompts(path: Path, output_len: int) -> list[Prompt]:
    """One prompt per line: ``{"prompt": ...}`` or ``{"messages": [...]}``-style ``{"text": ...}``;
    an optional ``max_tokens`` per line overrides ``output_len``."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row.get("prompt") or row.get("text") or row["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'prompt'") from exc
        prompts.append(Prompt(str(text), int(row.get("max_tokens", output_len))))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def scifact_questions(data_dir: Path, n: int, output_len: int) -> list[Prompt]:
    """SciFact claims (BEIR ``queries.jsonl``) as questions, for RAG load."""
    prompts = []
    with (data_dir / "queries.jsonl").open() as f:
        for line in f:
            claim = json.loads(line)["text"]
            prompts.append(
                Prompt(f"Is this claim supported by the literature? {claim}", output_len)
            )
            if len(prompts) == n:
                break
    return prompts


_ERROR_BODY_CHARS = 500

# -- one request ------------------------------------------------------------------------------


def _body(spec: LoadSpec, prompt: Prompt, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": prompt.max_tokens,
        "temperature": spec.temperature,
        "stream": spec.stream,
    }
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(
    session: aiohttp.ClientSession, spec: LoadSpec, prompt: Prompt, model: str, label: str = ""
) -> RequestRecord:
    url = spec.base_url.rstrip("/") + (
        "/chat/completions" if spec.endpoint == "chat" else "/completions"
    )
    headers = {"Content-Type": "application/json", **spec.headers}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    record = RequestRecord(
        start=time.perf_counter(), prompt_tokens=prompt.prompt_tokens, label=label
    )
    try:
        async with session.post(
            url, data=json.dumps(_body(spec, prompt, model)), headers=headers
        ) as response:
            if response.status != 200:
                body = (await response.read())[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
                record.error = f"HTTP {response.status}: {body.strip()}"
                record.e2e = time.perf_counter() - record.start
                return record
            if spec.stream:
                await _read_stream(response, record)
            else:
                payload = await response.json()
                record.ttft = time.perf_counter() - record.start
                usage = payload.get("usage") or {}
                record.output_tokens = int(usage.get("completion_tokens", 0))
                record.prompt_tokens = int(usage.get("prompt_tokens", record.prompt_tokens))
    except (TimeoutError, aiohttp.ClientError) as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    record.e2e = time.perf_counter() - record.start
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord) -> None:
    last = 0.0
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        payload = json.loads(line[6:])
        if "error" in payload:
            error = payload["error"]
            message = error.get("message") if isinstance(error, dict) else error
            record.error = f"stream error: {message}"
            return
        if payload.get("usage"):
            record.output_tokens = int(payload["usage"].get("completion_tokens", 0))
            record.prompt_tokens = int(payload["usage"].get("prompt_tokens", 0))
        for choice in payload.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or choice.get("text")
            if not text:
                continue
            now = time.perf_counter()
            if not record.ttft:
                record.ttft = now - record.start
            else:
                record.itl.append(now - last)
            record.chunk_times.append(now)
            last = now


# -- a run ------------------------------------------------------------------------------------


class RequestFailed(Exception):
    """A request failed and the run was not told to keep going (``keep_going``): what the
    server answered, so the run stops with the real cause instead of a table of failures."""

    def __init__(self, record: RequestRecord, url: str) -> None:
        super().__init__(f"a request to {url} failed: {record.error}")
        self.record = record


async def run(
    spec: LoadSpec,
    prompts: list[Prompt],
    label: str = "",
    show_progress: bool = True,
    seed: int = 0,
    keep_going: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Send ``spec.num_requests`` requests (after ``spec.warmup``); returns records, duration.
    ``keep_going=False``: the first failed request (warm-up included) raises ``RequestFailed``
    and cancels the rest."""
    if not prompts:
        raise ValueError("no prompts to send")
    limit = spec.concurrency if spec.rate is None else 0
    connector = aiohttp.TCPConnector(limit=limit or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.max_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        models = iter(spec.models())
        pool = itertools.cycle(prompts)
        if spec.warmup:
            warm = await asyncio.gather(
                *(send(session, spec, next(pool), next(models)) for _ in range(spec.warmup))
            )
            failed = [r for r in warm if not r.ok]
            if failed and not keep_going:
                raise RequestFailed(failed[0], spec.base_url)
        records: list[RequestRecord] = []
        progress = Progress(
            TextColumn(f"[bold]{label or spec.model}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not show_progress,
            transient=True,
        )
        deadline = time.perf_counter() + spec.max_seconds
        with progress:
            task = progress.add_task("requests", total=spec.num_requests)

            async def one() -> None:
                record = await send(session, spec, next(pool), next(models), label)
                records.append(record)
                progress.advance(task)
                if not record.ok and not keep_going:
                    raise RequestFailed(record, spec.base_url)

            start = time.perf_counter()
            try:
                if spec.rate is None:
                    await _closed_loop(one, spec, deadline)
                else:
                    await _open_loop(one, spec, deadline, random.Random(seed))
            except ExceptionGroup as group:  # the task group's: the first failure, unwrapped
                stopped, _ = group.split(RequestFailed)
                if stopped is None:
                    raise
                raise _first(stopped) from None
            duration = time.perf_counter() - start
    return records, duration


def _first(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


async def _closed_loop(one: Any, spec: LoadSpec, deadline: float) -> None:
    remaining = spec.num_requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            await one()

    async with asyncio.TaskGroup() as group:  # one worker's failure cancels the others
        for _ in range(spec.concurrency or 1):
            group.create_task(worker())


async def _open_loop(one: Any, spec: LoadSpec, deadline: float, rng: random.Random) -> None:
    assert spec.rate is not None
    shape = spec.burstiness
    scale = 1.0 / (spec.rate * shape)  # gamma(shape, scale) has mean 1/rate
    async with asyncio.TaskGroup() as group:  # one request's failure cancels the others
        for _ in range(spec.num_requests):
            if time.perf_counter() >= deadline:
                break
            group.create_task(one())
            await asyncio.sleep(rng.gammavariate(shape, scale))
