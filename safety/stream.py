"""Scanning streamed output: text is released as soon as no finding can still start inside it.

Each delta first goes through the policy's character-local scanners (invisible Unicode is
stripped as it arrives), then into a pending buffer. What is released is the pending text up to
the earliest point where a finding of the policy's output scanners could still begin: each
scanner says where (``Scanner.hold``: the start of a partial match of one of its patterns at the
end of the text, found with the ``regex`` module's partial matching), and no finding that
reaches that point is cut. So ``sk_live_4eC3`` waits until the key is complete (and is then
redacted whole), ``+1 (415)`` waits until the number ends, and ordinary prose goes out with the
token that brought it: no fixed window, and no word held back for nothing. A value split across
chunks is thus always seen whole, and no piece of it is sent before it is redacted. The held
tail is never longer than ``window`` characters (an unfinished value longer than that is cut).
A block stops the stream (the caller ends it with ``finish_reason: content_filter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safety.base import HOLD_WINDOW, Finding, ScanContext
from safety.policy import Outcome, Policy


@dataclass
class Released:
    text: str
    blocked: bool = False
    outcome: Outcome | None = None


@dataclass
class StreamGuard:
    policy: Policy
    context: ScanContext = field(default_factory=lambda: ScanContext(where="output"))
    window: int = HOLD_WINDOW
    pending: str = ""
    findings: list[tuple[str, Finding]] = field(default_factory=list)
    blocked_by: str | None = None

    def feed(self, delta: str) -> Released:
        if self.blocked_by is not None:
            return Released("", True)
        local = self.policy.run(delta, self.context, local=True)
        if local.action == "block":
            return self._block(local)
        self.findings += local.findings
        self.pending += local.text
        released = self._release(final=False)
        if local.action == "redact" and not released.blocked:
            released.outcome = released.outcome or local
        return released

    def finish(self) -> Released:
        if self.blocked_by is not None:
            return Released("", True)
        return self._release(final=True)

    def _block(self, outcome: Outcome) -> Released:
        self.blocked_by = outcome.blocked_by
        self.findings += outcome.findings
        self.pending = ""
        return Released("", True, outcome)

    def _release(self, final: bool) -> Released:
        if not self.pending:
            return Released("")
        outcome = self.policy.run(self.pending, self.context, local=False)
        if outcome.action == "block":
            return self._block(outcome)
        if final:
            cut = len(self.pending)
        else:
            cut = max(self.policy.hold(self.pending, self.context), len(self.pending) - self.window)
            for _, f in outcome.findings:
                if f.anchor < cut and f.end >= cut:
                    cut = f.anchor  # no finding is cut in two, nor from what it was found by
        if cut <= 0:
            return Released("")
        if cut == len(self.pending):  # all of it: the run above already redacted it
            head, self.pending = self.pending, ""
            if outcome.action == "allow":
                return Released(head)
            self.findings += outcome.findings
            return Released(outcome.text, False, outcome)
        head, self.pending = self.pending[:cut], self.pending[cut:]
        if outcome.action == "allow":
            return Released(head)
        # redact the released prefix on its own: no finding crosses the cut
        done = self.policy.run(head, self.context, local=False)
        self.findings += done.findings
        return Released(done.text, False, done)
