"""Banned topics: cosine similarity of the text's embedding to topic descriptions from config.

Each topic is a name and one or more descriptions; a text whose MiniLM embedding is at least
``threshold`` similar to any description of a topic is blocked, naming the topic. The text's
embedding comes from the shared embedder (its LRU means one embedding per text per request).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from safety.base import BaseScanner, Finding, ScanContext, Verdict


class TopicsScanner(BaseScanner):
    name = "topics"

    def __init__(
        self, embedder: Any, topics: dict[str, list[str] | str], threshold: float = 0.5
    ) -> None:
        if embedder is None:
            raise ValueError("the topics scanner needs the embedder")
        if not topics:
            raise ValueError("the topics scanner needs at least one topic")
        self.embedder = embedder
        self.topics = {k: [v] if isinstance(v, str) else list(v) for k, v in topics.items()}
        self.threshold = threshold

    @cached_property
    def _matrix(self) -> tuple[list[str], np.ndarray]:
        names = [name for name, texts in self.topics.items() for _ in texts]
        texts = [t for ts in self.topics.values() for t in ts]
        return names, np.asarray(self.embedder.embed(texts))

    def warm(self) -> None:
        self._matrix  # noqa: B018 - embeds the topic descriptions now

    def scan(self, text: str, context: ScanContext) -> Verdict:
        if not text.strip():
            return Verdict()
        names, matrix = self._matrix
        sims = matrix @ np.asarray(self.embedder.embed_one(text))
        best = int(np.argmax(sims))
        score = float(sims[best])
        if score >= self.threshold:
            return Verdict("block", [Finding(f"topic:{names[best]}", 0, len(text), score)], score)
        return Verdict("allow", [], score)
