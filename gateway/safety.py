"""Pipeline stage 4, input safety (and the screening of retrieved chunks for stage 5).

The policy of a request is its route's ``safety_policy``, else its key's (``default`` unless the
key names another; ``off`` scans nothing). User and tool messages (a completion's prompt) are
scanned before anything else sees them: a block is a 400 ``content_filter`` naming the policy,
the scanner and the finding types, never the offending value; a redaction (invisible Unicode, a
secret where the policy redacts) replaces the text that goes on. Retrieved chunks are scanned
too, and a chunk a policy blocks (an injected document) is dropped from the prompt. Every block
and redaction is an audit event with ids and types only. Output (stage 8) is scanned by
``OutputGuard``: JSON responses whole, streams through the hold-back guard of ``safety/stream.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.auth import Principal
from gateway.backends.base import Chunk, Event, Generation, Usage, merge_tool_calls
from gateway.backends.registry import Target
from gateway.call import Call
from gateway.config import FileConfig
from gateway.errors import InvalidRequest, PermissionDenied
from gateway.logs import audit_event
from gateway.metrics import Metrics
from gateway.protocol import RaglineOptions
from safety.base import ScanContext
from safety.policy import Outcome, Policy, build_policy, default_policy
from safety.scanners.pii import Placeholders, StreamRestorer
from safety.stream import Released, StreamGuard

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


@dataclass
class OutputGuard:
    """Stage 8 for one request: its policy's output scanners over the response, whichever
    backend produced it. Redacted text replaces the original; a block empties the choice and
    finishes it with ``content_filter``; logprobs go wherever text was changed (they would spell
    out what was redacted) and from every scanned stream (they arrive before the text is
    scanned)."""

    stage: SafetyStage
    policy: Policy
    context: ScanContext
    placeholders: Placeholders | None = None
    redactions: list[str] = field(default_factory=list)
    blocked: int = 0

    def _noted(self, outcome: Outcome | None, blocked: bool) -> None:
        if outcome is not None:
            self.stage._count(outcome)
        if blocked:
            self.blocked += 1
            self.stage.audit("safety_block", self.policy, outcome, self.context)
        elif outcome is not None and outcome.action == "redact":
            self.redactions += outcome.types()
            self.stage.audit("safety_redact", self.policy, outcome, self.context)

    def _calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Tool calls with their arguments scanned (redactions keep the JSON valid: the
        replacements hold no quotes); None when the policy blocks one."""
        out = []
        for call in calls:
            function = call.get("function") or {}
            arguments = function.get("arguments") or ""
            if arguments:
                outcome = self.policy.run(arguments, self.context)
                self._noted(outcome, outcome.action == "block")
                if outcome.action == "block":
                    return None
                arguments = outcome.text
                if self.placeholders is not None:
                    arguments = self.placeholders.restore(arguments)
            out.append({**call, "function": {**function, "arguments": arguments}})
        return out

    def _release_calls(
        self, index: int, text: Chunk | None, pending: dict[int, list[dict[str, Any]]]
    ) -> list[Chunk]:
        """A choice's held tool calls, scanned, after its text; a block ends the choice."""
        out = [text] if text is not None else []
        scanned = self._calls(pending.pop(index))
        if scanned is None:
            return [*out, Chunk(index, "", "content_filter")]
        return out + _call_deltas(index, scanned)

    def generation(self, generation: Generation) -> Generation:
        for choice in generation.choices:
            calls = (choice.fields or {}).get("tool_calls")
            if calls:
                scanned = self._calls(calls)
                fields = dict(choice.fields or {})
                if scanned is None:
                    fields.pop("tool_calls")
                    choice.fields, choice.finish_reason = fields or None, "content_filter"
                    choice.text = ""
                    continue
                fields["tool_calls"] = scanned
                choice.fields = fields
            if not choice.text:
                continue
            outcome = self.policy.run(choice.text, self.context)
            self._noted(outcome, outcome.action == "block")
            if outcome.action != "allow":
                choice.tokens = None
                if choice.extra:
                    choice.extra.pop("logprobs", None)
            if outcome.action == "block":
                choice.text, choice.finish_reason = "", "content_filter"
            else:
                text = outcome.text
                choice.text = self.placeholders.restore(text) if self.placeholders else text
        return generation

    async def events(self, events: AsyncIterator[Event]) -> AsyncGenerator[Event, None]:
        guards: dict[int, StreamGuard] = {}
        restorers: dict[int, StreamRestorer] = {}
        pending: dict[int, list[dict[str, Any]]] = {}  # tool calls, held until their choice ends
        stopped: set[int] = set()
        finished: set[int] = set()

        def emit(index: int, released: Released | None, source: Chunk | None) -> Chunk | None:
            finish = source.finish_reason if source is not None else None
            if released is not None and released.blocked:
                stopped.add(index)
                self._noted(released.outcome, True)
                return Chunk(index, "", "content_filter")
            text = released.text if released is not None else ""
            if released is not None and released.outcome is not None:
                self._noted(released.outcome, False)
            if self.placeholders is not None:
                restorer = restorers.setdefault(index, StreamRestorer(self.placeholders))
                text = restorer.feed(text) + (restorer.flush() if finish else "")
            fields = source.fields if source is not None else None
            extra = source.extra if source is not None else None
            if extra and "logprobs" in extra:
                extra = {k: v for k, v in extra.items() if k != "logprobs"} or None
            if not text and finish is None and not fields and not extra:
                return None
            return Chunk(index, text, finish, None, fields, extra)

        def flush() -> list[Chunk]:
            """Before the usage, or an upstream failure: what unfinished choices still hold."""
            out = []
            for index, guard in guards.items():
                if index in stopped or index in finished:
                    continue
                finished.add(index)
                held = emit(index, guard.finish(), None)
                if held is not None:
                    out.append(held)
            return out

        iterator = events.__aiter__()
        while True:
            try:
                event = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception:
                # the upstream broke mid-stream: release what was held back, then let the error
                # event that the stream's outer layer writes follow
                for chunk in flush():
                    yield chunk
                raise
            if isinstance(event, Usage):
                for chunk in flush():
                    yield chunk
                yield event
                continue
            index = event.index
            if index in stopped:
                continue  # the rest of a blocked choice is dropped
            deltas = (event.fields or {}).get("tool_calls")
            if deltas:  # held until the choice ends: arguments are scanned whole
                pending[index] = merge_tool_calls(pending.get(index, []), deltas)
                rest = {k: v for k, v in (event.fields or {}).items() if k != "tool_calls"}
                event = replace(event, fields=rest or None)
            guard = guards.setdefault(index, StreamGuard(self.policy, self.context))
            released = guard.feed(event.text) if event.text else None
            if event.finish_reason is not None and (released is None or not released.blocked):
                released = _join(released, guard.finish())
                finished.add(index)
            if event.finish_reason is not None and index in pending:
                for chunk in self._release_calls(
                    index, emit(index, released, replace(event, finish_reason=None)), pending
                ):
                    if chunk.finish_reason == "content_filter":
                        stopped.add(index)
                    yield chunk
                if index not in stopped:
                    yield Chunk(index, "", event.finish_reason)
                continue
            out = emit(index, released, event)
            if out is not None:
                yield out
        for chunk in flush():
            yield chunk


def _call_deltas(index: int, calls: list[dict[str, Any]]) -> list[Chunk]:
    """Whole calls as OpenAI streams them: a delta naming each, then its arguments."""
    out = []
    for i, call in enumerate(calls):
        function = call["function"]
        head = {
            "index": i,
            "id": call.get("id"),
            "type": "function",
            "function": {"name": function.get("name", ""), "arguments": ""},
        }
        out.append(Chunk(index, "", fields={"tool_calls": [head]}))
        piece = {"index": i, "function": {"arguments": function.get("arguments", "")}}
        out.append(Chunk(index, "", fields={"tool_calls": [piece]}))
    return out


def _said(context: ScanContext, role: str) -> ScanContext:
    """Whose words: a tool's result is content fetched from elsewhere, scanned as retrieved
    content (an injection planted in a web page or a ticket arrives this way)."""
    if role == "tool":
        return replace(context, where="retrieved", role=role)
    return replace(context, role=role)


def _join(first: Released | None, second: Released) -> Released:
    if first is None or second.blocked:
        return second
    return Released(first.text + second.text, False, second.outcome or first.outcome)
