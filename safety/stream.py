"""Scanning streamed output through a hold-back window.

Deltas go into a pending buffer; only text that no finding can still reach is released: the
buffer minus its last ``window`` characters, cut earlier where a finding crosses that point (an
e-mail address or a key still arriving). So text that would later be redacted is never sent, and
a value split across chunks is seen whole. The released prefix is redacted by the policy before it
goes out; a block stops the stream (the caller ends it with ``finish_reason: content_filter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safety.base import Finding, ScanContext
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
    window: int = 96
    pending: str = ""
    findings: list[tuple[str, Finding]] = field(default_factory=list)
    blocked_by: str | None = None

    def feed(self, delta: str) -> Released:
        if self.blocked_by is not None:
            return Released("", True)
        self.pending += delta
        return self._release(final=False)

    def finish(self) -> Released:
        if self.blocked_by is not None:
            return Released("", True)
        return self._release(final=True)

    def _release(self, final: bool) -> Released:
        outcome = self.policy.run(self.pending, self.context)
        if outcome.action == "block":
            self.blocked_by = outcome.blocked_by
            self.findings += outcome.findings
            self.pending = ""
            return Released("", True, outcome)
        if final:
            cut = len(self.pending)
        else:
            cut = max(0, len(self.pending) - self.window)
            for _, f in outcome.findings:
                if f.start < cut < f.end or (f.end >= cut and f.start < cut):
                    cut = min(cut, f.start)
        if cut == 0:
            return Released("")
        head, self.pending = self.pending[:cut], self.pending[cut:]
        if outcome.action == "allow":
            return Released(head)
        # redact the released prefix on its own: no finding crosses the cut
        done = self.policy.run(head, self.context)
        self.findings += done.findings
        return Released(done.text, False, done)
