"""Pipeline stage 4, input safety (and the screening of retrieved chunks for stage 5).

The policy of a request is its route's ``safety_policy``, else its key's (``default`` unless the
key names another; ``off`` scans nothing). Every message of every role (a completion's prompt)
and the arguments of tool calls in the history are scanned before anything else sees them (a
``tool`` message as retrieved content): a block is a 400 ``content_filter`` naming the policy,
the scanner and the finding types, never the offending value; a redaction (invisible Unicode, a
secret where the policy redacts) replaces the text that goes on. Retrieved chunks are scanned
too, and a chunk a policy blocks (an injected document) is dropped from the prompt. Every block
and redaction is an audit event with ids and types only. Output (stage 8) is scanned by
``gateway.output_guard.OutputGuard``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.auth import Principal
from gateway.backends.registry import Target
from gateway.call import Call
from gateway.config import FileConfig
from gateway.errors import InvalidRequest, PermissionDenied
from gateway.logs import audit_event
from gateway.metrics import Metrics
from gateway.output_guard import OutputGuard
from gateway.protocol import RaglineOptions
from safety.base import ScanContext
from safety.policy import Outcome, Policy, build_policy, default_policy
from safety.scanners.pii import Placeholders

log = logging.getLogger("ragline.safety")
# a request's texts are scanned on the event loop up to this many characters in all (a
# thread hop costs more than scanning a short message); beyond it, in a worker thread
_INLINE_CHARS = 2_000


Scan = tuple[str, ScanContext, str]  # a text, who said it where, the parameter it came in


# In a worker thread, scanning pauses this often for a moment. CPython hands the GIL to a
# waiting thread on a timed request only if the holder has not released it in between, and
# numpy's small operations release and retake it every few microseconds: without the pause the
# event loop waited for the whole batch (/health: 150 ms behind 2,000 short messages).
_PAUSE_EVERY = 0.002
_PAUSE = 0.0002


def _run_until_blocked(
    policy: Policy, scans: list[Scan], count: Callable[[Outcome], None], pause: bool = False
) -> list[Outcome]:
    """Each scan's outcome, counted in the metrics where it ran, up to the first block;
    ``pause`` (in a worker thread) lets the event loop run every ``_PAUSE_EVERY`` seconds."""
    outcomes = []
    mark = time.perf_counter()
    for text, context, _ in scans:
        outcomes.append(policy.run(text, context))
        count(outcomes[-1])
        if outcomes[-1].action == "block":
            break
        if pause and time.perf_counter() - mark > _PAUSE_EVERY:
            time.sleep(_PAUSE)
            mark = time.perf_counter()
    return outcomes


class ContentFiltered(InvalidRequest):
    default_code = "content_filter"


@dataclass
class Screened:
    """What input safety decided for one request, and its output guard (stage 8)."""

    policy: str
    redactions: list[str] = field(default_factory=list)
    output: OutputGuard | None = None
    inline_chars: int = 0  # scanned on the event loop so far, for this request

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"policy": self.policy, "redactions": sorted(set(self.redactions))}
        if self.output is not None and (self.output.redactions or self.output.blocked):
            info["output"] = {
                "redactions": sorted(set(self.output.redactions)),
                "blocked": self.output.blocked,
            }
        return info


class SafetyStage:
    def __init__(
        self,
        config: FileConfig,
        embedder: Any,
        metrics: Metrics,
        tokenizer_for: Callable[[Target], Awaitable[Any]] | None = None,
    ) -> None:
        self.tokenizer_for = tokenizer_for  # decodes token-id prompts, so they are scanned too
        self.enabled = config.safety.enabled
        self.metrics = metrics
        self.recent: deque[tuple[float, str, str, str]] = deque(maxlen=500)
        self.routes = {r.name: r for r in config.routes}
        specs = {"default": default_policy(), **{p.name: p for p in config.safety.policies}}
        self.specs = specs
        self.embedder = embedder
        self._policies: dict[str, Policy] = {}

    def warm(self) -> None:
        """Build every policy and load its models (before serving: no request pays for it)."""
        if self.enabled:
            for name in self.specs:
                self._policy(name)

    def _policy(self, name: str) -> Policy:
        policy = self._policies.get(name)
        if policy is None:
            policy = build_policy(self.specs[name], {"embedder": self.embedder})
            self._policies[name] = policy
        return policy

    def policy_for(self, principal: Principal, target: Target) -> Policy | None:
        if not self.enabled:
            return None
        route = target.route
        name = (route.safety_policy if route is not None else None) or (
            principal.policy.safety_policy
        )
        if name == "off":
            return None
        if name not in self.specs:  # a run-time key made before a config change, say
            raise PermissionDenied(
                f"This key's safety policy {name!r} is not configured on this gateway.",
                code="unknown_safety_policy",
            )
        return self._policy(name)

    # -- stage 4 ----------------------------------------------------------------------------

    async def screen_input(self, call: Call) -> Call:
        """Stage 4: scan what the client wrote; a block raises ``ContentFiltered``, redactions
        give the call a new body."""
        assert call.target is not None
        policy = self.policy_for(call.principal, call.target)
        if policy is None:
            return call
        route = call.target.route.name if call.target.route else None
        screened = Screened(policy.name)
        context = ScanContext("input", call.principal.key_id, route)
        restores = any(getattr(s, "restore", False) for _, s in policy.scanners)
        if restores or any("output" in spec.where for spec, _ in policy.scanners):
            output = ScanContext("output", call.principal.key_id, route)
            screened.output = OutputGuard(self, policy, output)
            if restores:  # the answer gets the user's own values back for the placeholders
                screened.output.placeholders = context.extras.setdefault(
                    "placeholders", Placeholders()
                )
        body = call.body
        if call.chat:  # every role: a key is a key anywhere
            messages = list(body["messages"])
            items: list[tuple[int, int | tuple[str, int] | None, Scan]] = []
            roles: dict[str, ScanContext] = {}
            for i, message in enumerate(messages):
                role = str(message.get("role"))
                said = roles.get(role) or roles.setdefault(role, _said(context, role))
                content = message.get("content")
                for j, tool_call in enumerate(message.get("tool_calls") or ()):
                    param = f"messages[{i}].tool_calls[{j}].function.arguments"
                    arguments = tool_call["function"]["arguments"]
                    items.append((i, ("call", j), (arguments, said, param)))
                if isinstance(content, str):
                    items.append((i, None, (content, said, f"messages[{i}].content")))
                elif isinstance(content, list):
                    for j, part in enumerate(content):
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            param = f"messages[{i}].content[{j}].text"
                            items.append((i, j, (part["text"], said, param)))
            texts = await self._scan_many(policy, [scan for _, _, scan in items], screened)
            changed = False
            for (i, part, (before, _, _)), after in zip(items, texts, strict=True):
                if after is before:
                    continue
                changed, message = True, messages[i]
                if part is None:
                    messages[i] = {**message, "content": after}
                elif isinstance(part, tuple):  # a tool call's arguments
                    calls = [dict(c) for c in message["tool_calls"]]
                    made = calls[part[1]]
                    made["function"] = {**made["function"], "arguments": after}
                    messages[i] = {**message, "tool_calls": calls}
                else:
                    parts = list(message["content"])
                    parts[part] = {**parts[part], "text": after}
                    messages[i] = {**message, "content": parts}
            if changed:
                body = call.with_body(messages=messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                text = await self._scan(policy, prompt, context, "prompt", screened)
                body = call.with_body(prompt=text) if text != prompt else body
            elif prompt and all(isinstance(p, str) for p in prompt):
                scans = [(p, context, f"prompt[{i}]") for i, p in enumerate(prompt)]
                texts = await self._scan_many(policy, scans, screened)
                body = call.with_body(prompt=texts) if texts != prompt else body
            elif prompt:
                await self._scan_token_ids(call, policy, context, screened)
        options = await self._screen_options(call.options, policy, context, screened)
        return call.evolve(body=body, screened=screened, options=options)

    async def _scan_token_ids(
        self, call: Call, policy: Policy, context: ScanContext, screened: Screened
    ) -> None:
        """Token-id prompts are scanned as the text they decode to. Ids cannot be redacted
        in place, so what the policy would redact is refused."""
        assert call.target is not None
        prompt = call.body["prompt"]
        single = isinstance(prompt[0], int)
        batches = [prompt] if single else prompt
        if self.tokenizer_for is None:
            raise ContentFiltered(
                "Token-id prompts cannot be scanned here; send text.", param="prompt"
            )
        try:
            tokenizer = (await self.tokenizer_for(call.target)).tokenizer
        except InvalidRequest:
            raise ContentFiltered(
                f"Token-id prompts need the tokenizer of model {call.target.base!r} to be "
                "scanned by the safety policy; send text, or set `tokenizer` on the model.",
                param="prompt",
            ) from None
        for i, ids in enumerate(batches):
            param = "prompt" if single else f"prompt[{i}]"
            vocabulary = len(tokenizer)
            outside = next((t for t in ids if not 0 <= t < vocabulary), None)
            if outside is not None:
                raise InvalidRequest(
                    f"token id {outside} is outside the vocabulary (0..{vocabulary - 1})",
                    param=param,
                )
            text = await asyncio.to_thread(tokenizer.decode, list(ids), skip_special_tokens=False)
            if await self._scan(policy, text, context, param, screened) != text:
                raise ContentFiltered(
                    f"The token-id prompt holds what safety policy '{policy.name}' redacts; "
                    "send it as text to have it redacted.",
                    param=param,
                )

    async def _screen_options(
        self,
        options: RaglineOptions | None,
        policy: Policy,
        context: ScanContext,
        screened: Screened,
    ) -> RaglineOptions | None:
        """Template variables and client-supplied context documents are input too."""
        if options is None or not (options.variables or options.context):
            return options
        said = replace(context, role="user")
        variables = dict(options.variables or {})
        for name, value in variables.items():
            param = f"ragline.variables.{name}"
            if isinstance(value, str):
                variables[name] = await self._scan(policy, value, said, param, screened)
            elif isinstance(value, list):
                variables[name] = [
                    await self._scan(policy, v, said, f"{param}[{i}]", screened)
                    if isinstance(v, str)
                    else v
                    for i, v in enumerate(value)
                ]
        documents = []
        for i, doc in enumerate(options.context or ()):
            param = f"ragline.context[{i}].text"
            text = await self._scan(policy, doc.text, said, param, screened)
            documents.append(doc if text == doc.text else doc.model_copy(update={"text": text}))
        update = {"variables": variables or None, "context": documents or None}
        return options.model_copy(update=update)

    async def _scan(
        self, policy: Policy, text: str, context: ScanContext, param: str, screened: Screened
    ) -> str:
        return (await self._scan_many(policy, [(text, context, param)], screened))[0]

    async def _scan_many(self, policy: Policy, scans: list[Scan], screened: Screened) -> list[str]:
        """The texts as the policy leaves them (the same object when unchanged); raises
        ``ContentFiltered`` at the first one it blocks. Up to ``_INLINE_CHARS`` characters of a
        request are scanned on the event loop, the rest in one worker thread: 2,000 messages of
        100 characters would otherwise hold the loop for a quarter of a second."""
        size = sum(len(text) for text, _, _ in scans)
        if screened.inline_chars + size > _INLINE_CHARS:
            outcomes = await asyncio.to_thread(_run_until_blocked, policy, scans, self._count, True)
        else:
            screened.inline_chars += size
            outcomes = _run_until_blocked(policy, scans, self._count)
        return [
            self._settle(policy, outcome, *scan, screened)
            for outcome, scan in zip(outcomes, scans, strict=False)
        ]

    def _settle(
        self,
        policy: Policy,
        outcome: Outcome,
        text: str,
        context: ScanContext,
        param: str,
        screened: Screened,
    ) -> str:
        if outcome.action == "block":
            kinds = ", ".join(outcome.types()) or "finding"
            audit_event(
                "safety_block", key_id=context.key_id, route=context.route, where=context.where,
                policy=policy.name, scanner=outcome.blocked_by, types=outcome.types(),
            )  # fmt: skip
            raise ContentFiltered(
                f"The request was blocked by safety policy '{policy.name}' (scanner "
                f"'{outcome.blocked_by}': {kinds}).",
                param=param,
            )
        if outcome.action == "redact":
            screened.redactions += outcome.types()
            audit_event(
                "safety_redact", key_id=context.key_id, route=context.route, where=context.where,
                policy=policy.name, types=outcome.types(),
            )  # fmt: skip
            return outcome.text
        return text

    def audit(
        self, event: str, policy: Policy, outcome: Outcome | None, context: ScanContext
    ) -> None:
        audit_event(
            event, key_id=context.key_id, route=context.route, where=context.where,
            policy=policy.name, scanner=outcome.blocked_by if outcome else None,
            types=outcome.types() if outcome else [],
        )  # fmt: skip

    def _count(self, outcome: Outcome) -> None:
        for scanner, seconds in outcome.timings.items():
            self.metrics.safety.labels(scanner).observe(seconds / 1000)
        for scanner, finding in outcome.findings:
            self.metrics.safety_findings.labels(scanner, finding.type, outcome.action).inc()
            # for the console: what was found, by which scanner, and what was done; never the
            # text that matched
            self.recent.append((time.time(), scanner, finding.type, outcome.action))

    # -- retrieved chunks (stage 5) ---------------------------------------------------------

    def screen_chunk(self, policy: Policy, text: str, principal: Principal) -> str | None:
        """The chunk's text to use, or None when the policy blocks it (it is dropped)."""
        context = ScanContext("retrieved", principal.key_id)
        outcome = policy.run(text, context)
        self._count(outcome)
        if outcome.action == "block":
            audit_event(
                "safety_drop_chunk", key_id=principal.key_id, policy=policy.name,
                scanner=outcome.blocked_by, types=outcome.types(),
            )  # fmt: skip
            return None
        return outcome.text


# -- stage 8: output ---------------------------------------------------------------------------


def _said(context: ScanContext, role: str) -> ScanContext:
    """Whose words: a tool's result is content fetched from elsewhere, scanned as retrieved
    content (an injection planted in a web page or a ticket arrives this way)."""
    if role == "tool":
        return replace(context, where="retrieved", role=role)
    return replace(context, role=role)
