"""Train and test splits of the safety data, fixed by each text's id.

Every labelled or benign text has an id, the first 12 hex digits of the SHA-1 of its text, and
lies in the test part when a second hash of that id falls below the set's test fraction. So the
split does not depend on the order of the file or on what else is in it: adding a prompt to
``hard_benign.txt`` moves no other prompt, and duplicates of a text land on the same side.
Settings (weights, threshold) are chosen by cross-validation on the train parts; the test parts
are scored once, by ``ragline eval safety``; ``tests/safety/test_splits.py`` pins a hash of each
split's ids so that no change can quietly train on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# the share of each kind of set held out
TEST_FRACTION = {"labelled": 0.2, "prompts": 0.4, "documents": 0.4}


def text_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def in_test(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"ragline-safety-split:{text_id(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split(texts: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the train and the test part."""
    test = [i for i, text in enumerate(texts) if in_test(text, fraction)]
    held = set(test)
    return [i for i in range(len(texts)) if i not in held], test


def digest(texts: Sequence[str]) -> str:
    """A short hash of a part's ids, order-free: what the tests pin."""
    ids = "\n".join(sorted({text_id(t) for t in texts}))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]
