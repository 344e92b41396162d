"""Invisible and confusable Unicode: Unicode tag characters (the ASCII-smuggling block), zero-width
characters, bidirectional overrides and isolates, and other format controls.

``mode="strip"`` removes them (the model never sees text smuggled in tag characters);
``mode="block"`` refuses the text. ``normalise`` is what detection scanners match on: NFKC, common
Cyrillic and Greek look-alikes folded to Latin, invisible characters dropped and tag characters
decoded to the ASCII they hide. It is for detection only: the text sent on keeps its letters (a
Russian message stays Russian).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

from safety.base import BaseScanner, Finding, ScanContext, Verdict

_ZERO_WIDTH = {0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x180E, 0x2061, 0x2062, 0x2063, 0x2064}
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}
# Cyrillic and Greek letters that render like Latin ones (the common homoglyph attacks)
_CONFUSABLE = str.maketrans(
    "АВЕКМНОРСТХаеорсухіјѕԁɡΑΒΕΖΗΙΚΜΝΟΡΤΥΧαοϲ",
    "ABEKMHOPCTXaeopcyxijsdgABEZHIKMNOPTYXaoc",
)


def classify(ch: str) -> str | None:
    cp = ord(ch)
    if 0xE0000 <= cp <= 0xE007F:
        return "unicode_tags"
    if cp in _ZERO_WIDTH:
        return "zero_width"
    if cp in _BIDI:
        return "bidi_control"
    if unicodedata.category(ch) == "Cf":
        return "format_control"
    return None


@cache
def _suspicious() -> re.Pattern[str]:
    """One character class of everything ``classify`` reports (built once, ~0.3 s): a text
    without any is passed over at C speed instead of a Python call per character."""
    points = {cp for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cf"}
    points |= _ZERO_WIDTH | _BIDI | set(range(0xE0000, 0xE0080))
    ranges: list[list[int]] = []
    for cp in sorted(points):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]")


class UnicodeScanner(BaseScanner):
    name = "unicode"
    local = True  # character by character: a stream scans each delta as it arrives

    def __init__(self, mode: str = "strip") -> None:
        if mode not in ("strip", "block"):
            raise ValueError("unicode mode must be strip or block")
        self.mode = mode

    def warm(self) -> None:
        _suspicious()

    def scan(self, text: str, context: ScanContext) -> Verdict:
        if not _suspicious().search(text):
            return Verdict()
        findings: list[Finding] = []
        out: list[str] = []
        for i, ch in enumerate(text):
            kind = classify(ch)
            if kind is None:
                out.append(ch)
                continue
            if findings and findings[-1].type == kind and findings[-1].end == i:
                findings[-1] = Finding(kind, findings[-1].start, i + 1)
            else:
                findings.append(Finding(kind, i, i + 1))
        if not findings:
            return Verdict()
        hidden = "".join(chr(ord(ch) - 0xE0000) for ch in text if 0xE0020 <= ord(ch) <= 0xE007E)
        if hidden:  # the detection scanners after this one still read what was smuggled
            context.extras["hidden_text"] = hidden
        if self.mode == "block":
            return Verdict("block", findings, 1.0)
        return Verdict("redact", findings, 1.0, "".join(out))


def normalise(text: str) -> str:
    """The text detection scanners match on (see the module docstring)."""
    if not _suspicious().search(text):
        return unicodedata.normalize("NFKC", text).translate(_CONFUSABLE)
    out = []
    for ch in text:
        kind = classify(ch)
        if kind is None:
            out.append(ch)
        elif kind == "unicode_tags" and 0xE0020 <= ord(ch) <= 0xE007E:
            out.append(chr(ord(ch) - 0xE0000))
    return unicodedata.normalize("NFKC", "".join(out)).translate(_CONFUSABLE)
