"""Training and cross-validating the injection classifier (``ragline safety train``).

The data: a CSV with ``text`` and ``label`` (1 = injection), and benign sets that teach the
classifier what ordinary traffic looks like. ``prompt-injections/train.csv`` alone is not enough:
its benign half is short questions, so a model trained on it alone learns "an instruction is an
attack" and "a long text is an attack" (it blocked "Translate this to French." and four in five
SciFact abstracts). The benign sets are:

- prompts (``.txt``, one per line, ``#`` comments): everyday instructions; the package ships
  ``safety/data/everyday_prompts.txt``;
- hard prompts (``.txt`` in the same shape, ``# category:`` lines): everyday requests that look
  like attacks (role-play, "act as", "ignore the typos", questions about prompt injection,
  translating an attack phrase for a slide, developer mode in a phone); the package ships
  ``safety/data/hard_benign.txt``;
- documents (``.jsonl`` in BEIR's ``_id/title/text`` shape): every tenth document by a hash of
  its id, as retrieved chunks look (``../shared/data/scifact/corpus.jsonl`` for the shipped model).

Features: hashed character n-grams (TF-IDF) and the MiniLM embedding (scaled by ``EMB_SCALE``);
model: L2-regularised logistic regression (scikit-learn), benign sets weighted so they correct
the model without outvoting the labelled data.

Every set is split into a train and a test part by its texts' ids (``safety/splits.py``).
``search`` chooses the hard prompts' weight, the threshold and the gate by stratified k-fold CV
on the train parts alone; ``layers`` scores each layer and the baselines (the phrase list alone,
MiniLM + logistic regression on the CSV alone) from out-of-fold predictions, or from a model
fitted on the train parts and scored once on the test parts, which no choice has seen.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safety.scanners.heuristics import attack_phrases
from safety.scanners.injection import N_FEATURES, char_counts, char_features
from safety.splits import TEST_FRACTION, split

C = 100.0
# chosen by `search` (5-fold CV on the train parts; `ragline eval safety --search` prints it)
THRESHOLD = 0.65
WEIGHTS = {"prompts": 0.6, "hard": 2.0, "documents": 0.05, "words": 0.6}
GATE = 0.3  # the char-only gate: below this, no embedding is computed and the text is allowed
EMB_SCALE = 0.5
DOCUMENT_SAMPLE = 10  # one document in ten
DATA = Path(__file__).resolve().parent / "data"
EVERYDAY_PROMPTS = DATA / "everyday_prompts.txt"
HARD_BENIGN = DATA / "hard_benign.txt"
# what `search` tries, and the false-positive rates a choice must keep on the out-of-fold
# predictions (below the goals of 3% on the labelled set and 5% on hard prompts, for margin)
HARD_WEIGHTS = (0.3, 0.6, 1.0, 2.0)
THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))
GATES = (0.2, 0.3, 0.4, 0.5)  # ties go to the higher gate: fewer texts pay for an embedding
MAX_FPR = {"labelled": 0.025, "hard": 0.04}


@dataclass
class BenignSet:
    name: str
    kind: str  # "prompts", "hard" or "documents"
    texts: list[str]
    categories: list[str] | None = None  # per text, from `# category:` lines

    @property
    def weight(self) -> float:
        return WEIGHTS[self.kind]

    def part(self, index: list[int]) -> BenignSet:
        categories = [self.categories[i] for i in index] if self.categories else None
        return BenignSet(self.name, self.kind, [self.texts[i] for i in index], categories)


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


def load_benign(path: Path, hard: bool = False) -> BenignSet:
    """Prompts from a ``.txt`` file (``hard``: the hard prompts' weight) or a sample of
    documents from a BEIR ``.jsonl`` corpus."""
    categories: list[str] = []
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
        texts, category = [], "-"
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("# category:"):
                    category = line.removeprefix("# category:").strip()
                elif line and not line.startswith("#"):
                    texts.append(line)
                    categories.append(category)
        kind = "hard" if hard else "prompts"
    else:
        raise ValueError(f"{path}: benign sets are .txt (one prompt per line) or BEIR .jsonl")
    if not texts:
        raise ValueError(f"{path}: no texts")
    named = any(c != "-" for c in categories)
    return BenignSet(path.name, kind, texts, categories if named else None)


WORD_LISTS = 300  # texts of 16-80 words drawn from the benign prompts' vocabulary


def word_lists(sets: list[BenignSet], n: int = WORD_LISTS, seed: int = 0) -> BenignSet:
    """Benign word salad: words of the benign prompts in random order, no punctuation. Load
    generators send such text (``ragline bench run``'s random prompts), and a classifier that
    never saw it blocked one in seven as an injection."""
    import random
    import re

    vocabulary = sorted(
        {
            w
            for b in sets
            if b.kind != "documents"
            for t in b.texts
            for w in re.findall(r"[a-z]{3,}", t.lower())
        }
    )
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(16, 80))) for _ in range(n)]
    return BenignSet("word lists", "words", texts)


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
    threshold: float = THRESHOLD,
    gate_below: float = GATE,
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
        "threshold": np.array([threshold]),
    }
    if embeddings is not None:  # the gate: the same model on character n-grams alone
        gate = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
        gate.fit(features[:, :N_FEATURES], labels, sample_weight=weights)
        out["gate_coef"] = gate.coef_[0][index].astype(np.float32)
        out["gate_intercept"] = np.array([float(gate.intercept_[0])])
        out["gate_below"] = np.array([gate_below])
    return out


@dataclass
class Data:
    """The labelled set and the benign sets, each with its MiniLM embeddings."""

    texts: list[str]
    labels: np.ndarray
    embeddings: np.ndarray
    benign: list[tuple[BenignSet, np.ndarray]] = field(default_factory=list)

    def part(self, index: list[int], benign_index: list[list[int]]) -> Data:
        return Data(
            [self.texts[i] for i in index],
            self.labels[index],
            self.embeddings[index],
            [(b.part(ix), v[ix]) for (b, v), ix in zip(self.benign, benign_index, strict=True)],
        )

    def holdout(self) -> tuple[Data, Data]:
        """The train and the test parts (``safety/splits.py``)."""
        labelled = split(self.texts, TEST_FRACTION["labelled"])
        parts = [split(b.texts, TEST_FRACTION[_split_kind(b)]) for b, _ in self.benign]
        return (
            self.part(labelled[0], [p[0] for p in parts]),
            self.part(labelled[1], [p[1] for p in parts]),
        )

    def training_set(
        self, weights: dict[str, float] | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """The labelled examples plus the benign sets (label 0, their kind's weight)."""
        weights = {**WEIGHTS, **(weights or {})}
        all_texts = list(self.texts)
        labels, vectors = [self.labels], [self.embeddings]
        sample_weights = [np.ones(len(self.texts))]
        for bset, v in self.benign:
            all_texts += bset.texts
            labels.append(np.zeros(len(bset.texts), dtype=int))
            vectors.append(v)
            sample_weights.append(np.full(len(bset.texts), weights[bset.kind]))
        return (
            all_texts,
            np.concatenate(labels),
            np.vstack(vectors),
            np.concatenate(sample_weights),
        )


def _split_kind(bset: BenignSet) -> str:
    return "documents" if bset.kind == "documents" else "prompts"


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
    f1_folds: list[float] | None = None  # per fold, for the spread
    categories: dict[str, float] | None = None  # false-positive rate per category


def score(name: str, labels: np.ndarray, predicted: np.ndarray) -> LayerScores:
    tp = int(((predicted == 1) & (labels == 1)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    negatives = int((labels == 0).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return LayerScores(name, precision, recall, f1, fp / negatives if negatives else 0.0)


@dataclass
class Predictions:
    """Probabilities for the labelled texts (out of fold, or of a held-out part) and for each
    benign set, with the char gate's probabilities (any gate can be applied afterwards)."""

    labels: np.ndarray
    fold: np.ndarray
    combined: np.ndarray
    char: np.ndarray
    embedding: np.ndarray
    phrases: np.ndarray
    # (set, probability, the char gate's probability, phrases)
    benign: list[tuple[BenignSet, np.ndarray, np.ndarray, np.ndarray]]


def _phrases(texts: list[str]) -> np.ndarray:
    return np.array([bool(attack_phrases(t)) for t in texts], dtype=bool)


def predict(
    train: Data, test: Data, weights: dict[str, float] | None = None, fold: int = 0
) -> Predictions:
    """Fit on ``train`` (with the baseline MiniLM + LR on its labelled texts alone), predict
    ``test``."""
    from sklearn.linear_model import LogisticRegression

    from safety.scanners.injection import InjectionModel

    model = InjectionModel(fit(*train.training_set(weights)))
    features = model.features(test.texts)
    lr = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced")
    lr.fit(train.embeddings, train.labels)
    benign = []
    for bset, vectors in test.benign:
        f = model.features(bset.texts)
        p, g = model.probability(bset.texts, vectors, f), model.gate(bset.texts, f)
        benign.append((bset, p, g, _phrases(bset.texts)))
    return Predictions(
        test.labels,
        np.full(len(test.texts), fold),
        model.probability(test.texts, test.embeddings, features),
        model.gate(test.texts, features),
        lr.predict_proba(test.embeddings)[:, 1],
        _phrases(test.texts),
        benign,
    )


def out_of_fold(
    data: Data, folds: int = 5, seed: int = 0, weights: dict[str, float] | None = None
) -> Predictions:
    """Stratified k-fold on the labelled set, each benign set split into as many folds: fold k
    trains on the other folds of every set and is scored on its own part of each."""
    from sklearn.model_selection import KFold, StratifiedKFold

    for bset, _ in data.benign:
        if len(bset.texts) < folds:
            message = (
                f"{bset.name}: {len(bset.texts)} texts in its train part, fewer than {folds} folds"
            )
            raise ValueError(message)
    parts = [StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.texts, data.labels)]
    parts += [KFold(folds, shuffle=True, random_state=seed).split(b.texts) for b, _ in data.benign]
    n = len(data.texts)
    out = Predictions(
        data.labels, np.zeros(n, dtype=int), np.zeros(n), np.zeros(n), np.zeros(n),
        _phrases(data.texts),
        [(b, np.zeros(len(b.texts)), np.zeros(len(b.texts)), _phrases(b.texts))
         for b, _ in data.benign],
    )  # fmt: skip
    for k, split_k in enumerate(zip(*parts, strict=True)):
        (tr, te), rest = split_k[0], split_k[1:]
        train = data.part(list(tr), [list(r[0]) for r in rest])
        test = data.part(list(te), [list(r[1]) for r in rest])
        got = predict(train, test, weights, fold=k)
        out.fold[te], out.combined[te], out.char[te] = k, got.combined, got.char
        out.embedding[te] = got.embedding
        for into, new, (_, held) in zip(out.benign, got.benign, rest, strict=True):
            into[1][held], into[2][held] = new[1], new[2]
    return out


def layers(
    pred: Predictions, threshold: float = THRESHOLD, gate: float = GATE
) -> list[LayerScores]:
    """Each layer and baseline on the labelled texts, then the shipped layer on each benign set
    (with its false-positive rate per category where the set has categories)."""
    labels, phrases = pred.labels, pred.phrases
    layer = (pred.combined >= threshold) | phrases
    shipped = phrases | ((pred.char >= gate) & (pred.combined >= threshold))
    scores = [
        score("phrase list (baseline)", labels, phrases.astype(int)),
        score("MiniLM + logistic regression (baseline)", labels, (pred.embedding >= 0.5) * 1),
        score("char n-grams + LR", labels, (pred.char >= threshold).astype(int)),
        score("char n-grams + MiniLM + LR", labels, (pred.combined >= threshold).astype(int)),
        score("injection layer (phrases, then classifier)", labels, layer.astype(int)),
        score("shipped: phrases, char gate, classifier", labels, shipped.astype(int)),
    ]
    scores[-1].embedded = float((pred.char >= gate).mean())
    folds = np.unique(pred.fold)
    if len(folds) > 1:
        scores[-1].f1_folds = [
            score("", labels[pred.fold == k], shipped[pred.fold == k].astype(int)).f1 for k in folds
        ]
    for bset, p, g, hits in pred.benign:
        blocked = hits | ((g >= gate) & (p >= threshold))
        result = score(f"injection layer on benign {bset.name}", np.zeros(len(p)), blocked * 1)
        if bset.categories:
            cats = np.array(bset.categories)
            result.categories = {
                str(c): float(blocked[cats == c].mean()) for c in dict.fromkeys(cats)
            }
        scores.append(result)
    return scores


def shipped_rates(
    pred: Predictions, threshold: float, gate: float = GATE
) -> tuple[float, float, float]:
    """(F1, false-positive rate) of the shipped layer on the labelled texts and its
    false-positive rate on the hard prompts."""
    scores = layers(pred, threshold, gate)
    shipped = scores[5]
    hard = [s.fpr for s, b in zip(scores[6:], pred.benign, strict=True) if b[0].kind == "hard"]
    return shipped.f1, shipped.fpr, max(hard, default=0.0)


@dataclass
class Trial:
    hard_weight: float
    threshold: float
    gate: float
    f1: float
    fpr: float
    hard_fpr: float

    @property
    def admissible(self) -> bool:
        return self.fpr <= MAX_FPR["labelled"] and self.hard_fpr <= MAX_FPR["hard"]


def search(data: Data, folds: int = 5, seed: int = 0) -> tuple[list[Trial], Trial]:
    """Every (hard-prompt weight, threshold, gate) of the grid on out-of-fold predictions of
    ``data`` (the train parts): the choice is the best F1 among those within ``MAX_FPR`` (the
    lowest false-positive rates if none is); of equal F1, the higher gate (fewer embeddings)."""
    trials = []
    for weight in HARD_WEIGHTS:
        pred = out_of_fold(data, folds, seed, {"hard": weight})
        for threshold in THRESHOLDS:
            for gate in GATES:
                trials.append(Trial(weight, threshold, gate, *shipped_rates(pred, threshold, gate)))
    admissible = [t for t in trials if t.admissible]
    if admissible:
        best = max(admissible, key=lambda t: (round(t.f1, 4), t.gate, -t.hard_fpr))
    else:
        best = min(trials, key=lambda t: (t.hard_fpr + t.fpr, -t.f1))
    return trials, best
