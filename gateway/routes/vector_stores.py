"""OpenAI's files and vector stores API, backed by ``gateway.retrieval.RagService``.

``POST /v1/files`` (multipart) stores an upload; ``POST /v1/vector_stores/{id}/files`` attaches
it (``file_id``), or takes a multipart ``file`` directly, or plain ``text`` with a
``document_id`` (ragline's extension: posting the same id again updates that document, an
unchanged one is a no-op). Ingestion is synchronous: the file object comes back ``completed``,
or the request fails with a 4xx and the store is unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.datastructures import UploadFile

from gateway.auth import Principal, principal_of
from gateway.errors import InvalidRequest, NotFound
from gateway.http import parse_body
from gateway.openapi import BODIES, BodySchemas
from gateway.quotas import Quotas
from gateway.retrieval import RagService
from gateway.routes.deps import Charged
from rag import HYBRID_WEIGHTS
from rag.chunking import ChunkingConfig
from rag.retriever import SearchOptions
from rag.store import VectorStore

router = APIRouter(dependencies=[Charged])  # every call counts against the key's RPM
Attributes = dict[Annotated[str, StringConstraints(max_length=64)], str | int | float | bool]


class StaticChunking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["static"]
    static: ChunkingConfig


class AutoChunking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CreateStore(_Body):
    name: str | None = Field(default=None, max_length=64)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    file_ids: list[str] | None = Field(default=None, max_length=500)
    chunking_strategy: StaticChunking | AutoChunking | None = None
    expires_after: dict[str, Any] | None = None
    description: str | None = None
    index: Literal["flat", "hnsw", "ivf"] = Field(default="flat", description="ragline extension")


class AttachFile(_Body):
    file_id: str | None = None
    attributes: Attributes | None = Field(default=None, max_length=16)
    chunking_strategy: StaticChunking | AutoChunking | None = None
    # ragline extension: ingest text directly, keyed by a document id of your choosing
    text: str | None = None
    document_id: str | None = Field(default=None, min_length=1, max_length=200)
    title: str | None = Field(default=None, max_length=500)


class RankingOptions(_Body):
    ranker: str | None = None
    score_threshold: float | None = None


class SearchBody(_Body):
    query: str | list[str]
    filters: dict[str, Any] | None = None
    max_num_results: int = Field(default=10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False
    # ragline extensions
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    fusion: Literal["zscore", "rrf"] = "zscore"
    weights: tuple[float, float] = HYBRID_WEIGHTS
    mmr: float | None = Field(default=None, ge=0, le=1)


def _service(request: Request) -> RagService:
    rag: RagService = request.app.state.rag
    return rag


async def _charge(request: Request, nbytes: int) -> None:
    """Count an upload against the key's bytes-per-day quota (429 when it does not fit)."""
    quotas: Quotas = request.app.state.quotas
    await quotas.charge_upload(principal_of(request.state), nbytes)


def _chunking(spec: StaticChunking | AutoChunking | None) -> ChunkingConfig | None:
    return spec.static if isinstance(spec, StaticChunking) else None


def store_object(store: VectorStore) -> dict[str, Any]:
    info = store.describe()
    snap = store.snapshot
    files = {d.get("file_id") for d in snap.documents.values()}
    return {
        "id": store.id,
        "object": "vector_store",
        "created_at": info["created_at"],
        "name": store.name,
        "usage_bytes": info["bytes"],
        "file_counts": {
            "in_progress": 0,
            "completed": len(files),
            "failed": 0,
            "cancelled": 0,
            "total": len(files),
        },
        "status": "completed",
        "expires_after": None,
        "expires_at": None,
        "last_active_at": int(time.time()),
        "metadata": info["metadata"],
        "ragline": {
            "version": info["version"],
            "documents": info["documents"],
            "chunks": info["chunks"],
            "index": info["index"],
        },
    }


def file_object(store: VectorStore, file_id: str, extra: dict[str, Any] | None = None) -> dict:
    docs = [d for d in store.snapshot.documents.values() if d.get("file_id") == file_id]
    if not docs:
        raise NotFound(
            f"No file {file_id!r} in vector store {store.id!r}.",
            param="file_id",
            code="file_not_found",
        )
    return {
        "id": file_id,
        "object": "vector_store.file",
        "created_at": min(int(d.get("created_at", 0)) for d in docs),
        "vector_store_id": store.id,
        "status": "completed",
        "usage_bytes": sum(int(d.get("bytes", 0)) for d in docs),
        "last_error": None,
        "attributes": docs[0].get("metadata") or {},
        "chunking_strategy": {"type": "static", "static": store.chunking.model_dump()},
        "ragline": {
            "filename": docs[0].get("filename"),
            "documents": len(docs),
            "chunks": sum(len(d["chunks"]) for d in docs),
            **(extra or {}),
        },
    }


def _attach_body() -> dict[str, Any]:
    """A store's files take JSON (a file id, or text) or a multipart upload."""
    extra = BODIES.json(AttachFile)
    upload = BodySchemas.upload("document_id")["requestBody"]["content"]
    extra["requestBody"]["content"].update(upload)
    return extra


# -- files ----------------------------------------------------------------------------------------


async def _form_file(request: Request) -> tuple[str, bytes, dict[str, str]]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("Upload files as multipart/form-data.", param="file")
    form = await request.form(max_files=1, max_fields=16)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("The form needs a `file` part.", param="file")
    data = await upload.read()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return upload.filename or "upload.txt", data, fields


@router.post("/v1/files", openapi_extra=BodySchemas.upload("purpose"))
async def create_file(request: Request) -> dict[str, Any]:
    filename, data, fields = await _form_file(request)
    await _charge(request, len(data))
    rag = _service(request)
    await rag.parse(filename, data, doc_id="probe", attributes={})  # bad files fail here: 400
    owner = principal_of(request.state)
    return rag.files.create(filename, data, fields.get("purpose", "assistants"), owner)


@router.get("/v1/files")
async def list_uploaded_files(
    request: Request,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    """The key's own files (an admin's: every file), OpenAI's list shape and cursor."""
    rag, principal = _service(request), principal_of(request.state)
    files, more = await asyncio.to_thread(
        rag.files.list_files, principal, purpose, order, after, limit
    )
    return {
        "object": "list",
        "data": files,
        "first_id": files[0]["id"] if files else None,
        "last_id": files[-1]["id"] if files else None,
        "has_more": more,
    }


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return _service(request).files.get(file_id, principal_of(request.state))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    data = await asyncio.to_thread(
        _service(request).files.content, file_id, principal_of(request.state)
    )
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    _service(request).files.delete(file_id, principal_of(request.state))
    return {"id": file_id, "object": "file", "deleted": True}


# -- vector stores --------------------------------------------------------------------------------


@router.post("/v1/vector_stores", openapi_extra=BODIES.json(CreateStore))
async def create_store(request: Request) -> dict[str, Any]:
    body = await parse_body(request, CreateStore)
    rag = _service(request)
    principal = principal_of(request.state)
    chunking = _chunking(body.chunking_strategy) or ChunkingConfig()
    for file_id in body.file_ids or []:
        rag.files.get(file_id, principal)  # unknown ids fail before anything is created
    quotas: Quotas = request.app.state.quotas
    store = await rag.create(
        body.name, body.metadata or {}, chunking, body.index, principal, quotas.check_stores
    )
    for file_id in body.file_ids or []:
        await _attach(rag, store, file_id, {}, None, principal)
    return store_object(store)


@router.get("/v1/vector_stores")
async def list_stores(request: Request) -> dict[str, Any]:
    rag, principal = _service(request), principal_of(request.state)
    stores = await asyncio.to_thread(  # reads every store's serving version: off the loop
        lambda: [store_object(s) for s in rag.list_stores(principal)]
    )
    stores.sort(key=lambda s: -s["created_at"])
    return {
        "object": "list",
        "data": stores,
        "first_id": stores[0]["id"] if stores else None,
        "last_id": stores[-1]["id"] if stores else None,
        "has_more": False,
    }


@router.get("/v1/vector_stores/{store_id}")
async def get_store(request: Request, store_id: str) -> dict[str, Any]:
    return store_object(await _service(request).open(store_id, principal_of(request.state)))


@router.delete("/v1/vector_stores/{store_id}")
async def delete_store(request: Request, store_id: str) -> dict[str, Any]:
    rag = _service(request)
    store = await rag.open(store_id, principal_of(request.state))
    rag.delete(store)
    return {"id": store.id, "object": "vector_store.deleted", "deleted": True}


@router.post("/v1/vector_stores/{store_id}/files", openapi_extra=_attach_body())
async def add_file(request: Request, store_id: str) -> dict[str, Any]:
    rag = _service(request)
    principal = principal_of(request.state)
    store = await rag.open(store_id, principal)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        filename, data, fields = await _form_file(request)
        await _charge(request, len(data))
        await rag.parse(filename, data, doc_id="probe", attributes={})  # bad files: no storing
        obj = rag.files.create(filename, data, "assistants", principal)
        document_id = fields.get("document_id")
        return await _attach(rag, store, obj["id"], {}, None, principal, document_id=document_id)
    body = await parse_body(request, AttachFile)
    attributes = dict(body.attributes or {})
    chunking = _chunking(body.chunking_strategy)
    if body.text is not None:
        if body.file_id is not None or body.document_id is None:
            raise InvalidRequest(
                "Send either `file_id`, or `text` with a `document_id`.", param="document_id"
            )
        text = body.text.encode()
        await _charge(request, len(text))
        docs = await rag.parse(
            f"{body.document_id}.txt", text, doc_id=body.document_id,
            attributes=attributes,
        )  # fmt: skip
        if body.title:
            docs[0].title = body.title
        result = await rag.add_documents(
            store, docs, file_id=body.document_id, filename=body.title or body.document_id,
            chunking=chunking,
        )  # fmt: skip
        return file_object(store, body.document_id, _outcome(result))
    if body.file_id is None:
        raise InvalidRequest("`file_id` is required.", param="file_id")
    return await _attach(rag, store, body.file_id, attributes, chunking, principal)


async def _attach(
    rag: RagService,
    store: VectorStore,
    file_id: str,
    attributes: dict[str, Any],
    chunking: ChunkingConfig | None,
    principal: Principal,
    document_id: str | None = None,
) -> dict[str, Any]:
    meta = rag.files.get(file_id, principal)  # only one's own files
    data = rag.files.content(file_id, principal)
    docs = await rag.parse(
        meta["filename"], data, doc_id=document_id or file_id, attributes=attributes
    )
    result = await rag.add_documents(
        store, docs, file_id=file_id, filename=meta["filename"], chunking=chunking
    )
    return file_object(store, file_id, _outcome(result))


def _outcome(result: Any) -> dict[str, Any]:
    return {
        "version": result.version,
        "added": len(result.added),
        "updated": len(result.updated),
        "unchanged": len(result.unchanged),
    }


@router.get("/v1/vector_stores/{store_id}/files")
async def list_files(request: Request, store_id: str) -> dict[str, Any]:
    store = await _service(request).open(store_id, principal_of(request.state))
    ids = sorted({str(d.get("file_id")) for d in store.snapshot.documents.values()})
    data = [file_object(store, i) for i in ids]
    return {
        "object": "list",
        "data": data,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
        "has_more": False,
    }


@router.get("/v1/vector_stores/{store_id}/files/{file_id}")
async def get_store_file(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
    store = await _service(request).open(store_id, principal_of(request.state))
    return file_object(store, file_id)


class UpdateFile(_Body):
    attributes: Attributes | None = Field(max_length=16)


@router.post("/v1/vector_stores/{store_id}/files/{file_id}", openapi_extra=BODIES.json(UpdateFile))
async def update_store_file(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
    """Replace a file's attributes (its documents are re-indexed with them)."""
    body = await parse_body(request, UpdateFile)
    rag = _service(request)
    principal = principal_of(request.state)
    store = await rag.open(store_id, principal)
    current = file_object(store, file_id)
    if not file_id.startswith("file-"):
        raise InvalidRequest(
            "Attributes of a text document change by posting its text again with them.",
            param="file_id",
        )
    document_id = current["ragline"]["documents"] == 1 and next(
        i for i, d in store.snapshot.documents.items() if d.get("file_id") == file_id
    )
    return await _attach(
        rag, store, file_id, dict(body.attributes or {}), None, principal,
        document_id=document_id or None,
    )  # fmt: skip


@router.delete("/v1/vector_stores/{store_id}/files/{file_id}")
async def delete_store_file(request: Request, store_id: str, file_id: str) -> dict[str, Any]:
    rag = _service(request)
    store = await rag.open(store_id, principal_of(request.state))
    await rag.remove_file(store, file_id)
    return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}


@router.post("/v1/vector_stores/{store_id}/search", openapi_extra=BODIES.json(SearchBody))
async def search_store(request: Request, store_id: str) -> dict[str, Any]:
    body = await parse_body(request, SearchBody)
    rag = _service(request)
    store = await rag.open(store_id, principal_of(request.state))
    query = body.query if isinstance(body.query, str) else " ".join(body.query)
    ranking = body.ranking_options
    options = SearchOptions(
        top_k=body.max_num_results,
        mode=body.mode,
        fusion=body.fusion,
        weights=body.weights,
        filters=body.filters,
        mmr=body.mmr,
        score_threshold=ranking.score_threshold if ranking else None,
    )
    hits = await rag.search(store, query, options)
    documents = store.snapshot.documents
    data = []
    for hit in hits:
        doc = documents.get(hit.chunk.doc_id, {})
        data.append(
            {
                "file_id": doc.get("file_id", hit.chunk.doc_id),
                "filename": doc.get("filename") or hit.chunk.source,
                "score": hit.score,
                "attributes": doc.get("metadata") or {},
                "content": [{"type": "text", "text": hit.chunk.text}],
                "ragline": {
                    "document_id": hit.chunk.doc_id,
                    "chunk_id": hit.chunk.id,
                    "position": hit.chunk.position,
                    "title": hit.chunk.title,
                    "dense": hit.dense,
                    "bm25": hit.bm25,
                },
            }
        )
    return {
        "object": "vector_store.search_results.page",
        "search_query": query,
        "data": data,
        "has_more": False,
        "next_page": None,
    }
