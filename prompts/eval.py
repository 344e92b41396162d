"""``ragline eval prompts``: run template variants over a labelled set and compare them.

The data is JSONL, one item per line::

    {"input": "What is the capital of France?", "expected": "Paris"}
    {"variables": {"country": "Peru"}, "expected": "Lima", "scorer": "contains"}
    {"input": "...", "expected": "^(yes|no)$", "scorer": "regex"}
    {"input": "...", "expected": 42, "scorer": "json", "field": "answer"}

Scorers: ``exact`` (case- and accent-insensitive, surrounding whitespace and final punctuation
ignored), ``contains`` (the same normalisation, as a substring), ``regex`` (``re.search``,
case-insensitive) and ``json`` (the first JSON object in the answer; ``field`` is a dotted path).

Each variant's prompt is rendered exactly as the gateway renders it (same templates, few-shot
selection and budget, the served model's chat template) and sent to a backend: the configured
one in-process (default: SmolLM2 on the embedded engine), or any OpenAI-compatible server
(``--base-url``: a ragline gateway, vLLM, ...). Prompt and completion tokens are the backend's
own usage counts.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prompts.budget import ChatFormat, Parts, fit
from prompts.fewshot import FewShotSelector
from prompts.registry import PromptRegistry
from prompts.template import PromptError, Template

Scorer = Literal["exact", "contains", "regex", "json"]


class EvalItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = ""
    variables: dict[str, Any] = Field(default_factory=dict)
    expected: Any
    scorer: Scorer | None = None
    field: str | None = None


def load_items(path: Path) -> list[EvalItem]:
    items = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(EvalItem.model_validate_json(line))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "line"
            raise PromptError(f"{path}:{number}: {where}: {err['msg']}") from None
    if not items:
        raise PromptError(f"{path}: no items")
    return items


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.casefold().split()).strip(" .!?;:")


def score(item: EvalItem, answer: str, default: Scorer) -> bool:
    kind = item.scorer or default
    if kind == "exact":
        return _norm(answer) == _norm(str(item.expected))
    if kind == "contains":
        return _norm(str(item.expected)) in _norm(answer)
    if kind == "regex":
        return re.search(str(item.expected), answer, re.IGNORECASE) is not None
    value = _first_json(answer)
    for part in (item.field or "").split(".") if item.field else []:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return value == item.expected


def _first_json(text: str) -> Any:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return decoder.raw_decode(text[match.start() :])[0]
        except json.JSONDecodeError:
            continue
    return None


# -- backends -----------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


Complete = Callable[[list[dict[str, str]], int], Awaitable[Answer]]


def http_runner(base_url: str, model: str, api_key: str | None) -> Complete:
    """Any OpenAI-compatible server (temperature 0)."""
    import httpx

    client = httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=300,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
    )

    async def complete(messages: list[dict[str, str]], max_tokens: int) -> Answer:
        started = time.perf_counter()
        r = await client.post(
            "/chat/completions",
            json={
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
            },
            headers={"Cache-Control": "no-cache"},
        )
        if r.status_code != 200:
            raise PromptError(f"{base_url} answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        usage = body.get("usage") or {}
        return Answer(
            body["choices"][0]["message"].get("content") or "",
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            time.perf_counter() - started,
        )

    return complete


# -- the run ------------------------------------------------------------------------------------


@dataclass
class VariantResult:
    name: str
    template: str
    correct: int = 0
    total: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    misses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        q = statistics.quantiles(self.seconds, n=20) if len(self.seconds) > 1 else self.seconds
        return {
            "variant": self.name,
            "template": self.template,
            "items": self.total,
            "accuracy": round(self.accuracy, 4),
            "mean_prompt_tokens": round(statistics.fmean(self.prompt_tokens), 2),
            "mean_completion_tokens": round(statistics.fmean(self.completion_tokens), 2),
            "latency_p50_ms": round(statistics.median(self.seconds) * 1000, 1),
            "latency_p95_ms": round((q[-1] if q else 0.0) * 1000, 1),
        }


def parse_variants(spec: str) -> list[tuple[str, str]]:
    """``a,b`` or ``compact=qa@2,verbose=qa@1`` → [(label, template ref)]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        label, _, ref = part.partition("=")
        out.append((label, ref) if ref else (part, part))
    if not out:
        raise PromptError("--variants names no template")
    return out


async def run_eval(
    registry: PromptRegistry,
    variants: list[tuple[str, str]],
    items: list[EvalItem],
    complete: Complete,
    chat: ChatFormat,
    *,
    selector: FewShotSelector,
    max_tokens: int = 32,
    default_scorer: Scorer = "contains",
    concurrency: int = 8,
) -> list[VariantResult]:
    templates: list[tuple[str, Template]] = [(n, registry.resolve(r)) for n, r in variants]
    gate = asyncio.Semaphore(concurrency)
    results = [VariantResult(name, t.ref) for name, t in templates]

    async def one(result: VariantResult, template: Template, item: EvalItem) -> None:
        examples = selector.select(template, item.input, chat.count_text)
        bound = template.bind(item.variables, item.input)
        rendered = fit(template, bound, Parts(examples, [], []), chat, max_tokens)
        async with gate:
            answer = await complete(rendered.messages, max_tokens)
        ok = score(item, answer.text, default_scorer)
        result.total += 1
        result.correct += ok
        result.prompt_tokens.append(answer.prompt_tokens)
        result.completion_tokens.append(answer.completion_tokens)
        result.seconds.append(answer.seconds)
        if not ok:
            result.misses.append({"item": item.model_dump(), "answer": answer.text})

    await asyncio.gather(
        *(one(r, t, item) for r, (_, t) in zip(results, templates, strict=True) for item in items)
    )
    return results
