"""The scanner protocol: ``Scanner.scan(text, context) -> Verdict``.

A scanner looks at one text (a user message, a retrieved chunk, a window of model output) and
answers allow, redact or block, with the findings that led there. Findings carry their type and
span, never a copy of the matched value (audit logs and responses list types, not secrets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["allow", "redact", "block"]
Where = Literal["input", "retrieved", "output"]
_RANK = {"allow": 0, "redact": 1, "block": 2}


@dataclass(frozen=True)
class Finding:
    type: str  # e.g. "email", "aws_access_key", "prompt_injection", "zero_width"
    start: int = 0
    end: int = 0
    score: float = 1.0


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


class Scanner(Protocol):
    name: str

    def scan(self, text: str, context: ScanContext) -> Verdict: ...


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
