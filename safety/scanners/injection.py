"""Prompt injection and jailbreaks, in layers: phrases first, then a classifier.

1. ``heuristics``: attack phrases (English, German) on normalised text; a hit blocks at once.
2. The classifier: logistic regression over character n-gram TF-IDF (hashed, so no vocabulary
   to ship) and the MiniLM sentence embedding, trained by ``ragline safety train`` on
   ``prompt-injections/train.csv``. Its weights are a small ``.npz`` (no pickle) shipped in the
   package (``safety/models/injection.npz``). The embedding comes from the shared embedder, so a
   text that retrieval or few-shot selection already embedded is not embedded again.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from safety.base import Finding, ScanContext, Verdict
from safety.scanners.heuristics import heuristic_hits
from safety.scanners.unicode import normalise

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "injection.npz"
N_FEATURES = 1 << 20
NGRAMS = (2, 5)


def char_vectorizer() -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        analyzer="char_wb",
        ngram_range=NGRAMS,
        n_features=N_FEATURES,
        alternate_sign=False,
        norm=None,
        lowercase=True,
    )


def char_features(texts: list[str], idf: np.ndarray) -> Any:
    """Sublinear TF x IDF, L2-normalised rows (what TfidfVectorizer(sublinear_tf=True) does)."""
    from sklearn.preprocessing import normalize

    counts = _VECTORIZER.transform(texts).astype(np.float64).tocsr()
    counts.data = (1.0 + np.log(counts.data)) * idf[counts.indices]  # O(non-zeros)
    counts.eliminate_zeros()
    return normalize(counts)


_VECTORIZER = char_vectorizer()


class InjectionModel:
    """Weights of the trained classifier: ``P(injection | text, embedding)``."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.idf = np.zeros(N_FEATURES)
        self.idf[weights["char_index"]] = weights["char_idf"]
        self.char_coef = np.zeros(N_FEATURES)
        self.char_coef[weights["char_index"]] = weights["char_coef"]
        self.emb_coef = weights["emb_coef"].astype(np.float64)
        self.intercept = float(weights["intercept"][0])
        self.threshold = float(weights["threshold"][0])

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> InjectionModel:
        with np.load(path, allow_pickle=False) as data:
            return cls({k: data[k] for k in data.files})

    def probability(self, texts: list[str], embeddings: np.ndarray | None) -> np.ndarray:
        logits = char_features(texts, self.idf) @ self.char_coef + self.intercept
        if embeddings is not None and self.emb_coef.any():
            logits = logits + embeddings.astype(np.float64) @ self.emb_coef
        return 1.0 / (1.0 + np.exp(-logits))


class InjectionScanner:
    name = "injection"

    def __init__(
        self,
        embedder: Any | None = None,
        threshold: float | None = None,
        model_path: Path | None = None,
        use_classifier: bool = True,
    ) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.model_path = model_path or MODEL_PATH
        self.use_classifier = use_classifier

    @cached_property
    def model(self) -> InjectionModel:
        return InjectionModel.load(self.model_path)

    def warm(self) -> None:
        """Load the weights and the embedder now, not inside the first request's budget."""
        self.scan("warm up", ScanContext())

    def scan(self, text: str, context: ScanContext) -> Verdict:
        hidden = context.extras.get("hidden_text")
        if hidden:
            text = f"{text}\n{hidden}"
        spans = heuristic_hits(normalise(text))
        if spans:
            return Verdict("block", [Finding("prompt_injection", *spans[0])], 1.0)
        if not self.use_classifier or not text.strip():
            return Verdict()
        embedding = None
        if self.embedder is not None and self.model.emb_coef.any():
            embedding = np.asarray(self.embedder.embed_one(text)).reshape(1, -1)
        score = float(self.model.probability([text], embedding)[0])
        threshold = self.threshold if self.threshold is not None else self.model.threshold
        if score >= threshold:
            return Verdict("block", [Finding("prompt_injection", 0, len(text), score)], score)
        return Verdict("allow", [], score)
