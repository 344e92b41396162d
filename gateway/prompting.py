"""Pipeline stage 6, render prompt: templates, experiments, few-shot examples, token budgets.

A chat request is templated when its model is a route with a template or an experiment, or when
the request names a template (``ragline.template``; the key's policy must allow overrides). The
client's messages become the template's inputs: the last user message is ``input``, earlier turns
are history, system messages are added to the template's system text. What was rendered (template
version, experiment variant, token counts, what the budget trimmed) is returned for the
response's ``ragline.prompt`` object, and counted per variant in Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Principal
from gateway.backends.registry import Target
from gateway.call import Call, message_text, requested_max_tokens
from gateway.config import FileConfig, HttpModelConfig
from gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
)
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest
from prompts.budget import ChatFormat, Parts, fit
from prompts.experiments import Experiment, Outcomes
from prompts.fewshot import FewShotSelector
from prompts.registry import PromptCatalog
from prompts.template import PromptError, Template
from rag.embeddings import Embedder, SentenceTransformerEmbedder

log = logging.getLogger("ragline.prompts")
_LONG_PROMPT_CHARS = 20_000


@dataclass
class Shaped:
    """A rendered request: the messages to send and what the response reports."""

    messages: list[dict[str, str]]
    overrides: dict[str, Any]
    info: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    retrieved: Any = None  # gateway.retrieval.Retrieved, for citations

    @property
    def labels(self) -> tuple[str, str, str]:
        return (
            self.info.get("experiment") or "",
            self.info.get("variant") or "",
            self.info["template"],
        )


class PromptStage:
    def __init__(
        self,
        config: FileConfig,
        metrics: Metrics,
        redis: Any | None,
        embedder: Embedder | None = None,
    ) -> None:
        self.catalog = PromptCatalog(config.prompts.dir, config.template_refs())
        self.watch = config.prompts.watch
        self.experiments: dict[str, Experiment] = {e.name: e for e in config.experiments}
        self.models = {m.name: m for m in config.models}
        self.metrics = metrics
        self.outcomes = Outcomes(redis)
        self.selector = FewShotSelector(embedder or SentenceTransformerEmbedder())
        self._formats: dict[str, ChatFormat] = {}
        self._format_lock = asyncio.Lock()

    # -- the stage -------------------------------------------------------------------------------

    async def shape(
        self, call: Call, retrieved: list[dict[str, Any]] | None = None
    ) -> Shaped | None:
        """Stage 6 for a chat request: the rendered messages, or None when not templated.
        Reads the options from the client's request and the text from ``call.body`` (what
        input safety let through)."""
        body, target, principal = call.request, call.target, call.principal
        assert isinstance(body, ChatCompletionRequest) and target is not None
        route, opts = target.route, call.options
        requested = opts.template if opts is not None else None
        route_ref = route is not None and (route.template or route.experiment)
        extras = (
            opts is not None and bool(opts.variables or opts.context)
        ) or retrieved is not None
        if not route_ref and requested is None and not extras:
            return None  # not templated: nothing to do
        if not route_ref and requested is None:
            raise InvalidRequest(
                "ragline.variables, ragline.context and ragline.rag need a prompt template: "
                "route the model through one or set ragline.template (e.g. grounded-qa).",
                param="ragline.template",
            )
        if requested is not None and not principal.policy.prompt_overrides:
            raise PermissionDenied(
                "This key may not choose prompt templates per request.",
                param="ragline.template",
                code="prompt_override_not_allowed",
            )
        template, info, overrides = self._choose(body, target, principal, requested)
        system, history, user_input = _split(call.body["messages"])
        variables = dict(opts.variables or {}) if opts is not None else {}
        fixed = route.variables if route is not None else {}
        clash = sorted(set(variables) & set(fixed))
        if clash:
            raise InvalidRequest(
                f"the variable {clash[0]!r} is fixed by the route {route.name!r}",  # type: ignore[union-attr]
                param=f"ragline.variables.{clash[0]}",
            )
        chat = await self.chat_format(target)
        context = list(retrieved or [])
        if opts is not None and opts.context:
            context += [d.model_dump(exclude_none=True) for d in opts.context]
        max_tokens = overrides.get("max_tokens") or requested_max_tokens(call.body)
        size = len(user_input) + sum(len(m["content"]) for m in history)
        size += sum(len(c["text"]) for c in context)
        try:
            bound = template.bind({**variables, **fixed}, user_input)
            few = template.spec.few_shot
            if few is not None and few.mode == "dynamic":
                examples = await asyncio.to_thread(
                    self.selector.select, template, user_input, chat.count_text
                )
            else:
                examples = self.selector.select(template, user_input, chat.count_text)
            parts = Parts(examples, context, history, system)
            if size > _LONG_PROMPT_CHARS:
                rendered = await asyncio.to_thread(fit, template, bound, parts, chat, max_tokens)
            else:
                rendered = fit(template, bound, parts, chat, max_tokens)
        except PromptError as exc:
            if exc.param == "messages":
                raise ContextLengthExceeded(exc.message, param="messages") from None
            raise InvalidRequest(exc.message, param=exc.param or "ragline.template") from None
        info.update(
            prompt_tokens=rendered.prompt_tokens,
            examples=rendered.examples,
            context=rendered.context,
            history=rendered.history,
            trimmed=rendered.trimmed,
        )
        return Shaped(rendered.messages, overrides, info)

    def _choose(
        self,
        body: ChatCompletionRequest,
        target: Target,
        principal: Principal,
        requested: str | None,
    ) -> tuple[Template, dict[str, Any], dict[str, Any]]:
        route = target.route
        ref = route.template if route is not None else None
        info: dict[str, Any] = {"route": route.name if route is not None else None}
        overrides: dict[str, Any] = {}
        if requested is not None:
            ref = requested  # an explicit choice takes the request out of any experiment
        elif route is not None and route.experiment is not None:
            experiment = self.experiments[route.experiment]
            unit = body.user if experiment.unit == "user" and body.user else principal.key_id
            variant = experiment.assign(unit)
            ref = variant.template or ref
            overrides = variant.params.overrides()
            info.update(experiment=experiment.name, variant=variant.name)
        assert ref is not None
        try:
            template = self.catalog.current.resolve(ref)
        except PromptError as exc:
            raise InvalidRequest(
                exc.message, param="ragline.template" if requested else "model"
            ) from None
        info["template"] = template.ref
        return template, info, overrides

    async def chat_format(self, target: Target) -> ChatFormat:
        fmt = self._formats.get(target.base)
        if fmt is not None:
            return fmt
        async with self._format_lock:
            fmt = self._formats.get(target.base)
            if fmt is None:
                fmt = await self._load_format(target)
                self._formats[target.base] = fmt
        return fmt

    async def warm(self) -> None:
        """Load the tokenizers that the config names for HTTP models now, at start-up: loading
        one inside the first templated request holds the GIL (imports) for most of a second."""
        for name, model in self.models.items():
            if isinstance(model, HttpModelConfig) and model.tokenizer is not None:
                self._formats[name] = await self._http_format(model)

    async def _load_format(self, target: Target) -> ChatFormat:
        model = self.models[target.base]
        if not isinstance(model, HttpModelConfig):  # the embedded engine's own tokenizer
            tokenizer, max_len = target.backend.chat_tokenizer()  # type: ignore[attr-defined]
            return await asyncio.to_thread(ChatFormat, tokenizer, max_len)
        if model.tokenizer is None:
            raise InvalidRequest(
                f"prompt templates need the tokenizer of model {target.base!r}; set `tokenizer` "
                "on it in the config file",
                param="ragline.template",
            )
        return await self._http_format(model)

    @staticmethod
    async def _http_format(model: HttpModelConfig) -> ChatFormat:
        from transformers import AutoTokenizer

        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model.tokenizer))
        max_len = getattr(model, "max_model_len", None) or int(tokenizer.model_max_length)
        return await asyncio.to_thread(ChatFormat, tokenizer, max_len)

    # -- after the response ----------------------------------------------------------------------

    def count(self, shaped: Shaped, status: int, usage: tuple[int, int]) -> None:
        """Per-variant metrics of a finished request."""
        m, labels = self.metrics, shaped.labels
        m.variant_requests.labels(*labels, str(status)).inc()
        m.variant_latency.labels(*labels).observe(time.perf_counter() - shaped.started)
        if usage[0]:
            m.variant_prompt_tokens.labels(*labels).inc(usage[0])
        if usage[1]:
            m.variant_completion_tokens.labels(*labels).inc(usage[1])

    async def remember(self, shaped: Shaped, principal: Principal, ids: list[str]) -> None:
        """Keep an answered request for its feedback (before the answer is sent: a client may
        send feedback the moment it has it). Kept under the key's id and the request's: a
        request id is the client's to choose, so another key's cannot overwrite it."""
        labels = shaped.labels
        record = {"k": principal.key_id, "e": labels[0], "v": labels[1], "t": labels[2]}
        try:
            owned = [f"{principal.key_id}:{i}" for i in ids if i]
            await self.outcomes.remember(owned, json.dumps(record))
        except Exception as exc:  # Redis away: the answer is served; only feedback is lost
            log.warning("could not record the request for feedback: %s", exc)

    async def feedback(self, principal: Principal, request_id: str, score: float) -> dict[str, Any]:
        try:
            raw = await self.outcomes.lookup(f"{principal.key_id}:{request_id}")
        except Exception as exc:  # Redis away
            log.warning("feedback lookup failed: %s", exc)
            raise Overloaded("The feedback store is unavailable; retry shortly.") from None
        record = json.loads(raw) if raw else None
        if record is None or (record["k"] != principal.key_id and not principal.admin):
            raise NotFound(
                f"No templated request with id {request_id!r} is known to this gateway "
                "(feedback is kept for 7 days, for the key that made the request).",
                param="request_id",
                code="request_not_found",
            )
        self.metrics.variant_feedback.labels(record["e"], record["v"], record["t"]).observe(score)
        return {
            "object": "feedback",
            "request_id": request_id,
            "score": score,
            "template": record["t"],
            "experiment": record["e"] or None,
            "variant": record["v"] or None,
        }


def _split(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, str]], str]:
    """(system text, history, last user message) of a templated request."""
    if not messages or messages[-1].get("role") != "user":
        raise InvalidRequest(
            "a request rendered through a prompt template must end with a user message",
            param="messages",
        )
    system = [message_text(m) for m in messages[:-1] if m["role"] in ("system", "developer")]
    history = [
        {"role": m["role"], "content": message_text(m)}
        for m in messages[:-1]
        if m["role"] not in ("system", "developer")
    ]
    return "\n\n".join(system) or None, history, message_text(messages[-1])
