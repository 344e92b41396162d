"""Training and cross-validating the injection classifier (``ragline safety train``).

The data: a CSV with ``text`` and ``label`` (1 = injection). Features: hashed character n-grams
(TF-IDF) and the MiniLM embedding; model: L2-regularised logistic regression (scikit-learn).
``cross_validate`` scores each layer with stratified k-fold CV, the baselines (the phrase list
alone, MiniLM + logistic regression) in the same run.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safety.scanners.heuristics import heuristic_hits
from safety.scanners.injection import N_FEATURES, char_features, char_vectorizer

C = 100.0
THRESHOLD = 0.7


def load_csv(path: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns text,label")
        for number, row in enumerate(reader, 2):
            if row["label"] not in ("0", "1"):
                raise ValueError(f"{path}:{number}: label must be 0 or 1, got {row['label']!r}")
            texts.append(row["text"])
            labels.append(int(row["label"]))
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: needs examples of both labels")
    return texts, np.array(labels)


def fit_idf(texts: list[str]) -> np.ndarray:
    counts = char_vectorizer().transform(texts)
    df = np.bincount(counts.indices, minlength=N_FEATURES)
    n = len(texts)
    idf = np.zeros(N_FEATURES)
    seen = df > 0
    idf[seen] = np.log((1 + n) / (1 + df[seen])) + 1.0  # TfidfVectorizer's smooth idf
    return idf


def fit(texts: list[str], labels: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import LogisticRegression

    idf = fit_idf(texts)
    features = char_features(texts, idf)
    if embeddings is not None:
        features = hstack([features, csr_matrix(embeddings)]).tocsr()
    model = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    model.fit(features, labels)
    coef = model.coef_[0]
    index = np.flatnonzero(idf)
    return {
        "char_index": index.astype(np.int64),
        "char_idf": idf[index],
        "char_coef": coef[:N_FEATURES][index],
        "emb_coef": coef[N_FEATURES:] if embeddings is not None else np.zeros(384),
        "intercept": np.array([float(model.intercept_[0])]),
        "threshold": np.array([THRESHOLD]),
    }


def save(weights: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **weights)
    tmp.replace(path)


@dataclass
class LayerScores:
    name: str
    precision: float
    recall: float
    f1: float
    fpr: float
    latency_ms: dict[str, float] = field(default_factory=dict)


def score(name: str, labels: np.ndarray, predicted: np.ndarray) -> LayerScores:
    tp = int(((predicted == 1) & (labels == 1)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    negatives = int((labels == 0).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return LayerScores(name, precision, recall, f1, fp / negatives if negatives else 0.0)


def cross_validate(
    texts: list[str], labels: np.ndarray, embeddings: np.ndarray, folds: int = 5, seed: int = 0
) -> list[LayerScores]:
    """Out-of-fold predictions for each layer and baseline; one split shared by all."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from safety.scanners.injection import InjectionModel

    n = len(texts)
    p_combined, p_char, p_emb = np.zeros(n), np.zeros(n), np.zeros(n)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, labels):
        tr = [texts[i] for i in train]
        te = [texts[i] for i in test]
        model = InjectionModel(fit(tr, labels[train], embeddings[train]))
        p_combined[test] = model.probability(te, embeddings[test])
        p_char[test] = InjectionModel(fit(tr, labels[train], None)).probability(te, None)
        lr = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
        p_emb[test] = lr.fit(embeddings[train], labels[train]).predict_proba(embeddings[test])[:, 1]
    phrases = np.array([bool(heuristic_hits(t)) for t in texts]).astype(int)
    return [
        score("phrase list (baseline)", labels, phrases),
        score("MiniLM + logistic regression (baseline)", labels, (p_emb >= 0.5).astype(int)),
        score("char n-grams + LR", labels, (p_char >= THRESHOLD).astype(int)),
        score("char n-grams + MiniLM + LR", labels, (p_combined >= THRESHOLD).astype(int)),
        score(
            "injection layer (phrases, then classifier)",
            labels,
            ((p_combined >= THRESHOLD) | (phrases == 1)).astype(int),
        ),
    ]


def embed_all(texts: list[str], embedder: Any) -> np.ndarray:
    started = time.perf_counter()
    vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    del started
    return vectors
