"""Pipeline stage 8, output safety for one request, whichever backend answered: JSON responses
scanned whole, streams through the hold-back guard of ``safety/stream.py``, generated tool-call
arguments scanned whole (a streamed call is held until its choice ends), placeholders restored.
``gateway.safety`` builds one per request whose policy scans output.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Chunk, Event, Generation, Usage, merge_tool_calls
from safety.base import ScanContext
from safety.policy import Outcome, Policy
from safety.scanners.pii import Placeholders, StreamRestorer
from safety.stream import Released, StreamGuard

if TYPE_CHECKING:
    from gateway.safety import SafetyStage


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


def _join(first: Released | None, second: Released) -> Released:
    if first is None or second.blocked:
        return second
    return Released(first.text + second.text, False, second.outcome or first.outcome)
