"""The stream guard against every way a model could split a value across chunks: random split
points over texts with secrets and personal data, checked against the whole text scanned at
once; and what ordinary prose costs (nothing held back)."""

from __future__ import annotations

import random

import pytest

from safety.base import ScanContext
from safety.policy import PolicySpec, ScannerSpec, build_policy, default_policy
from safety.stream import StreamGuard

SECRETS = [
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_1234567890abcdefghijklmnopqrstuvwxyz12",
    "xoxb-1234567890-abcdefghijklmn",
    "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    "glpat-abcdefghij1234567890",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
]
PII = ["+1 (415) 555-0100", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "078-05-1120"]
CONTEXTS = [
    "The key is {v} and that is all.",
    "Sure! Use {v}.",
    "{v}",
    "Call me at {v} tomorrow, or write.",
    "password: {v} (rotate it)",
    "Connect with https://admin:{v}@db.example.com/prod now.",
    "Authorization: Bearer {v}\nThen retry.",
]


def _policy(types: list[str] | None = None):  # type: ignore[no-untyped-def]
    pii: dict[str, object] = {"action": "mask"}
    if types is not None:
        pii["types"] = types
    spec = PolicySpec(
        name="out",
        scanners=[
            ScannerSpec(type="unicode"),
            ScannerSpec(type="secrets", options={"action": "redact"}),
            ScannerSpec(type="pii", options=pii),
        ],
    )
    return build_policy(spec)


def _stream(policy, text: str, cuts: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    guard = StreamGuard(policy)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out = [guard.feed(p).text for p in pieces if p]
    out.append(guard.finish().text)
    return out


def _values(text: str) -> list[str]:
    return [v for v in SECRETS + PII + ["jane.doe@example.com", "hunter2hunter2X9"] if v in text]


@pytest.mark.parametrize("emails", [False, True], ids=["default-types", "with-emails"])
def test_no_value_leaves_unredacted_whatever_the_split(emails: bool) -> None:
    # the default policy's output types plus IBANs (their holds are the subtle ones), or all
    policy = _policy(None if emails else ["credit_card", "iban", "us_ssn", "phone"])
    context = ScanContext(where="output")
    rng = random.Random(7)
    texts = [c.format(v=v) for c in CONTEXTS for v in SECRETS + PII + ["hunter2hunter2X9"]]
    if emails:
        texts += [f"Mail jane.doe@example.com{tail}" for tail in (".", " now", "")]
    checked = 0
    for text in texts:
        whole = policy.run(text, context).text
        for _ in range(25):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
            released = _stream(policy, text, cuts)
            joined = "".join(released)
            for value in _values(text):
                if value in whole:
                    continue  # not a finding of this policy (a weak password, say)
                # no released piece carries a value the policy redacts, nor do they together
                for piece in released:
                    assert value not in piece
                assert value not in joined
                if value[:8] not in whole:  # nor its beginning, where redaction hides it
                    assert not any(value[:8] in p for p in released), (text, cuts)
            assert joined == whole, (text, cuts, released)
            checked += 1
    assert checked == len(texts) * 25


def test_prose_is_released_with_the_token_that_brought_it() -> None:
    guard = StreamGuard(build_policy(default_policy()), ScanContext(where="output"))
    tokens = ["I", "'m", " sure", ",", " the", " capital", " of", " France", " is", " Paris", "."]
    released = [guard.feed(t).text for t in tokens]
    assert released == tokens  # nothing held back: no finding can start in these words
    held = StreamGuard(build_policy(default_policy()), ScanContext(where="output"))
    assert held.feed("Call +1 (415)").text == "Call "  # a phone number may be arriving
    assert held.feed(" 555-0100 now").text == "*********00 now"
