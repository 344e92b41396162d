"""Few-shot selection: the template's examples in declared order (static) or the ``k`` nearest to
the request by embedding similarity (dynamic), within the template's token budget for examples.

The returned list is in priority order, highest first: that is the order the token budget drops
them from the end, and ``render`` receives them reversed so the nearest example sits next to the
question.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prompts.template import Example, FewShot, Template
from rag.embeddings import Embedder


class FewShotSelector:
    def __init__(self, embedder: Embedder | None) -> None:
        self.embedder = embedder
        self._vectors: dict[int, np.ndarray] = {}  # id(FewShot) -> example vectors

    def select(
        self,
        template: Template,
        query: str,
        count_tokens: Callable[[str], int] | None = None,
    ) -> list[Example]:
        few = template.spec.few_shot
        if few is None:
            return []
        ranked = list(few.examples) if few.mode == "static" else self.nearest(few, query)
        chosen: list[Example] = []
        used = 0
        for example in ranked:
            if len(chosen) == few.k:
                break
            if few.max_tokens is not None and count_tokens is not None:
                cost = count_tokens(example.user) + count_tokens(example.assistant)
                if used + cost > few.max_tokens:
                    continue
                used += cost
            chosen.append(example)
        return chosen

    def nearest(self, few: FewShot, query: str) -> list[Example]:
        """All examples, most similar to ``query`` first."""
        if self.embedder is None:
            raise RuntimeError("dynamic few-shot selection needs an embedder")
        vectors = self._vectors.get(id(few))
        if vectors is None:
            vectors = self.embedder.embed([e.user for e in few.examples])
            self._vectors[id(few)] = vectors
        scores = vectors @ self.embedder.embed_one(query)
        order = np.argsort(-scores, kind="stable")
        return [few.examples[i] for i in order]
