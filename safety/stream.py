"""Scanning streamed output through a hold-back window.

Deltas go into a pending buffer; only text that no finding can still reach is released. What is
held back is the tail that could still become part of a value: the last word (an e-mail address
or a key still arriving), a trailing run of digits and separators (a card, phone number, IBAN or
SSN), and anything from a credential's context word on (``api_key =``, ``Bearer``, ``-----BEGIN``)
so that the value is later seen with it; never more than ``window`` characters, and cut earlier
where a finding crosses that point. Ordinary prose is thus released a word behind the model, not
a fixed window behind (which would add ~20 tokens to the time to first token). Text that would
later be redacted is never sent, and a value split across chunks is seen whole. The released
prefix is redacted by the policy before it goes out; a block stops the stream (the caller ends it
with ``finish_reason: content_filter``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from safety.base import Finding, ScanContext
from safety.policy import Outcome, Policy

_LAST_WORD = re.compile(r"\S*$")
# digits, upper-case letters and the separators of cards, phones, IBANs, SSNs and IP addresses
_VALUE_RUN = re.compile(r"[A-Z0-9+(][A-Z0-9+()\-./ \t]*$")
_CONTEXT = re.compile(
    r"(?i)bearer|api[_-]?key|secret|token|passw|pwd|credential|access[_-]?key|\bauth|aws|"
    r"://|-----BEGIN"
)


def hold_from(text: str, window: int) -> int:
    """Where the tail that could still become (part of) a finding starts."""
    start = _LAST_WORD.search(text).start()  # type: ignore[union-attr]
    run = _VALUE_RUN.search(text)
    if run is not None and any(c.isdigit() for c in run.group()):
        start = min(start, run.start())
    floor = max(0, len(text) - window)
    context = _CONTEXT.search(text, floor)
    if context is not None:
        start = min(start, context.start())
    return max(start, floor)


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
            cut = hold_from(self.pending, self.window)
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
