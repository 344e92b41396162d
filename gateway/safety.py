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
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from gateway.admission import Admission
from gateway.auth import Principal
from gateway.backends.registry import Target
from gateway.config import FileConfig
from gateway.errors import InvalidRequest, PermissionDenied
from gateway.logs import audit_event
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from safety.base import ScanContext
from safety.policy import Outcome, Policy, build_policy, default_policy
from safety.scanners.pii import Placeholders, StreamRestorer
from safety.stream import Released, StreamGuard

log = logging.getLogger("ragline.safety")


class ContentFiltered(InvalidRequest):
    default_code = "content_filter"


@dataclass
class Screened:
    policy: str
    redactions: list[str] = field(default_factory=list)
    output: OutputGuard | None = None

    def info(self) -> dict[str, Any]:
        return {"policy": self.policy, "redactions": sorted(set(self.redactions))}


class SafetyStage:
    def __init__(self, config: FileConfig, embedder: Any, metrics: Metrics) -> None:
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

    async def screen_input(
        self, request: Request, body: ChatCompletionRequest | CompletionRequest, target: Target
    ) -> Screened | None:
        if not self.enabled:
            return None
        principal = Admission.authorize(request, body.model)
        policy = self.policy_for(principal, target)
        if policy is None:
            return None
        route = target.route.name if target.route else None
        screened = Screened(policy.name)
        context = ScanContext("input", principal.key_id, route)
        restores = any(getattr(s, "restore", False) for _, s in policy.scanners)
        if restores or any("output" in spec.where for spec, _ in policy.scanners):
            output = ScanContext("output", principal.key_id, route)
            screened.output = OutputGuard(self, policy, output)
            if restores:  # the answer gets the user's own values back for the placeholders
                screened.output.placeholders = context.extras.setdefault(
                    "placeholders", Placeholders()
                )
        if isinstance(body, ChatCompletionRequest):
            for i, message in enumerate(body.messages):
                if message.role not in ("user", "tool"):
                    continue
                if isinstance(message.content, str):
                    message.content = await self._scan(
                        policy, message.content, context, f"messages[{i}].content", screened
                    )
                elif isinstance(message.content, list):
                    for j, part in enumerate(message.content):
                        text = getattr(part, "text", None)
                        if isinstance(text, str):
                            part.text = await self._scan(
                                policy, text, context, f"messages[{i}].content[{j}].text", screened
                            )
        else:
            if isinstance(body.prompt, str):
                body.prompt = await self._scan(policy, body.prompt, context, "prompt", screened)
            elif body.prompt and all(isinstance(p, str) for p in body.prompt):
                body.prompt = [
                    await self._scan(policy, str(p), context, f"prompt[{i}]", screened)
                    for i, p in enumerate(body.prompt)
                ]  # token-id prompts are not text: nothing to scan
        return screened

    async def _scan(
        self, policy: Policy, text: str, context: ScanContext, param: str, screened: Screened
    ) -> str:
        if len(text) > 2_000:
            outcome = await asyncio.to_thread(policy.run, text, context)
        else:
            outcome = policy.run(text, context)
        self._count(outcome)
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


def _text_field(choice: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Where a choice keeps its text: chat ``message``/``delta`` content, or completion ``text``."""
    for key in ("delta", "message"):
        holder = choice.get(key)
        if isinstance(holder, dict):
            return holder, "content"
    return choice, "text"


def guard_json(
    payload: bytes,
    policy: Policy,
    stage: SafetyStage,
    context: ScanContext,
    placeholders: Placeholders | None = None,
) -> bytes:
    """Scan each choice of a complete response; redact in place, or empty a blocked choice and
    finish it with ``content_filter``."""
    data = json.loads(payload)
    redactions: list[str] = []
    blocked = 0
    for choice in data.get("choices", ()):
        holder, key = _text_field(choice)
        text = holder.get(key) if holder is not None else None
        if not isinstance(text, str) or not text:
            continue
        outcome = policy.run(text, context)
        stage._count(outcome)
        if outcome.action != "allow" and choice.get("logprobs") is not None:
            choice["logprobs"] = None  # its tokens would spell out what was redacted
        if outcome.action == "block":
            holder[key] = ""  # type: ignore[index]
            choice["finish_reason"] = "content_filter"
            blocked += 1
            stage.audit("safety_block", policy, outcome, context)
        else:
            if outcome.action == "redact":
                redactions += outcome.types()
                stage.audit("safety_redact", policy, outcome, context)
            restored = placeholders.restore(outcome.text) if placeholders else outcome.text
            holder[key] = restored  # type: ignore[index]
    if redactions or blocked:
        extra = data.setdefault("ragline", {}).setdefault("safety", {"policy": policy.name})
        extra["output"] = {"redactions": sorted(set(redactions)), "blocked": blocked}
    return json.dumps(data, separators=(",", ":")).encode()


async def guard_sse(
    events: AsyncIterator[bytes],
    policy: Policy,
    stage: SafetyStage,
    context: ScanContext,
    placeholders: Placeholders | None = None,
) -> AsyncIterator[bytes]:
    """Scan a stream's text through a hold-back window per choice (``safety.stream``): what is
    released is already redacted; a block ends that choice with ``content_filter`` and drops the
    rest of its text, while usage and ``[DONE]`` still follow. Logprobs are dropped from
    scanned streams (they would carry the tokens before the window has looked at them)."""
    guards: dict[int, StreamGuard] = {}
    restorers: dict[int, StreamRestorer] = {}
    stopped: set[int] = set()
    finished: set[int] = set()
    template: dict[str, Any] | None = None  # id, object, created, model of this stream
    chat = True

    def flush() -> list[bytes]:
        """Before ``[DONE]`` or an error event: release what unfinished choices still hold."""
        out = []
        for index, guard in guards.items():
            if index in stopped or index in finished or template is None:
                continue
            finished.add(index)
            released = guard.finish()
            text = released.text
            if placeholders is not None and index in restorers:
                text = restorers[index].feed(text) + restorers[index].flush()
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": None}
            if released.blocked:
                choice["finish_reason"] = "content_filter"
                text = ""
            if not text and not released.blocked:
                continue
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            data = {**template, "choices": [choice]}
            out.append(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
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
            for extra in flush():
                yield extra
            raise
        if not event.startswith(b"data: {"):
            if event.startswith(b"data: [DONE]"):
                for extra in flush():
                    yield extra
            yield event
            continue
        data = json.loads(event[6:])
        choices = data.get("choices") or []
        if not choices:
            if "error" in data:
                for extra in flush():
                    yield extra
            yield event
            continue
        if template is None:
            template = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
            chat = "delta" in choices[0]
        kept = []
        for choice in choices:
            index = int(choice.get("index", 0))
            holder, key = _text_field(choice)
            if index in stopped:
                if choice.get("finish_reason") is None and holder is not None:
                    holder.pop(key, None)
                    continue  # the rest of a blocked choice's text is dropped
                continue  # its finish was sent already
            guard = guards.setdefault(index, StreamGuard(policy, context))
            if choice.get("logprobs") is not None:
                # a chunk's logprobs arrive before the window decides: never send them
                choice["logprobs"] = None
            text = holder.get(key) if holder is not None else None
            released = guard.feed(text) if isinstance(text, str) and text else None
            if choice.get("finish_reason") is not None and (
                released is None or not released.blocked
            ):
                tail = guard.finish()
                released = _join(released, tail)
                finished.add(index)
            if released is not None and released.blocked:
                stopped.add(index)
                stage.audit("safety_block", policy, released.outcome, context)
                if holder is not None:
                    holder[key] = ""
                choice["finish_reason"] = "content_filter"
            elif released is not None and holder is not None:
                text = released.text
                if placeholders is not None:
                    restorer = restorers.setdefault(index, StreamRestorer(placeholders))
                    text = restorer.feed(text)
                    if choice.get("finish_reason") is not None:
                        text += restorer.flush()
                holder[key] = text
                if released.outcome is not None and released.outcome.action == "redact":
                    stage.audit("safety_redact", policy, released.outcome, context)
            kept.append(choice)
        if not kept and not (data.keys() - {"id", "object", "created", "model", "choices",
                                             "system_fingerprint", "usage"}):  # fmt: skip
            continue
        data["choices"] = kept
        yield b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _join(first: Released | None, second: Released) -> Released:
    if first is None:
        return second
    if second.blocked:
        return second
    return Released(first.text + second.text, False, second.outcome or first.outcome)


@dataclass
class OutputGuard:
    """Stage 8 for one request: its policy's output scanners over the response."""

    stage: SafetyStage
    policy: Policy
    context: ScanContext
    placeholders: Placeholders | None = None

    def json(self, payload: bytes) -> bytes:
        return guard_json(payload, self.policy, self.stage, self.context, self.placeholders)

    def sse(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return guard_sse(events, self.policy, self.stage, self.context, self.placeholders)
