"""Prompt injection and jailbreaks, in layers: phrases first, then a classifier.

1. ``heuristics``: attack phrases (English, German, seven more languages) on normalised text;
   a hit blocks at once.
2. A gate: the same features without the embedding (character n-gram TF-IDF, hashed, so no
   vocabulary to ship). A text it scores below ``gate_below`` is allowed without embedding it:
   most ordinary traffic, which then costs a millisecond instead of a MiniLM pass.
3. The classifier: logistic regression over the character n-grams and the MiniLM sentence
   embedding, trained by ``ragline safety train`` on ``prompt-injections/train.csv`` and benign
   sets (see ``safety/train.py``). Its weights are a small ``.npz`` (no pickle) shipped in the
   package (``safety/models/injection.npz``). The embedding comes from the shared embedder, so a
   text that retrieval or few-shot selection already embedded is not embedded again.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from safety.base import BaseScanner, Finding, ScanContext, Verdict
from safety.scanners.heuristics import attack_phrases
from safety.scanners.unicode import normalise

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "injection.npz"
# messages that instruct the model: the classifier, trained to call instructions and role-play
# attacks, would refuse every "You are a helpful assistant."; attack phrases are still refused
INSTRUCTION_ROLES = frozenset({"system", "developer", "assistant"})
N_FEATURES = 1 << 20
NGRAMS = (2, 5)


_BASE = np.uint64(1_000_003)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top 20 bits pick the feature
_SHIFT = np.uint64(64 - 20)


_SHORT = 128  # characters: below this, plain Python beats numpy's per-call overhead
_MASK = (1 << 64) - 1


def ngram_indices(text: str) -> np.ndarray:
    """Feature indices of the character 2- to 5-grams of each lower-cased word padded with a
    space (scikit-learn's ``char_wb`` analyzer), hashed with numpy: 9x faster than
    ``HashingVectorizer`` on a 500-token text (0.4 ms instead of 3.7), the same n-grams. A short
    text is hashed in plain Python (the same numbers: 6 µs instead of 31 for "hi")."""
    if len(text) < _SHORT:
        return np.array(_short_ngram_indices(text), dtype=np.int64)
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.int64)
    padded = " " + "  ".join(words) + " "
    raw = padded.encode("utf-32-le", "surrogatepass")  # lone surrogates hash too
    codes = np.frombuffer(raw, dtype=np.uint32).astype(np.uint64)
    lengths = np.fromiter((len(w) + 2 for w in words), dtype=np.int64, count=len(words))
    word_end = np.repeat(np.cumsum(lengths), lengths)  # where each position's padded word ends
    positions = np.arange(len(codes))
    hashes, out = codes, []
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps: that is the hash
        for n in range(NGRAMS[0], NGRAMS[1] + 1):
            hashes = hashes[:-1] * _BASE + codes[n - 1 :]  # codes[i : i + n] at index i
            inside = positions[: len(hashes)] + n <= word_end[: len(hashes)]
            out.append((((hashes[inside] + np.uint64(n)) * _MIX) >> _SHIFT).astype(np.int64))
    return np.concatenate(out)


def _short_ngram_indices(text: str) -> list[int]:
    base, mix, shift = int(_BASE), int(_MIX), int(_SHIFT)
    out = []
    for word in text.lower().split():
        codes = [32, *map(ord, word), 32]
        size = len(codes)
        for i in range(size - 1):
            h = codes[i]
            for n in range(2, min(NGRAMS[1], size - i) + 1):
                h = (h * base + codes[i + n - 1]) & _MASK
                out.append((((h + n) * mix) & _MASK) >> shift)
    return out


def char_counts(texts: list[str]) -> Any:
    """``(len(texts), N_FEATURES)`` sparse n-gram counts."""
    from scipy.sparse import csr_matrix

    columns, values, indptr = [], [], [0]
    for text in texts:
        index, counts = np.unique(ngram_indices(text), return_counts=True)
        columns.append(index)
        values.append(counts.astype(np.float64))
        indptr.append(indptr[-1] + len(index))
    if not texts:
        return csr_matrix((0, N_FEATURES))
    return csr_matrix(
        (np.concatenate(values), np.concatenate(columns), np.array(indptr)),
        shape=(len(texts), N_FEATURES),
    )


def char_features(texts: list[str], idf: np.ndarray) -> Any:
    """Sublinear TF x IDF, L2-normalised rows (what TfidfVectorizer(sublinear_tf=True) does)."""
    counts = char_counts(texts)
    counts.data = (1.0 + np.log(counts.data)) * idf[counts.indices]  # O(non-zeros)
    counts.eliminate_zeros()
    for row in range(counts.shape[0]):  # L2 rows in place (sklearn's normalize: +1 ms a call)
        part = counts.data[counts.indptr[row] : counts.indptr[row + 1]]
        norm = np.sqrt(part @ part)
        if norm > 0:
            part /= norm
    return counts


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
        self.gate_coef: np.ndarray | None = None
        self.gate_below = 0.0
        if "gate_coef" in weights:
            self.gate_coef = np.zeros(N_FEATURES)
            self.gate_coef[weights["char_index"]] = weights["gate_coef"]
            self.gate_intercept = float(weights["gate_intercept"][0])
            self.gate_below = float(weights["gate_below"][0])

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> InjectionModel:
        with np.load(path, allow_pickle=False) as data:
            return cls({k: data[k] for k in data.files})

    def features(self, texts: list[str]) -> Any:
        return char_features(texts, self.idf)

    def probability(
        self, texts: list[str], embeddings: np.ndarray | None, features: Any = None
    ) -> np.ndarray:
        features = self.features(texts) if features is None else features
        logits = features @ self.char_coef + self.intercept
        if embeddings is not None and self.emb_coef.any():
            logits = logits + embeddings.astype(np.float64) @ self.emb_coef
        return 1.0 / (1.0 + np.exp(-logits))

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One text's features as (indices, values), the same numbers as a row of
        ``features([text])`` without building a sparse matrix (a tenth of the time for a short
        request, which is what the request path sees)."""
        index, counts = np.unique(ngram_indices(text), return_counts=True)
        values = (1.0 + np.log(counts)) * self.idf[index]
        keep = values != 0
        index, values = index[keep], values[keep]
        norm = np.sqrt(values @ values)
        return index, values / norm if norm > 0 else values

    def score_row(
        self, row: tuple[np.ndarray, np.ndarray], embedding: np.ndarray | None = None
    ) -> float:
        """``probability`` of one text from its ``row``."""
        index, values = row
        logit = float(values @ self.char_coef[index]) + self.intercept
        if embedding is not None and self.emb_coef.any():
            logit += float(embedding.astype(np.float64).reshape(-1) @ self.emb_coef)
        return 1.0 / (1.0 + math.exp(-logit))

    def gate_row(self, row: tuple[np.ndarray, np.ndarray]) -> float:
        """``gate`` of one text from its ``row``."""
        if self.gate_coef is None:
            return 1.0
        index, values = row
        return 1.0 / (
            1.0 + math.exp(-(float(values @ self.gate_coef[index]) + self.gate_intercept))
        )

    def gate(self, texts: list[str], features: Any = None) -> np.ndarray:
        """``P(injection | text)`` from character n-grams alone: no embedding needed. Texts
        below ``gate_below`` are allowed without embedding them (ones if there is no gate)."""
        if self.gate_coef is None:
            return np.ones(len(texts))
        features = self.features(texts) if features is None else features
        logits = features @ self.gate_coef + self.gate_intercept
        return 1.0 / (1.0 + np.exp(-logits))


class InjectionScanner(BaseScanner):
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
        if self.embedder is not None:
            self.embedder.embed(["warm up"])

    def scan(self, text: str, context: ScanContext) -> Verdict:
        hidden = context.extras.get("hidden_text")
        if hidden:
            text = f"{text}\n{hidden}"
        spans = attack_phrases(normalise(text))
        if spans:
            return Verdict("block", [Finding("prompt_injection", *spans[0])], 1.0)
        if not self.use_classifier or not text.strip() or context.role in INSTRUCTION_ROLES:
            return Verdict()
        row = self.model.row(text)
        gate = self.model.gate_row(row)
        if gate < self.model.gate_below:  # clearly benign on its characters: no embedding
            return Verdict("allow", [], gate)
        embedding = None
        if self.embedder is not None and self.model.emb_coef.any():
            embedding = np.asarray(self.embedder.embed_one(text)).reshape(1, -1)
        score = self.model.score_row(row, embedding)
        threshold = self.threshold if self.threshold is not None else self.model.threshold
        if score >= threshold:
            return Verdict("block", [Finding("prompt_injection", 0, len(text), score)], score)
        return Verdict("allow", [], score)
