"""Length limits: characters and (approximate) tokens per scanned text."""

from __future__ import annotations

from safety.base import BaseScanner, Finding, ScanContext, Verdict


class LengthScanner(BaseScanner):
    name = "length"

    def __init__(self, max_chars: int = 200_000, max_words: int | None = None) -> None:
        self.max_chars, self.max_words = max_chars, max_words

    def scan(self, text: str, context: ScanContext) -> Verdict:
        if len(text) > self.max_chars:
            return Verdict("block", [Finding("too_long", 0, len(text))], 1.0)
        if self.max_words is not None and len(text.split()) > self.max_words:
            return Verdict("block", [Finding("too_many_words", 0, len(text))], 1.0)
        return Verdict()
