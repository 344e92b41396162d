"""Personal data: e-mail addresses, phone numbers, payment cards (Luhn), IBANs (ISO 13616
mod-97), US social security numbers (SSA's allocation rules) and IP addresses (``ipaddress``).

Actions: ``block``; ``mask`` (``j***@example.com``-style: keeps enough to recognise, not enough to
use); ``replace`` with typed placeholders (``<EMAIL_1>``, the same value always the same number
within a request) whose originals ``Placeholders.restore`` can put back into the model's answer.
Checksums keep false positives down: a 16-digit order number is not a card unless Luhn agrees.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import regex

from safety.base import (
    BaseScanner,
    Finding,
    ScanContext,
    Verdict,
    apply_redactions,
    hold_from,
)

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"
)
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])"
)
NANP = re.compile(r"\d{3}[-.]\d{3}[-.]\d{4}")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")

TYPES = ("email", "credit_card", "iban", "us_ssn", "phone", "ip_address")
# what a stream must hold back for each type: a tail that could still become one (`regex`'s
# partial matching; an e-mail's local part is any word, so with e-mails on, every word waits)
_HOLD = {
    "email": [EMAIL],
    "credit_card": [CARD],
    "iban": [IBAN],
    "us_ssn": [SSN],
    "phone": [PHONE],
    "ip_address": [IPV4, IPV6],
}


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(value: str) -> bool:
    compact = value.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def find_pii(text: str, types: tuple[str, ...] = TYPES) -> list[Finding]:
    found: list[Finding] = []

    def add(kind: str, start: int, end: int) -> None:
        if kind in types and not any(f.start < end and start < f.end for f in found):
            found.append(Finding(kind, start, end))

    for m in EMAIL.finditer(text):
        add("email", m.start(), m.end())
    for m in IBAN.finditer(text):
        if iban_valid(m.group()):
            add("iban", m.start(), m.end())
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn(digits):
            add("credit_card", m.start(), m.end())
    for m in SSN.finditer(text):
        if ssn_valid(*m.groups()):
            add("us_ssn", m.start(), m.end())
    for m in IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        add("ip_address", m.start(), m.end())
    for m in IPV6.finditer(text):
        if m.group().count(":") >= 2:
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            add("ip_address", m.start(), m.end())
    for m in PHONE.finditer(text):
        value = m.group()
        digits = re.sub(r"\D", "", value)
        # international (+...), an area code in parentheses, or North American 3-3-4 with
        # dashes or dots; bare digit runs ("2021 2022 2023", "1 2 3 ... 10") are not phones
        phone_like = value.startswith(("+", "(")) or NANP.fullmatch(value) is not None
        if 7 <= len(digits) <= 15 and phone_like:
            add("phone", m.start(), m.end())
    return sorted(found, key=lambda f: f.start)


def mask(kind: str, value: str) -> str:
    if kind == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@{domain}"
    digits = re.sub(r"\D", "", value)
    if kind in ("credit_card", "iban"):
        return "*" * max(len(value.replace(" ", "")) - 4, 0) + value.replace(" ", "")[-4:]
    if kind == "us_ssn":
        return "***-**-" + digits[-4:]
    if kind == "phone":
        return "*" * max(len(digits) - 2, 0) + digits[-2:]
    return "[IP]"


@dataclass
class Placeholders:
    """Typed placeholders for one request: value -> ``<EMAIL_1>``; restorable in the answer."""

    forward: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def name(self, kind: str, value: str) -> str:
        if value not in self.forward:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.forward[value] = f"<{kind.upper()}_{self.counts[kind]}>"
        return self.forward[value]

    def restore(self, text: str) -> str:
        for value, token in self.forward.items():
            text = text.replace(token, value)
        return text


_PARTIAL = re.compile(r"<[A-Z_]{0,20}\d{0,4}$")


@dataclass
class StreamRestorer:
    """``Placeholders.restore`` over a stream: a placeholder split across chunks is held back
    until it is whole."""

    placeholders: Placeholders
    pending: str = ""

    def feed(self, text: str) -> str:
        text = self.pending + text
        match = _PARTIAL.search(text)
        cut = match.start() if match else len(text)
        self.pending = text[cut:]
        return self.placeholders.restore(text[:cut])

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return self.placeholders.restore(text)


class PiiScanner(BaseScanner):
    name = "pii"

    def __init__(
        self, action: str = "replace", types: tuple[str, ...] = TYPES, restore: bool = False
    ) -> None:
        if action not in ("block", "mask", "replace"):
            raise ValueError("pii action must be block, mask or replace")
        if restore and action != "replace":
            raise ValueError("pii restore needs action: replace")
        self.restore = restore
        unknown = set(types) - set(TYPES)
        if unknown:
            raise ValueError(f"unknown PII types: {sorted(unknown)}")
        self.action, self.types = action, tuple(types)
        self._partial = [regex.compile(p.pattern) for t in self.types for p in _HOLD[t]]

    def hold(self, text: str) -> int:
        return hold_from(text, self._partial)

    def scan(self, text: str, context: ScanContext) -> Verdict:
        findings = find_pii(text, self.types)
        if not findings:
            return Verdict()
        if self.action == "block":
            return Verdict("block", findings, 1.0)
        if self.action == "mask":
            redacted = apply_redactions(
                text, findings, lambda f: mask(f.type, text[f.start : f.end])
            )
        else:
            holder = context.extras.setdefault("placeholders", Placeholders())
            redacted = apply_redactions(
                text, findings, lambda f: holder.name(f.type, text[f.start : f.end])
            )
        return Verdict("redact", findings, 1.0, redacted)
