"""Every pattern a scanner runs grows linearly with its input, on the inputs that make
backtracking patterns quadratic (runs of the characters a pattern repeats over, with the anchor
it starts at repeated inside them). Python's ``re`` holds the GIL while it matches, so one
quadratic pattern on a 100 kB message would stall the whole server.

Measured as a ratio within one run (the time on 4x the input over the time on the input; linear
is about 4, quadratic about 16), never as an absolute time: these machines are shared.
"""

from __future__ import annotations

import re
import time

import pytest

from safety.scanners import heuristics, pii
from safety.scanners.secrets import _KEYWORD, PATTERNS

UNITS = ["a.", "eyJ-", "eyJa.", "a", "1 ", "1-", "a:", "://a", "a@", "a@a.", "DE00 ", "+1 ",
         "(1) ", "1.", "0:", "a:a", "api_key=", "bearer ", "-----BEGIN ", "sk-", "ghp_", "AKIA",
         "xoxb-", "aws secret ", "ignore ", "ignore previous "]  # fmt: skip

SCANNER_PATTERNS: dict[str, re.Pattern[str]] = {
    **{f"secrets.{name}": p for name, p in PATTERNS.items()},
    "secrets.keyword": _KEYWORD,
    **{
        f"pii.{name}": getattr(pii, name)
        for name in ("EMAIL", "CARD", "IBAN", "SSN", "PHONE", "NANP", "IPV4", "IPV6")
    },  # fmt: skip
    **{f"heuristics.{i}": p for i, p in enumerate(heuristics.PATTERNS)},
}


def _seconds(pattern: re.Pattern[str], text: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in pattern.finditer(text):
            pass
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("name", sorted(SCANNER_PATTERNS))
def test_pattern_time_grows_linearly(name: str) -> None:
    pattern = SCANNER_PATTERNS[name]
    for unit in UNITS:
        small = unit * (4000 // len(unit))
        large = unit * (16000 // len(unit))
        base = _seconds(pattern, small)
        if base < 2e-4:
            continue  # too fast to be quadratic at this size; ratios of noise mean nothing
        ratio = _seconds(pattern, large) / base
        assert ratio < 10, f"{name} on {unit!r}: 4x the input took {ratio:.1f}x the time"
