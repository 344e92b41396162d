"""The scanner protocol: ``Scanner.scan(text, context) -> Verdict``.

A scanner looks at one text (a user message, a retrieved chunk, a window of model output) and
answers allow, redact or block, with the findings that led there. Findings carry their type and
span, never a copy of the matched value (audit logs and responses list types, not secrets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import regex

HOLD_WINDOW = 256  # the longest tail a stream holds back for a value that may still arrive
Action = Literal["allow", "redact", "block"]
Where = Literal["input", "retrieved", "output"]
_RANK = {"allow": 0, "redact": 1, "block": 2}


@dataclass(frozen=True)
class Finding:
    type: str  # e.g. "email", "aws_access_key", "prompt_injection", "zero_width"
    start: int = 0
    end: int = 0
    score: float = 1.0
    context: int | None = None  # where the text it was found by starts, if before ``start``

    @property
    def anchor(self) -> int:
        """The first character the finding depends on (``api_key = `` before a value)."""
        return self.start if self.context is None else self.context


@dataclass
class Verdict:
    action: Action = "allow"
    findings: list[Finding] = field(default_factory=list)
    score: float = 0.0
    text: str | None = None  # the redacted (or normalised) text, when the scanner changed it

    def worse(self, other: Verdict) -> bool:
        return _RANK[other.action] > _RANK[self.action]


@dataclass
class ScanContext:
    where: Where = "input"
    key_id: str | None = None
    route: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    role: str | None = None  # input: whose words (user, system, developer, assistant, tool)


class Scanner(Protocol):
    name: str
    local: bool  # its verdict on a text is the concatenation of its verdicts on any split of it

    def scan(self, text: str, context: ScanContext) -> Verdict: ...

    def hold(self, text: str) -> int:
        """Where the tail of ``text`` starts that could still become (part of) a finding once
        more text is appended; ``len(text)`` when no finding can start in it. Streams release
        everything before it."""
        ...


class BaseScanner:
    """Defaults for the ``Scanner`` protocol: not local, and nothing to hold back (a scanner
    that classifies a text as a whole sees each released part on its own)."""

    name = "scanner"
    local = False

    def hold(self, text: str) -> int:
        return len(text)


def apply_redactions(text: str, findings: list[Finding], placeholder: Any) -> str:
    """Replace each finding's span (non-overlapping, left to right) with ``placeholder(f)``."""
    out, cursor = [], 0
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if f.start < cursor:
            continue
        out.append(text[cursor : f.start])
        out.append(placeholder(f))
        cursor = f.end
    out.append(text[cursor:])
    return "".join(out)


# what may separate the parts of a value (a card's groups, a phone number's, an IBAN's, a JWT's)
_SEPARATORS = " \t-./()+:"


def hold_from(text: str, patterns: list[regex.Pattern[str]], window: int = HOLD_WINDOW) -> int:
    """The start of the earliest match of ``patterns`` that more text could still extend or
    complete, looking at the last ``window`` characters; ``len(text)`` when there is none.

    That is a partial match (``regex``'s partial matching: the text ends inside it), or a
    complete one followed by nothing but separators: ``DE89 3704 0044 0532 `` is a complete
    match now, and a longer one once ``0130 00`` arrives."""
    n = len(text)
    start = n
    floor = max(0, n - window)
    for pattern in patterns:
        for m in pattern.finditer(text, floor, partial=True):
            end = m.end()
            if m.start() < start and (
                end == n or (n - end <= 8 and not text[end:].strip(_SEPARATORS))
            ):
                start = m.start()
    return start
