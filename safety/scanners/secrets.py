"""Credentials: the detector set of detect-secrets' plugins (private keys, AWS, GitHub, GitLab,
Slack, Stripe, Twilio, SendGrid, npm, PyPI, OpenAI, Google API keys, JWTs, basic-auth URLs,
bearer tokens) plus generic high-entropy values next to a credential keyword.

Why not detect-secrets itself: it scans files line by line through a plugin registry with global
settings, and reports line numbers, not spans; the gateway needs spans in one string, in
microseconds, to redact. The patterns below follow its plugins' regular expressions.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import regex

from safety.base import BaseScanner, Finding, ScanContext, Verdict, hold_from

PATTERNS: dict[str, re.Pattern[str]] = {
    "private_key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|$)"
    ),
    "aws_access_key": re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    "aws_secret_key": re.compile(
        r"(?i)aws.{0,20}(?:secret|key).{0,20}?['\"=:\s]\s*([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
    ),
    "github_token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,})"),
    "gitlab_token": re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    "slack_token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "stripe_key": re.compile(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{20,}"),
    "twilio_key": re.compile(r"\bSK[0-9a-fA-F]{32}\b"),
    "sendgrid_key": re.compile(r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b"),
    "npm_token": re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"),
    "pypi_token": re.compile(r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
    "openai_key": re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
    "google_api_key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    # not inside a run of token characters (`\b` would let every `eyJ` of `eyJ-eyJ-...` start a
    # scan to the run's end: quadratic)
    "jwt": re.compile(
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    ),
    # the scheme is not matched: any `://user:password@` is a credential, and `[a-z0-9+.-]*`
    # before `://` backtracks quadratically on long runs of such characters
    "basic_auth_url": re.compile(r"://[^\s:/@]{1,64}:([^\s:/@]{3,128})@"),
    "bearer_token": re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)"),
}
# a keyword, an assignment, then a value worth measuring
_KEYWORD = re.compile(
    r"(?i)(?<![A-Za-z])(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|credential|access[_-]?key|auth)"
    r"[\w-]{0,20}\s*(?:[:=]|\bis\b)\s*['\"]?([^\s'\"]{12,200})"
)


# the same patterns in the `regex` module, whose partial matching tells whether a text's tail
# could still become a match (for streams)
_PARTIAL = [regex.compile(p.pattern) for p in (*PATTERNS.values(), _KEYWORD)]


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _high_entropy(value: str) -> bool:
    if re.fullmatch(r"[0-9a-fA-F]+", value):
        return len(value) >= 20 and entropy(value) >= 3.0
    kinds = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]"))
    return kinds >= 3 and entropy(value) >= 3.5


def find_secrets(text: str) -> list[Finding]:
    findings: list[Finding] = []
    for kind, pattern in PATTERNS.items():
        for m in pattern.finditer(text):
            start, end = (m.start(1), m.end(1)) if m.groups() else (m.start(), m.end())
            findings.append(Finding(kind, start, end, context=m.start()))
    for m in _KEYWORD.finditer(text):
        value = m.group(1)
        if _high_entropy(value) and not any(f.start <= m.start(1) < f.end for f in findings):
            findings.append(
                Finding("high_entropy_secret", m.start(1), m.end(1), entropy(value), m.start())
            )
    return sorted(findings, key=lambda f: f.start)


class SecretsScanner(BaseScanner):
    name = "secrets"

    def __init__(self, action: str = "block") -> None:
        if action not in ("block", "redact"):
            raise ValueError("secrets action must be block or redact")
        self.action = action

    def hold(self, text: str) -> int:
        return hold_from(text, _PARTIAL)

    def scan(self, text: str, context: ScanContext) -> Verdict:
        findings = find_secrets(text)
        if not findings:
            return Verdict()
        if self.action == "block":
            return Verdict("block", findings, 1.0)
        from safety.base import apply_redactions

        redacted = apply_redactions(text, findings, lambda f: f"[REDACTED_{f.type.upper()}]")
        return Verdict("redact", findings, 1.0, redacted)
