"""One version of a vector store, loaded: its chunks, vectors, FAISS and BM25 indexes.

``store.py`` writes versions; this module builds the indexes a version holds, reads a version
directory back (checking it against its manifest) and gives searches an immutable ``Snapshot``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

IndexKind = Literal["flat", "hnsw", "ivf"]


class StoreError(Exception):
    """A store operation that cannot be done; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.status, self.param = message, code, status, param


@dataclass(frozen=True)
class Chunk:
    id: int
    doc_id: str
    position: int
    start: int
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def embed_text(self) -> str:
        return f"{self.title}\n{self.text}" if self.title else self.text

    def bm25_text(self) -> str:
        # the title twice: a mild field weight that helps short titles rank (SciFact: +0.003)
        return f"{self.title}\n{self.title}\n{self.text}" if self.title else self.text


class Snapshot:
    """An immutable loaded version: what searches run against."""

    def __init__(
        self,
        version: int,
        chunks: list[Chunk],
        vectors: np.ndarray,
        documents: dict[str, dict[str, Any]],
        index: Any,
        bm25: Any,
        next_id: int,
    ) -> None:
        self.version = version
        self.chunks = chunks
        self.vectors = vectors
        self.documents = documents
        self.index = index
        self.bm25 = bm25
        self.next_id = next_id
        self.ids = np.fromiter((c.id for c in chunks), dtype=np.int64, count=len(chunks))
        self.row_of = {c.id: row for row, c in enumerate(chunks)}
        # documents as integers: row -> document number, document number -> its rows
        numbers: dict[str, int] = {}
        self.row_doc = np.fromiter(
            (numbers.setdefault(c.doc_id, len(numbers)) for c in chunks),
            dtype=np.int64,
            count=len(chunks),
        )
        order = np.argsort(self.row_doc, kind="stable")
        bounds = np.searchsorted(self.row_doc[order], np.arange(len(numbers) + 1))
        self.doc_rows = [order[bounds[i] : bounds[i + 1]] for i in range(len(numbers))]
        self.fields: set[str] = {"document_id", "title", "source"}  # and "filename" when known
        for chunk in chunks:
            self.fields.update(chunk.metadata)

    def __len__(self) -> int:
        return len(self.chunks)


def empty_snapshot(dim: int, kind: IndexKind) -> Snapshot:
    vectors = np.zeros((0, dim), dtype=np.float32)
    return Snapshot(0, [], vectors, {}, build_index(vectors, np.zeros(0, np.int64), kind), None, 1)


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: IndexKind) -> Any:
    """An inner-product FAISS index over stable ids (vectors are unit length: cosine)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building uses every core; searches one
    dim = vectors.shape[1]
    if kind == "hnsw":
        inner: Any = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 64
    elif kind == "ivf" and len(vectors) >= 1024:
        nlist = int(min(4 * np.sqrt(len(vectors)), len(vectors) // 39))
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
        inner.nprobe = max(1, nlist // 16)
    else:  # flat, or an IVF store too small to train yet
        inner = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors), ids)
    faiss.omp_set_num_threads(1)
    return index


# BM25 parameters (Anserini's BEIR settings; `ragline eval retrieval` cross-validates them)
BM25_K1 = 0.9
BM25_B = 0.4


def build_bm25(chunks: Sequence[Chunk], k1: float = BM25_K1, b: float = BM25_B) -> Any:
    import bm25s

    if not chunks:
        return None
    tokens = bm25s.tokenize(
        [c.bm25_text() for c in chunks],
        stopwords="en",
        stemmer=stemmer(),
        show_progress=False,
    )
    model = bm25s.BM25(k1=k1, b=b)
    model.index(tokens, show_progress=False)
    return model


_STEMMER: Any = None


def stemmer() -> Any:
    global _STEMMER
    if _STEMMER is None:
        import Stemmer

        _STEMMER = Stemmer.Stemmer("english")
    return _STEMMER


def load_version(path: Path) -> Snapshot:
    """Load one version directory, checking it against its manifest."""
    import bm25s
    import faiss

    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for rel, size in manifest["files"].items():
            if (path / rel).stat().st_size != size:
                raise OSError(f"{rel} has the wrong size")
        with open(path / "chunks.jsonl") as f:
            chunks = [Chunk(**json.loads(line)) for line in f]
        documents = json.loads((path / "documents.json").read_text())
        vectors = np.load(path / "vectors.npy", allow_pickle=False)
        index = faiss.read_index(str(path / "index.faiss"))
        bm25 = (
            bm25s.BM25.load(str(path / "bm25"), show_progress=False)
            if (path / "bm25").exists()
            else None
        )
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise StoreError(
            f"vector store version {path} is unreadable: {exc}", "store_corrupt", 500
        ) from None
    if len(chunks) != len(vectors) or index.ntotal != len(chunks):
        raise StoreError(f"vector store version {path} is inconsistent", "store_corrupt", 500)
    return Snapshot(
        int(manifest["version"]), chunks, vectors, documents, index, bm25, int(manifest["next_id"])
    )
