"""Retrieval evaluation on BEIR-format data (``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv``).

Chunks are mapped back to their documents (a document ranks where its best chunk ranks), then
nDCG@10, Recall@10, Recall@100 and MRR@10 are averaged over the queries that have judgements.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rag.embeddings import Embedder
from rag.retriever import Mode, SearchOptions, search
from rag.snapshot import Snapshot


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
