"""Variants of the user's question for data written in one phrasing (``ragline finetune
--augment N``).

A fact taught in one phrasing is learnt as that phrasing: asked otherwise, the adapter answers
less often (README, "Fine-tuning"). ``augment`` adds N copies of each training example whose
last user turn is reworded without a model: framed differently ("Quick question: ...", "...
Thanks."), lower-cased, without its question mark, and with a few words dropped or two
neighbours swapped (EDA's random deletion and swap, Wei and Zou 2019). The answer stays as
written. Copies keep their source's line number, so an example and its copies always land on the
same side of the eval split, and only training examples are copied.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from finetune.data import Example

FRAMES: tuple[Callable[[str], str], ...] = (
    lambda q: f"Quick question: {q}",
    lambda q: f"{q} Please answer in one sentence.",
    lambda q: f"I'd like to know something. {q}",
    lambda q: f"Can you tell me? {q}",
    lambda q: f"Hi! {q}",
    lambda q: f"{q} Thanks.",
    lambda q: f"Question: {q}",
    lambda q: f"Do you happen to know this: {q}",
    lambda q: q.lower(),
    lambda q: q.rstrip(" ?"),
    lambda q: f"{q} I need it for a quiz.",
    lambda q: f"Tell me: {q}",
)
DROP = 0.15  # the chance of dropping each word of a question longer than three words


def _reword(question: str, rng: random.Random) -> str:
    words = question.split()
    if len(words) > 3:
        kept = [w for w in words if rng.random() >= DROP]
        words = kept if len(kept) >= 3 else words
        if rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def variants(question: str, copies: int, rng: random.Random) -> list[str]:
    """``copies`` rewordings of ``question``, distinct from it where possible."""
    out: list[str] = []
    frames = list(FRAMES)
    rng.shuffle(frames)
    for i in range(copies * 4):
        if len(out) == copies:
            break
        text = frames[i % len(frames)](_reword(question, rng) if i % 2 else question)
        if text != question and text not in out:
            out.append(text)
    return out


def augment(examples: list[Example], copies: int, seed: int = 0) -> list[Example]:
    """The copies to add (not the originals): each example's last user turn reworded."""
    rng = random.Random(seed)
    out = []
    for example in examples:
        users = [i for i, m in enumerate(example.messages) if m["role"] == "user"]
        if not users or not any(m["role"] == "assistant" for m in example.messages[users[-1] :]):
            continue
        turn = users[-1]
        for text in variants(example.messages[turn]["content"], copies, rng):
            messages = [dict(m) for m in example.messages]
            messages[turn]["content"] = text
            out.append(Example(messages, example.line))
    return out
