"""Vector stores: versioned directories holding a FAISS index, a BM25 index and a chunk table.

Layout of one store (no pickle anywhere: JSON, ``.npy`` without objects, FAISS's own format)::

    <root>/<store id>/
        store.json                 name, created_at, index kind, chunking, embedder (immutable)
        CURRENT                    the serving version's directory name, e.g. ``v000003``
        versions/v000003/
            manifest.json          written last: version, counts, metadata fields, file sizes
            documents.json         document id -> content hash, chunk ids, filename, attributes
            chunks.jsonl           one chunk per line, in row order
            ids.npy vectors.npy    int64 chunk ids and float32 unit vectors, in row order
            index.faiss            IndexIDMap2 over Flat (default), HNSW or IVF
            bm25/                  bm25s's arrays and vocabulary

A write (upsert or delete) builds the next version in ``versions/.tmp-*``, renames it into place
and then replaces ``CURRENT`` atomically, under an exclusive file lock. A process killed at any
point leaves ``CURRENT`` naming a complete version; the next write sweeps the debris. Readers keep
the snapshot they loaded and pick up a new version when ``CURRENT`` changes (also one written by
another process, e.g. ``ragline ingest`` next to a running gateway).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag.chunking import Chunker, ChunkingConfig
from rag.embeddings import Embedder, embed_documents
from rag.loaders import Document
from rag.snapshot import (
    Chunk,
    IndexKind,
    Snapshot,
    StoreError,
    build_bm25,
    build_index,
    empty_snapshot,
    load_version,
)

log = logging.getLogger("ragline.rag")

FORMAT = 1
KEEP_VERSIONS = 2
PRUNE_GRACE = 300.0  # seconds a version stays on disk after it stopped being current
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class WriteResult:
    version: int
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0


def content_hash(doc: Document) -> str:
    payload = json.dumps([doc.title, doc.text, doc.metadata], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# -- the store ------------------------------------------------------------------------------------


class VectorStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.info: dict[str, Any] = json.loads((path / "store.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path} is not a vector store: {exc}", "store_corrupt", 500) from exc
        self.id: str = self.info["id"]
        self.name: str = self.info["name"]
        self.kind: IndexKind = self.info.get("index", "flat")
        self.chunking = ChunkingConfig(**self.info.get("chunking", {}))
        self._lock = threading.Lock()  # one writer per process; the file lock covers processes
        self._load_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._current_stamp: tuple[int, int] | None = None

    # -- creating and opening -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        *,
        dim: int,
        embedder_name: str,
        index: IndexKind = "flat",
        chunking: ChunkingConfig | None = None,
        metadata: dict[str, Any] | None = None,
        store_id: str | None = None,
        owner: str | None = None,
    ) -> VectorStore:
        if store_id is None:
            store_id = f"vs_{name}" if _NAME.match(name) else f"vs_{secrets.token_hex(12)}"
        if not _NAME.match(store_id.removeprefix("vs_")):
            raise StoreError(f"invalid vector store id {store_id!r}", "invalid_store_id")
        path = root / store_id
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{store_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        info = {
            "format": FORMAT,
            "id": store_id,
            "name": name,
            "created_at": int(time.time()),
            "index": index,
            "dim": dim,
            "embedder": embedder_name,
            "chunking": (chunking or ChunkingConfig()).model_dump(),
            "metadata": metadata or {},
            "owner": owner,  # who made it (a gateway key id); None: the operator (ragline ingest)
        }
        _write_json(tmp / "store.json", info)
        (tmp / "versions").mkdir()
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(
                f"a vector store with id {store_id!r} already exists", "store_exists", 409
            ) from None
        return cls(path)

    @property
    def snapshot(self) -> Snapshot:
        """The serving version, reloaded when ``CURRENT`` changed (a cheap ``stat``)."""
        current = self.path / "CURRENT"
        try:
            st = current.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        snap = self._snapshot
        if snap is None or stamp != self._current_stamp:
            with self._load_lock:
                if self._snapshot is None or stamp != self._current_stamp:
                    self._snapshot = self._load(stamp)
                    self._current_stamp = stamp
                snap = self._snapshot
        assert snap is not None
        return snap

    def _load(self, stamp: tuple[int, int] | None) -> Snapshot:
        if stamp is None:
            return empty_snapshot(int(self.info["dim"]), self.kind)
        name = (self.path / "CURRENT").read_text().strip()
        return load_version(self.path / "versions" / name)

    def check_embedder(self, embedder: Embedder) -> None:
        """Vectors from another model would search garbage: refuse, naming both."""
        name = getattr(embedder, "name", None)
        if name is not None and name != self.info.get("embedder"):
            raise StoreError(
                f"vector store {self.id!r} was built with the embedding model "
                f"{self.info.get('embedder')!r}, but this process embeds with {name!r}; "
                "re-ingest it or configure that model (RAGLINE_EMBEDDING_MODEL)",
                "embedding_model_mismatch",
                409,
            )

    def describe(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "id": self.id,
            "name": self.name,
            "created_at": self.info["created_at"],
            "metadata": self.info.get("metadata", {}),
            "index": self.kind,
            "version": snap.version,
            "documents": len(snap.documents),
            "chunks": len(snap),
            "bytes": sum(int(d.get("bytes", 0)) for d in snap.documents.values()),
        }

    # -- writing --------------------------------------------------------------------------------

    def upsert(
        self,
        documents: Iterable[Document],
        embedder: Embedder,
        *,
        chunker: Chunker | None = None,
        files: dict[str, dict[str, Any]] | None = None,
        progress: Callable[[int, int], None] | None = None,
        replace_ids: Sequence[str] = (),
    ) -> WriteResult:
        """Add or replace documents by id; unchanged documents (same content hash) are no-ops.

        ``replace_ids`` are document ids that this write removes first (a re-uploaded file whose
        documents changed ids). ``files`` carries per-document extras kept in the table.
        """
        started = time.perf_counter()
        self.check_embedder(embedder)
        docs = list(documents)
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise StoreError(f"duplicate document ids in one write: {dupes[:5]}", "duplicate_id")
        with self._writing() as base:
            result = WriteResult(version=base.version)
            todo: list[tuple[Document, str]] = []
            for doc in docs:
                digest = content_hash(doc)
                old = base.documents.get(doc.id)
                if old is not None and old["hash"] == digest:
                    result.unchanged.append(doc.id)
                    continue
                (result.updated if old is not None else result.added).append(doc.id)
                todo.append((doc, digest))
            gone = [i for i in replace_ids if i in base.documents and i not in set(ids)]
            result.deleted = gone
            if not todo and not gone:
                result.seconds = time.perf_counter() - started
                return result
            chunker = chunker or Chunker(_tokenizer_path(embedder), self.chunking)
            next_id = base.next_id
            new_chunks: list[Chunk] = []
            table: dict[str, dict[str, Any]] = {}
            for doc, digest in todo:
                ids_of_doc = []
                extra = (files or {}).get(doc.id, {})
                for piece in chunker.split(doc.text):
                    meta = {**doc.metadata, "document_id": doc.id, "title": doc.title}
                    meta.setdefault("source", doc.source)
                    if "filename" in extra:
                        meta.setdefault("filename", extra["filename"])
                    chunk = Chunk(
                        next_id, doc.id, piece.position, piece.start, piece.text,
                        doc.title, doc.source, meta,
                    )  # fmt: skip
                    new_chunks.append(chunk)
                    ids_of_doc.append(next_id)
                    next_id += 1
                table[doc.id] = {
                    "hash": digest,
                    "chunks": ids_of_doc,
                    "title": doc.title,
                    "source": doc.source,
                    "bytes": len(doc.text.encode()),
                    "created_at": int(time.time()),
                    "metadata": doc.metadata,
                    **extra,
                }
            vectors = _embed(embedder, new_chunks, progress)
            dropped = {
                c
                for i in (*table, *gone)
                if i in base.documents
                for c in base.documents[i]["chunks"]
            }
            result.chunks = len(new_chunks)
            documents_out = {
                k: v for k, v in base.documents.items() if k not in table and k not in gone
            }
            documents_out.update(table)
            self._commit(base, dropped, new_chunks, vectors, documents_out, next_id)
            result.version = base.version + 1
        result.seconds = time.perf_counter() - started
        return result

    def delete(self, doc_ids: Sequence[str]) -> WriteResult:
        with self._writing() as base:
            missing = [i for i in doc_ids if i not in base.documents]
            if missing:
                raise StoreError(
                    f"no document {missing[0]!r} in vector store {self.id!r}",
                    "document_not_found",
                    404,
                )
            dropped = {c for i in doc_ids for c in base.documents[i]["chunks"]}
            documents = {k: v for k, v in base.documents.items() if k not in set(doc_ids)}
            empty = np.zeros((0, base.vectors.shape[1]), np.float32)
            self._commit(base, dropped, [], empty, documents, base.next_id)
            return WriteResult(version=base.version + 1, deleted=list(doc_ids))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Snapshot]:
        with self._lock, open(self.path / ".lock", "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                self._sweep()
                self._current_stamp = None  # re-read: another process may have written
                self._snapshot = None
                yield self.snapshot
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what killed writers left behind."""
        for debris in (self.path / "versions").glob(".tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)

    def _commit(
        self,
        base: Snapshot,
        dropped: set[int],
        new_chunks: list[Chunk],
        new_vectors: np.ndarray,
        documents: dict[str, dict[str, Any]],
        next_id: int,
    ) -> None:
        keep = [row for row, c in enumerate(base.chunks) if c.id not in dropped]
        chunks = [base.chunks[row] for row in keep] + new_chunks
        vectors = np.concatenate([base.vectors[keep], new_vectors]).astype(np.float32)
        version = base.version + 1
        name = f"v{version:06d}"
        tmp = self.path / "versions" / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        ids = np.fromiter((c.id for c in chunks), dtype=np.int64, count=len(chunks))
        with open(tmp / "chunks.jsonl", "w") as f:
            for chunk in chunks:
                f.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")
        _write_json(tmp / "documents.json", documents)
        np.save(tmp / "ids.npy", ids, allow_pickle=False)
        np.save(tmp / "vectors.npy", vectors, allow_pickle=False)
        import faiss

        faiss.write_index(build_index(vectors, ids, self.kind), str(tmp / "index.faiss"))
        _hold_for_tests("index-written")
        bm25 = build_bm25(chunks)
        if bm25 is not None:
            bm25.save(str(tmp / "bm25"), show_progress=False)
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "store": self.id,
            "version": version,
            "created_at": time.time(),
            "documents": len(documents),
            "chunks": len(chunks),
            "next_id": next_id,
            "dim": int(vectors.shape[1]),
            "index": self.kind,
            "files": files,
        }
        _write_json(tmp / "manifest.json", manifest)
        _fsync_tree(tmp)
        final = self.path / "versions" / name
        if final.exists():  # left by a writer killed between the rename and CURRENT
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.path / "versions")  # the rename itself, durable before CURRENT names it
        pointer = self.path / f".CURRENT-{secrets.token_hex(4)}"
        pointer.write_text(name + "\n")
        _fsync(pointer)
        os.replace(pointer, self.path / "CURRENT")
        _fsync(self.path)
        self._prune(version)

    def _prune(self, version: int) -> None:
        """Remove versions ``KEEP_VERSIONS`` behind that have not been current for
        ``PRUNE_GRACE`` seconds: a reader in another process that read ``CURRENT`` just before
        a write still finds the version it is loading."""
        now = time.time()
        for old in (self.path / "versions").glob("v*"):
            with contextlib.suppress(ValueError, OSError):
                number = int(old.name[1:])
                if number > version - KEEP_VERSIONS:
                    continue
                successor = self.path / "versions" / f"v{number + 1:06d}"
                superseded = successor.stat().st_mtime if successor.exists() else 0.0
                if now - superseded >= PRUNE_GRACE:
                    shutil.rmtree(old, ignore_errors=True)


def _embed(
    embedder: Embedder, chunks: list[Chunk], progress: Callable[[int, int], None] | None
) -> np.ndarray:
    """Document vectors in the chunks' order, embedded shortest first (batches of like lengths
    pad little) in steps that report progress."""
    dim = int(getattr(embedder, "dim", 0) or 0)
    if not chunks:
        return np.zeros((0, dim or 384), dtype=np.float32)
    texts = [c.embed_text() for c in chunks]
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = []
    step = 256
    for start in range(0, len(texts), step):
        parts.append(embed_documents(embedder, [texts[i] for i in order[start : start + step]]))
        if progress is not None:
            progress(min(start + step, len(texts)), len(texts))
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(parts)
    return out


def _tokenizer_path(embedder: Embedder) -> Path:
    path = getattr(embedder, "path", None)
    if path is None:
        raise StoreError("the embedder names no tokenizer for chunking", "no_tokenizer", 500)
    return Path(path)


def _hold_for_tests(point: str) -> None:
    """Test hook: park a writer mid-write so a test can kill it there (never set in service)."""
    if os.environ.get("RAGLINE_TEST_HOLD") == point:
        print(f"ragline-test: holding at {point}", file=sys.stderr, flush=True)
        sys.stdin.readline()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1, default=str))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync(path)
