"""Retrieval evaluation on BEIR-format data (``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv``).

Chunks are mapped back to their documents (a document ranks where its best chunk ranks), then
nDCG@10, Recall@10, Recall@100 and MRR@10 are averaged over the queries that have judgements.

``cross_validate`` chooses the hybrid mode's query-time settings (fusion, the BM25/dense weights)
by k-fold cross-validation over the queries: each fold is scored with the setting that did best
on the other folds, so the mean over folds is a figure no choice has seen, and its spread says
how much the full-set figure can be trusted.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rag import HYBRID_WEIGHTS
from rag.embeddings import Embedder
from rag.retriever import Mode, SearchOptions, search
from rag.snapshot import BM25_B, BM25_K1, Snapshot, build_bm25


@dataclass
class Beir:
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, directory: Path) -> Beir:
        queries: dict[str, str] = {}
        with open(directory / "queries.jsonl") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    queries[str(row["_id"])] = row["text"]
        qrels: dict[str, dict[str, int]] = {}
        qrels_path = directory / "qrels.tsv"
        if not qrels_path.exists():
            qrels_path = directory / "qrels" / "test.tsv"
        with open(qrels_path) as f:
            for number, line in enumerate(f):
                parts = line.split()
                if len(parts) < 3 or (number == 0 and not parts[-1].lstrip("-").isdigit()):
                    continue
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
        judged = {q: r for q, r in qrels.items() if q in queries and any(v > 0 for v in r.values())}
        return cls({q: queries[q] for q in judged}, judged)


@dataclass
class Scores:
    mode: str
    ndcg10: float
    recall10: float
    recall100: float
    mrr10: float
    latency_ms: dict[str, float] = field(default_factory=dict)


def rank_documents(hits: list, limit: int = 100) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for hit in hits:
        doc = hit.chunk.doc_id
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
            if len(out) == limit:
                break
    return out


def metrics(ranked: list[str], relevant: dict[str, int]) -> tuple[float, float, float, float]:
    gains = [relevant.get(d, 0) for d in ranked]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
    ideal = sorted((v for v in relevant.values() if v > 0), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    wanted = {d for d, v in relevant.items() if v > 0}
    r10 = len(wanted & set(ranked[:10])) / len(wanted)
    r100 = len(wanted & set(ranked[:100])) / len(wanted)
    mrr = next((1 / (i + 1) for i, d in enumerate(ranked[:10]) if d in wanted), 0.0)
    return dcg / idcg if idcg else 0.0, r10, r100, mrr


def evaluate(
    snapshot: Snapshot,
    data: Beir,
    embedder: Embedder,
    modes: list[tuple[str, SearchOptions]],
    progress: Callable[[str, int, int], None] | None = None,
    clear: Callable[[], None] | None = None,
) -> list[Scores]:
    """Run every mode over the queries; ``clear`` empties the embedder's cache before each query
    so that latencies include embedding the query."""
    results = []
    for label, options in modes:
        options = replace(options, top_k=max(options.top_k, 100))
        totals = np.zeros(4)
        latencies = []
        for i, (qid, text) in enumerate(data.queries.items()):
            if clear is not None:
                clear()
            started = time.perf_counter()
            hits = search(snapshot, text, embedder, options)
            latencies.append((time.perf_counter() - started) * 1000)
            totals += metrics(rank_documents(hits), data.qrels[qid])
            if progress is not None:
                progress(label, i + 1, len(data.queries))
        mean = totals / max(len(data.queries), 1)
        pct = np.percentile(latencies, [50, 95, 99]) if latencies else [0, 0, 0]
        ndcg, r10, r100, mrr = (float(v) for v in mean)
        latency = {"p50": float(pct[0]), "p95": float(pct[1]), "p99": float(pct[2])}
        results.append(Scores(label, ndcg, r10, r100, mrr, latency))
    return results


def standard_modes(options: SearchOptions | None = None) -> list[tuple[str, SearchOptions]]:
    base = options or SearchOptions()
    modes: list[tuple[str, Mode, str]] = [
        ("bm25", "bm25", "zscore"),
        ("dense", "dense", "zscore"),
        ("hybrid-rrf", "hybrid", "rrf"),
        ("hybrid", "hybrid", "zscore"),
    ]
    out = []
    for label, mode, fusion in modes:
        # RRF as it is usually run (equal weights), for comparison with the default fusion
        weights = (1.0, 1.0) if fusion == "rrf" else base.weights
        out.append((label, replace(base, mode=mode, fusion=fusion, weights=weights)))  # type: ignore[arg-type]
    return out


def per_query_ndcg(
    snapshot: Snapshot, data: Beir, embedder: Embedder, options: SearchOptions
) -> np.ndarray:
    """nDCG@10 of each query, in ``data.queries`` order."""
    options = replace(options, top_k=max(options.top_k, 100))
    return np.array(
        [
            metrics(rank_documents(search(snapshot, text, embedder, options)), data.qrels[qid])[0]
            for qid, text in data.queries.items()
        ]
    )


# (k1, b) pairs cross-validation tries for BM25: the default first
BM25_GRID = ((BM25_K1, BM25_B), (0.9, 0.75), (1.2, 0.4), (1.2, 0.75), (1.5, 0.6))


def hybrid_grid(base: SearchOptions | None = None) -> dict[str, SearchOptions]:
    """The query-time settings cross-validation chooses among: z-score fusion at dense weights
    0.3-0.8 and reciprocal-rank fusion with equal weights."""
    base = base or SearchOptions()
    grid = {
        f"zscore dense {w:.1f}": replace(
            base, mode="hybrid", fusion="zscore", weights=(round(1 - w, 1), w)
        )
        for w in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    }
    grid["rrf equal"] = replace(base, mode="hybrid", fusion="rrf", weights=(1.0, 1.0))
    return grid


def with_bm25(snapshot: Snapshot, k1: float, b: float) -> Snapshot:
    """The same snapshot with its BM25 index rebuilt with other parameters (a shallow copy)."""
    if (k1, b) == (BM25_K1, BM25_B):
        return snapshot
    variant = copy.copy(snapshot)
    variant.bm25 = build_bm25(snapshot.chunks, k1, b)
    return variant


def grid_scores(
    snapshot: Snapshot, data: Beir, embedder: Embedder
) -> tuple[dict[str, np.ndarray], str]:
    """Per-query nDCG@10 of every (BM25 parameters, fusion setting) pair, and the default's name."""
    scores = {}
    for k1, b in BM25_GRID:
        variant = with_bm25(snapshot, k1, b)
        for name, options in hybrid_grid().items():
            scores[f"{name}, bm25 k1 {k1} b {b}"] = per_query_ndcg(variant, data, embedder, options)
    default = f"zscore dense {HYBRID_WEIGHTS[1]:.1f}, bm25 k1 {BM25_K1} b {BM25_B}"
    return scores, default


@dataclass
class CrossValidation:
    folds: int
    fold_ndcg: list[float]  # each fold scored with the setting chosen on the others
    chosen: list[str]  # that setting, per fold
    default_fold_ndcg: list[float]  # the shipped default on the same folds
    full_set: dict[str, float]  # every setting on all the queries (what is not reported alone)

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_ndcg))

    @property
    def spread(self) -> float:
        return float(np.std(self.fold_ndcg))


def query_folds(n: int, folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) positions of each fold of ``n`` queries in file order (shuffled k-fold with
    a fixed seed; tests/rag/test_eval.py pins the folds of the SciFact claims)."""
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.zeros((n, 1))))


def cross_validate(
    scores: dict[str, np.ndarray], default: str, folds: int = 5, seed: int = 0
) -> CrossValidation:
    """Nested choice over per-query nDCG@10: for each of ``folds`` folds of the queries, the
    setting with the best mean on the other folds, scored on this one."""
    names = list(scores)
    matrix = np.vstack([scores[name] for name in names])  # settings x queries
    fold_ndcg, chosen, default_ndcg = [], [], []
    for train, test in query_folds(matrix.shape[1], folds, seed):
        best = int(np.argmax(matrix[:, train].mean(axis=1)))
        chosen.append(names[best])
        fold_ndcg.append(float(matrix[best, test].mean()))
        default_ndcg.append(float(scores[default][test].mean()))
    full = {name: float(scores[name].mean()) for name in names}
    return CrossValidation(folds, fold_ndcg, chosen, default_ndcg, full)
