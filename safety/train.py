"""Training and cross-validating the injection classifier (``ragline safety train``).

The data: a CSV with ``text`` and ``label`` (1 = injection), and benign sets that teach the
classifier what ordinary traffic looks like. ``prompt-injections/train.csv`` alone is not enough:
its benign half is short questions, so a model trained on it alone learns "an instruction is an
attack" and "a long text is an attack" (it blocked "Translate this to French." and four in five
SciFact abstracts). The benign sets are:

- prompts (``.txt``, one per line, ``#`` comments): everyday instructions; the package ships
  ``safety/data/everyday_prompts.txt``;
- documents (``.jsonl`` in BEIR's ``_id/title/text`` shape): every tenth document by a hash of
  its id, as retrieved chunks look (``../shared/data/scifact/corpus.jsonl`` for the shipped model).

Features: hashed character n-grams (TF-IDF) and the MiniLM embedding (scaled by ``EMB_SCALE``);
model: L2-regularised logistic regression (scikit-learn), benign sets down-weighted so they
correct the model without outvoting the labelled data. ``cross_validate`` scores each layer with
stratified k-fold CV on the CSV (the benign sets folded alongside, their false-positive rates
reported apart), with the baselines (the phrase list alone, MiniLM + logistic regression, both
on the CSV alone) from the same split.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safety.scanners.heuristics import heuristic_hits
from safety.scanners.injection import N_FEATURES, char_counts, char_features

C = 100.0
THRESHOLD = 0.55
GATE = 0.2  # the char-only gate: below this, no embedding is computed and the text is allowed
EMB_SCALE = 0.5
WEIGHTS = {"prompts": 0.6, "documents": 0.05}
DOCUMENT_SAMPLE = 10  # one document in ten
EVERYDAY_PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"


@dataclass
class BenignSet:
    name: str
    kind: str  # "prompts" or "documents"
    texts: list[str]

    @property
    def weight(self) -> float:
        return WEIGHTS[self.kind]


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


def load_benign(path: Path) -> BenignSet:
    """Prompts from a ``.txt`` file or a sample of documents from a BEIR ``.jsonl`` corpus."""
    if path.suffix == ".jsonl":
        texts = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    doc_id, text = str(row["_id"]), f"{row.get('title', '')}. {row['text']}"
                except (ValueError, KeyError, TypeError):
                    message = f"{path}:{number}: needs a JSON object with _id and text"
                    raise ValueError(message) from None
                if int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % DOCUMENT_SAMPLE == 0:
                    texts.append(text.strip(". "))
        kind = "documents"
    elif path.suffix == ".txt":
        with open(path) as f:
            texts = [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
        kind = "prompts"
    else:
        raise ValueError(f"{path}: benign sets are .txt (one prompt per line) or BEIR .jsonl")
    if not texts:
        raise ValueError(f"{path}: no texts")
    return BenignSet(path.name, kind, texts)


def fit_idf(texts: list[str]) -> np.ndarray:
    counts = char_counts(texts)
    df = np.bincount(counts.indices, minlength=N_FEATURES)
    n = len(texts)
    idf = np.zeros(N_FEATURES)
    seen = df > 0
    idf[seen] = np.log((1 + n) / (1 + df[seen])) + 1.0  # TfidfVectorizer's smooth idf
    return idf


def fit(
    texts: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray | None,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import LogisticRegression

    idf = fit_idf(texts)
    features = char_features(texts, idf)
    if embeddings is not None:
        features = hstack([features, csr_matrix(embeddings * EMB_SCALE)]).tocsr()
    model = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    model.fit(features, labels, sample_weight=weights)
    coef = model.coef_[0]
    index = np.flatnonzero(idf)
    emb_coef = coef[N_FEATURES:] * EMB_SCALE if embeddings is not None else np.zeros(384)
    out = {
        "char_index": index.astype(np.int64),
        "char_idf": idf[index].astype(np.float32),  # float32 halves the file, same decisions
        "char_coef": coef[:N_FEATURES][index].astype(np.float32),
        "emb_coef": emb_coef,
        "intercept": np.array([float(model.intercept_[0])]),
        "threshold": np.array([THRESHOLD]),
    }
    if embeddings is not None:  # the gate: the same model on character n-grams alone
        gate = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
        gate.fit(features[:, :N_FEATURES], labels, sample_weight=weights)
        out["gate_coef"] = gate.coef_[0][index].astype(np.float32)
        out["gate_intercept"] = np.array([float(gate.intercept_[0])])
        out["gate_below"] = np.array([GATE])
    return out


def training_set(
    texts: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray,
    benign: list[tuple[BenignSet, np.ndarray]],
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The labelled examples plus the benign sets (label 0, their own weights)."""
    all_texts = list(texts)
    parts_labels, parts_vectors, parts_weights = [labels], [embeddings], [np.ones(len(texts))]
    for bset, vectors in benign:
        all_texts += bset.texts
        parts_labels.append(np.zeros(len(bset.texts), dtype=int))
        parts_vectors.append(vectors)
        parts_weights.append(np.full(len(bset.texts), bset.weight))
    return (
        all_texts,
        np.concatenate(parts_labels),
        np.vstack(parts_vectors),
        np.concatenate(parts_weights),
    )


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
    embedded: float | None = None  # the share of texts the char gate sent on to the embedding


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
    texts: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray,
    benign: list[tuple[BenignSet, np.ndarray]] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> list[LayerScores]:
    """Out-of-fold predictions for each layer and baseline; one split shared by all. Each
    benign set is split into the same number of folds: fold k trains on the other folds of the
    CSV and of every benign set, and is scored on its own part of each."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    from safety.scanners.injection import InjectionModel

    benign = benign or []
    n = len(texts)
    p_combined, p_char, p_emb = np.zeros(n), np.zeros(n), np.zeros(n)
    p_benign = [np.zeros(len(b.texts)) for b, _ in benign]
    splits = [StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, labels)]
    splits += [KFold(folds, shuffle=True, random_state=seed).split(b.texts) for b, _ in benign]
    for parts in zip(*splits, strict=True):
        train, test = parts[0]
        extra = [
            (BenignSet(b.name, b.kind, [b.texts[i] for i in tr]), vectors[tr])
            for (b, vectors), (tr, _) in zip(benign, parts[1:], strict=True)
        ]
        tr_texts = [texts[i] for i in train]
        te_texts = [texts[i] for i in test]
        data = training_set(tr_texts, labels[train], embeddings[train], extra)
        model = InjectionModel(fit(data[0], data[1], data[2], data[3]))
        features = model.features(te_texts)
        p_combined[test] = model.probability(te_texts, embeddings[test], features)
        p_char[test] = model.gate(te_texts, features)
        for k, ((b, vectors), (_, te)) in enumerate(zip(benign, parts[1:], strict=True)):
            held_out = [b.texts[i] for i in te]
            features = model.features(held_out)
            p_benign[k][te] = model.probability(held_out, vectors[te], features) * (
                model.gate(held_out, features) >= GATE
            )  # what the shipped scanner does: the gate allows before the classifier looks
        lr = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
        p_emb[test] = lr.fit(embeddings[train], labels[train]).predict_proba(embeddings[test])[:, 1]
    phrases = np.array([bool(heuristic_hits(t)) for t in texts]).astype(int)
    layer = (p_combined >= THRESHOLD) | (phrases == 1)
    gated = (phrases == 1) | ((p_char >= GATE) & (p_combined >= THRESHOLD))
    scores = [
        score("phrase list (baseline)", labels, phrases),
        score("MiniLM + logistic regression (baseline)", labels, (p_emb >= 0.5).astype(int)),
        score("char n-grams + LR", labels, (p_char >= THRESHOLD).astype(int)),
        score("char n-grams + MiniLM + LR", labels, (p_combined >= THRESHOLD).astype(int)),
        score("injection layer (phrases, then classifier)", labels, layer.astype(int)),
        score("shipped: phrases, char gate, classifier", labels, gated.astype(int)),
    ]
    scores[-1].embedded = float((p_char >= GATE).mean())
    for (b, _), p in zip(benign, p_benign, strict=True):
        hits = np.array([bool(heuristic_hits(t)) for t in b.texts]) | (p >= THRESHOLD)
        scores.append(
            score(f"injection layer on benign {b.name}", np.zeros(len(b.texts)), hits.astype(int))
        )
    return scores
