"""Pipeline stage 5, retrieve: vector stores, uploaded files and grounded-chat context.

``RagService`` owns the stores under ``settings.rag_dir`` (``stores/<id>/``, see ``rag.store``)
and the uploaded files (``files/<id>/``). Store writes run in a worker thread, one at a time per
store; searches run against the snapshot being served and never wait for a write. For a chat
request on a route with ``rag`` (or with ``ragline.rag``), the last user message is searched and
the hits become the template's numbered ``context`` and the response's ``ragline.citations``.
"""

from __future__ import annotations

import asyncio
import difflib
import fcntl
import fnmatch
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.auth import Principal
from gateway.config import RagConfig, RouteConfig, Settings
from gateway.errors import InvalidRequest, NotFound, PermissionDenied, RouteUnavailable
from gateway.files import FileStore as FileStore
from gateway.metrics import Metrics
from gateway.workers import WorkerPool, WorkTimedOut
from rag.chunking import Chunker, ChunkingConfig
from rag.embeddings import Embedder
from rag.loaders import Document, LoaderError, check_suffix, load_bytes
from rag.retriever import Hit, SearchOptions, search
from rag.store import VectorStore, WriteResult

log = logging.getLogger("ragline.rag")
SNIPPET_CHARS = 240


@dataclass
class Retrieved:
    context: list[dict[str, Any]]
    citations: list[dict[str, Any]]
    info: dict[str, Any]

    def cite(
        self, prompted: int, answers: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The citations of the ``prompted`` chunks (numbered ``[n]`` in the prompt; those above
        the relevance floor) and the retrieval summary; when the answers cite any of those
        numbers, only the ones they cite."""
        kept = min(len(self.citations), prompted)
        cited = cited_indices(answers, kept)
        citations = [c for c in self.citations[:kept] if not cited or c["index"] in cited]
        summary = {**self.info, "hits": len(self.citations), "used": kept, "cited": sorted(cited)}
        return citations, summary


_MARKER = re.compile(r"\[(\d{1,3})\]")


def cited_indices(answers: list[str], numbered: int) -> set[int]:
    """The ``[n]`` markers in ``answers`` that name one of the ``numbered`` documents."""
    found = {int(m[1]) for text in answers for m in _MARKER.finditer(text)}
    return {n for n in found if 1 <= n <= numbered}


class RagService:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        metrics: Metrics,
        workers: WorkerPool | None = None,
    ) -> None:
        self.workers = workers  # parses uploads in processes a time limit can stop
        self.root = settings.rag_dir / "stores"
        self.files = FileStore(settings.rag_dir / "files")
        self.embedder = embedder
        self.metrics = metrics
        self._stores: dict[str, VectorStore] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- stores ---------------------------------------------------------------------------------

    def list_stores(self, principal: Principal) -> list[VectorStore]:
        if not self.root.exists():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("vs_") and (path / "store.json").exists():
                store = self._open(path.name)
                if store is not None and _allowed(principal, store):
                    out.append(store)
        return out

    def get(
        self, ref: str, principal: Principal | None = None, by_route: bool = False
    ) -> VectorStore:
        """The store ``ref`` (an id or a name) for ``principal``: one its patterns cover and
        that it may use (see ``_allowed``); ``by_route``, a store behind a route, whoever made
        it (the key's patterns still have to cover it). Raises ``NotFound``, or
        ``PermissionDenied`` for a store the patterns do not cover."""
        store = self._open(ref) if ref.startswith("vs_") else None
        if store is None and self.root.exists():
            for path in self.root.iterdir():
                candidate = self._open(path.name) if path.name.startswith("vs_") else None
                if candidate is not None and candidate.name == ref:
                    store = candidate
                    break
        if store is None:
            raise NotFound(
                f"No vector store {ref!r}.", param="vector_store_id", code="vector_store_not_found"
            )
        if principal is not None and not _allowed(principal, store, by_route):
            if not _named(principal, store):
                raise PermissionDenied(
                    f"This key may not use vector store {ref!r}.", param="vector_store_id"
                )
            raise NotFound(  # another key's store: as if it did not exist
                f"No vector store {ref!r}.", param="vector_store_id", code="vector_store_not_found"
            )
        return store

    def names(self) -> list[str]:
        """The names of every store (for start-up checks and "did you mean")."""
        if not self.root.exists():
            return []
        found = (self._open(p.name) for p in self.root.iterdir() if p.name.startswith("vs_"))
        return sorted(s.name for s in found if s is not None)

    def route_problems(self, routes: list[RouteConfig]) -> dict[str, str]:
        """Per route whose store does not exist (yet): what is wrong. Checked by ``/ready`` on
        every call, so a store ingested later is picked up without a restart."""
        problems: dict[str, str] = {}
        for route in routes:
            if route.rag is None:
                continue
            try:
                self.get(route.rag.store)
            except NotFound:
                problems[route.name] = missing_store_message(
                    route.name, route.rag.store, self.names()
                )
        return problems

    async def open(
        self, ref: str, principal: Principal | None = None, by_route: bool = False
    ) -> VectorStore:
        """``get``, with the store's serving version loaded (or found current) in a worker
        thread: loading a version reads its index and chunks, which must not hold the loop."""

        def opened() -> VectorStore:
            store = self.get(ref, principal, by_route)
            store.snapshot  # noqa: B018 - loads it when CURRENT changed
            return store

        return await asyncio.to_thread(opened)

    def _open(self, store_id: str) -> VectorStore | None:
        store = self._stores.get(store_id)
        if store is not None and store.path.exists():
            return store
        path = self.root / store_id
        if "/" in store_id or not (path / "store.json").exists():
            self._stores.pop(store_id, None)
            return None
        store = VectorStore(path)
        self._stores[store_id] = store
        return store

    async def create(
        self,
        name: str | None,
        metadata: dict[str, Any],
        chunking: ChunkingConfig,
        index: str,
        principal: Principal,
        check_quota: Callable[[Principal, int], None] | None = None,
    ) -> VectorStore:
        """A new store owned by ``principal``; ``check_quota(principal, owned)`` may refuse it.
        Check and creation run under the stores' lock (a file lock: every process)."""
        dim = await asyncio.to_thread(self._dim)
        label = name or f"store-{secrets.token_hex(4)}"
        if not any(fnmatch.fnmatchcase(label, p) for p in principal.policy.vector_stores):
            raise PermissionDenied(f"This key may not create vector store {label!r}.", param="name")
        return await asyncio.to_thread(
            self._create, label, name, metadata, chunking, index, principal, dim, check_quota
        )

    def _create(
        self,
        label: str,
        name: str | None,
        metadata: dict[str, Any],
        chunking: ChunkingConfig,
        index: str,
        principal: Principal,
        dim: int,
        check_quota: Callable[[Principal, int], None] | None,
    ) -> VectorStore:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".create.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            visible = self.list_stores(principal)
            if name is not None and any(s.name == name for s in visible):
                raise InvalidRequest(
                    f"A vector store named {name!r} exists already.",
                    param="name",
                    code="store_exists",
                )
            if check_quota is not None:
                owned = sum(s.info.get("owner") == principal.key_id for s in visible)
                check_quota(principal, owned)
            store = VectorStore.create(
                self.root, label, dim=dim, embedder_name=self._embedder_name(),
                index=index, chunking=chunking, metadata=metadata,  # type: ignore[arg-type]
                owner=principal.key_id,
            )  # fmt: skip
        self._stores[store.id] = store
        return store

    def delete(self, store: VectorStore) -> None:
        trash = self.root / f".deleted-{store.id}-{secrets.token_hex(4)}"
        os.rename(store.path, trash)  # atomic: readers that hold a snapshot keep it
        self._stores.pop(store.id, None)
        shutil.rmtree(trash, ignore_errors=True)

    def _dim(self) -> int:
        dim = int(getattr(self.embedder, "dim", 0) or 0)
        if not dim:
            dim = int(self.embedder.embed(["dimension probe"]).shape[1])
        return dim

    def _embedder_name(self) -> str:
        return str(getattr(self.embedder, "name", type(self.embedder).__name__))

    # -- writing --------------------------------------------------------------------------------

    async def add_documents(
        self,
        store: VectorStore,
        documents: list[Document],
        *,
        file_id: str,
        filename: str,
        chunking: ChunkingConfig | None = None,
    ) -> WriteResult:
        extras = {d.id: {"file_id": file_id, "filename": filename} for d in documents}
        before = store.snapshot.documents
        stale = [i for i, d in before.items() if d.get("file_id") == file_id]
        lock = self._locks.setdefault(store.id, asyncio.Lock())
        chunker = None
        if chunking is not None:
            chunker = Chunker(Path(getattr(self.embedder, "path", "")), chunking)
        async with lock:
            result = await asyncio.to_thread(
                store.upsert, documents, self.embedder, chunker=chunker, files=extras,
                replace_ids=stale,
            )  # fmt: skip
        log.info(
            "vector store %s: file %s -> version %d (%d added, %d updated, %d unchanged, "
            "%d chunks, %.2fs)",
            store.id, file_id, result.version, len(result.added), len(result.updated),
            len(result.unchanged), result.chunks, result.seconds,
        )  # fmt: skip
        return result

    async def remove_file(self, store: VectorStore, file_id: str) -> WriteResult:
        docs = [i for i, d in store.snapshot.documents.items() if d.get("file_id") == file_id]
        if not docs:
            raise NotFound(
                f"No file {file_id!r} in vector store {store.id!r}.",
                param="file_id",
                code="file_not_found",
            )
        async with self._locks.setdefault(store.id, asyncio.Lock()):
            return await asyncio.to_thread(store.delete, docs)

    async def parse(
        self, filename: str, data: bytes, *, doc_id: str, attributes: dict[str, Any]
    ) -> list[Document]:
        """The documents in an uploaded file, parsed in a worker process with a time limit
        (a thread without workers): never on the event loop. Raises ``LoaderError`` (a 400,
        mapped in ``gateway.errors``), ``file_parse_timeout`` when the limit stopped it."""
        check_suffix(filename)
        if self.workers is None:
            return await asyncio.to_thread(
                load_bytes, filename, data, doc_id=doc_id, metadata=attributes
            )
        try:
            return await self.workers.run(
                load_bytes, filename, data, doc_id=doc_id, metadata=attributes
            )
        except WorkTimedOut:
            raise LoaderError(
                f"{filename!r} took longer than {self.workers.timeout:g} s to parse and was "
                "given up (split it, or send its text).",
                "file_parse_timeout",
            ) from None

    # -- reading --------------------------------------------------------------------------------

    async def search(self, store: VectorStore, query: str, options: SearchOptions) -> list[Hit]:
        started = time.perf_counter()
        store.check_embedder(self.embedder)
        hits = await asyncio.to_thread(
            lambda: search(store.snapshot, query, self.embedder, options)  # loads off the loop
        )
        self.metrics.retrieval.labels(store.id).observe(time.perf_counter() - started)
        return hits

    async def retrieve(
        self,
        principal: Principal,
        config: RagConfig,
        query: str,
        screen: Callable[[str], str | None] | None = None,
        by_route: bool = False,
        route: str = "",
    ) -> Retrieved:
        """Search for ``query``; ``screen`` (the safety policy) may rewrite or drop each chunk.
        ``by_route``: the operator put this store behind a route the key may use, which lets
        the key search it (read only) whoever owns it."""
        try:
            store = await self.open(config.store, principal, by_route)
        except NotFound:
            if not by_route:
                raise
            names = await asyncio.to_thread(self.names)
            raise RouteUnavailable(missing_store_message(route, config.store, names)) from None
        options = SearchOptions(
            top_k=config.top_k,
            mode=config.mode,
            fusion=config.fusion,
            weights=config.weights,
            filters=config.filters,
            score_threshold=config.score_threshold,
            min_similarity=config.min_similarity,
            mmr=config.mmr,
        )
        started = time.perf_counter()
        hits = await self.search(store, query, options)
        context: list[dict[str, Any]] = []
        citations: list[dict[str, Any]] = []
        dropped = 0
        documents = store.snapshot.documents  # one look at CURRENT, not one per hit
        for hit in hits:
            chunk = hit.chunk
            text = chunk.text
            if screen is not None:
                screened = await asyncio.to_thread(screen, text)
                if screened is None:
                    dropped += 1
                    continue
                text = screened
            number = len(context) + 1
            doc = documents.get(chunk.doc_id, {})
            context.append({"text": text, "id": chunk.doc_id, "source": chunk.title})
            citations.append(
                {
                    "index": number,  # the [n] the prompt numbered this chunk with
                    "marker": f"[{number}]",
                    "store": store.id,
                    "document_id": chunk.doc_id,
                    "chunk_id": chunk.id,
                    "file_id": doc.get("file_id"),
                    "filename": doc.get("filename"),
                    "title": chunk.title or None,
                    "score": round(hit.score, 6),
                    "similarity": None if hit.dense is None else round(hit.dense, 6),
                    "snippet": chunk.text[:SNIPPET_CHARS],
                }
            )
        info = {
            "store": store.id,
            "version": store.snapshot.version,
            "mode": config.mode,
            "top_k": config.top_k,
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if screen is not None:
            info["dropped"] = dropped
        return Retrieved(context, citations, info)


def missing_store_message(route: str, store: str, names: list[str]) -> str:
    close = difflib.get_close_matches(store, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"Route {route!r} searches vector store {store!r}, which does not exist on this "
        f"gateway{hint} Create it (`ragline ingest --store {store} FILES`) or fix the route's "
        "`rag.store`."
    )


def _named(principal: Principal, store: VectorStore) -> bool:
    """The key's ``vector_stores`` patterns cover this store."""
    patterns = principal.policy.vector_stores
    return any(
        fnmatch.fnmatchcase(store.id, p) or fnmatch.fnmatchcase(store.name, p) for p in patterns
    )


def _allowed(principal: Principal, store: VectorStore, by_route: bool = False) -> bool:
    """A key uses a store its patterns cover and that it made, or that the operator made
    (``ragline ingest``), or that its patterns name exactly (a store shared on purpose, not by
    a wildcard), or that a route it may use searches (read only); admins use every store."""
    if principal.admin:
        return True
    if not _named(principal, store):
        return False
    if by_route:
        return True
    owner = store.info.get("owner")
    if owner is None or owner == principal.key_id:
        return True
    return any(p in (store.id, store.name) for p in principal.policy.vector_stores)
