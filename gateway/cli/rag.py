"""``ragline ingest``, ``ragline search`` and ``ragline eval retrieval``: vector stores offline.

They work on the same directory the gateway serves (``RAGLINE_RAG_DIR``); a running gateway
picks up a new version on its next search.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from gateway.config import Settings
from rag.chunking import ChunkingConfig
from rag.loaders import LoaderError, load_path
from rag.retriever import SearchOptions, search
from rag.store import StoreError, VectorStore

console = Console()
errors = Console(stderr=True)
CHUNKING = ChunkingConfig()  # the library's defaults are the CLI's


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


def _root(rag_dir: Path | None) -> Path:
    return (rag_dir or Settings().rag_dir).expanduser() / "stores"


def find_store(root: Path, ref: str) -> VectorStore | None:
    if not root.exists():
        return None
    for path in sorted(root.iterdir()):
        if path.name.startswith("vs_") and (path / "store.json").exists():
            store = VectorStore(path)
            if ref in (store.id, store.name):
                return store
    return None


def ingest(
    path: Annotated[
        Path, typer.Argument(help="A file or a directory (.txt .md .html .pdf .jsonl).")
    ],
    store: Annotated[str, typer.Option("--store", "-s", help="Store name or id (created if new).")],
    chunk_size: Annotated[
        int, typer.Option(help="Chunk size in embedding tokens (new stores).")
    ] = CHUNKING.max_chunk_size_tokens,
    chunk_overlap: Annotated[
        int, typer.Option(help="Chunk overlap in tokens (new stores).")
    ] = CHUNKING.chunk_overlap_tokens,
    index: Annotated[str, typer.Option(help="flat, hnsw or ivf (new stores).")] = "flat",
    metadata: Annotated[
        str | None, typer.Option(help='Attributes for every document, JSON: \'{"team": "a"}\'.')
    ] = None,
    rag_dir: Annotated[
        Path | None,
        typer.Option(help="Where stores live (env RAGLINE_RAG_DIR; default ~/.cache/ragline/rag)."),
    ] = None,
) -> None:
    """Load, chunk, embed and index documents; unchanged documents are skipped."""
    if index not in ("flat", "hnsw", "ivf"):
        raise typer.BadParameter("use flat, hnsw or ivf", param_hint="--index")
    try:
        attrs = json.loads(metadata) if metadata else {}
        chunking = ChunkingConfig(
            max_chunk_size_tokens=chunk_size, chunk_overlap_tokens=chunk_overlap
        )
    except (json.JSONDecodeError, ValueError) as exc:
        raise _fail(f"invalid option: {exc}") from None
    if not isinstance(attrs, dict):
        raise _fail("--metadata must be a JSON object")
    root = _root(rag_dir)
    embedder = Settings().embedder()
    try:
        docs = list(load_path(path, metadata=attrs))
        target = find_store(root, store)
        if target is None:
            embedder.embed(["dimension probe"])
            target = VectorStore.create(
                root, store, dim=embedder.dim, embedder_name=embedder.name,
                index=index, chunking=chunking,  # type: ignore[arg-type]
            )  # fmt: skip
            console.print(f"created vector store {target.id}")
        files = {
            d.id: {"file_id": f"path:{d.source.split(':')[0]}", "filename": d.source} for d in docs
        }
        with Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=errors, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("embedding chunks", total=None)
            started = time.perf_counter()
            result = target.upsert(
                docs, embedder, files=files,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
    except (LoaderError, StoreError) as exc:
        raise _fail(exc.message) from None
    seconds = time.perf_counter() - started
    changed = len(result.added) + len(result.updated)
    console.print(
        f"{target.id} version {result.version}: {len(result.added)} added, "
        f"{len(result.updated)} updated, {len(result.unchanged)} unchanged, {result.chunks} chunks "
        f"in {seconds:.1f}s ({changed / seconds if seconds else 0:.1f} documents/s)"
    )


def search_command(
    store: Annotated[str, typer.Argument(help="Store name or id.")],
    query: Annotated[str, typer.Argument(help="What to look for.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=100)] = 5,
    mode: Annotated[str, typer.Option(help="hybrid, dense or bm25.")] = "hybrid",
    filters: Annotated[
        str | None, typer.Option(help='OpenAI filter JSON: \'{"type": "eq", ...}\'.')
    ] = None,
    output_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    rag_dir: Annotated[
        Path | None,
        typer.Option(help="Where stores live (env RAGLINE_RAG_DIR; default ~/.cache/ragline/rag)."),
    ] = None,
) -> None:
    """Search a store and print the best chunks."""
    if mode not in ("hybrid", "dense", "bm25"):
        raise typer.BadParameter("use hybrid, dense or bm25", param_hint="--mode")
    target = find_store(_root(rag_dir), store)
    if target is None:
        raise _fail(f"no vector store {store!r} under {_root(rag_dir)}")
    try:
        spec = json.loads(filters) if filters else None
        options = SearchOptions(top_k=top_k, mode=mode, filters=spec)  # type: ignore[arg-type]
        hits = search(target.snapshot, query, Settings().embedder(), options)
    except json.JSONDecodeError as exc:
        raise _fail(f"--filters is not JSON: {exc}") from None
    except StoreError as exc:
        raise _fail(exc.message) from None
    rows: list[dict[str, Any]] = [
        {"rank": i, "score": round(h.score, 4), "document_id": h.chunk.doc_id,
         "chunk_id": h.chunk.id, "title": h.chunk.title, "text": h.chunk.text}
        for i, h in enumerate(hits, 1)
    ]  # fmt: skip
    if output_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("#", "score", "document", "text")
    for row in rows:
        snippet = row["text"][:160].replace("\n", " ")
        table.add_row(
            str(row["rank"]), f"{row['score']:.3f}", escape(row["document_id"]), escape(snippet)
        )
    console.print(table)


def eval_retrieval(
    data: Annotated[
        Path, typer.Option(help="BEIR directory: corpus.jsonl, queries.jsonl, qrels.tsv.")
    ],
    store: Annotated[
        str | None,
        typer.Option(help="Evaluate this existing store instead of ingesting the corpus."),
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where the corpus store is built (default: a temp dir).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N queries.")] = None,
    folds: Annotated[
        int,
        typer.Option(
            help="k for choosing the hybrid settings by k-fold CV over the queries (0: skip)."
        ),
    ] = 5,
    output: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here.")
    ] = None,
    rag_dir: Annotated[
        Path | None,
        typer.Option(help="Where stores live (env RAGLINE_RAG_DIR; default ~/.cache/ragline/rag)."),
    ] = None,
) -> None:
    """nDCG@10, Recall@10/100 and MRR@10 for BM25, dense and hybrid, with query latency; the
    hybrid settings chosen by k-fold CV over the queries, with the mean and spread over folds."""
    import tempfile

    from rag.eval import Beir, evaluate, standard_modes

    embedder = Settings().embedder()
    try:
        beir = Beir.load(data)
    except (OSError, ValueError, KeyError) as exc:
        raise _fail(f"cannot read BEIR data in {data}: {exc}") from None
    if limit:
        beir.queries = dict(list(beir.queries.items())[:limit])
    ingest_rate = None
    if store is not None:
        target = find_store(_root(rag_dir), store)
        if target is None:
            raise _fail(f"no vector store {store!r}")
    else:
        root = work_dir or Path(tempfile.mkdtemp(prefix="ragline-eval-"))
        target = find_store(root, "eval-corpus")
        if target is None:
            embedder.embed(["dimension probe"])
            target = VectorStore.create(
                root, "eval-corpus", dim=embedder.dim, embedder_name=embedder.name
            )
            docs = list(load_path(data / "corpus.jsonl"))
            errors.print(f"ingesting {len(docs)} documents into {target.path} ...")
            result = target.upsert(docs, embedder)
            ingest_rate = len(docs) / result.seconds
            errors.print(
                f"  {result.chunks} chunks in {result.seconds:.0f}s ({ingest_rate:.1f} documents/s)"
            )
    embedder.clear_cache()
    results = evaluate(
        target.snapshot, beir, embedder, standard_modes(), clear=embedder.clear_cache
    )
    table = Table(
        "mode",
        "nDCG@10",
        "R@10",
        "R@100",
        "MRR@10",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        title=f"{data.name}: {len(beir.queries)} queries, {len(target.snapshot)} chunks",
    )
    for r in results:
        table.add_row(
            r.mode,
            f"{r.ndcg10:.4f}",
            f"{r.recall10:.4f}",
            f"{r.recall100:.4f}",
            f"{r.mrr10:.4f}",
            *(f"{r.latency_ms[p]:.2f}" for p in ("p50", "p95", "p99")),
        )
    console.print(table)
    cv = None
    if folds >= 2 and len(beir.queries) >= folds:
        cv = _cross_validate(target.snapshot, beir, embedder, folds)
    elif folds:
        errors.print(f"cross-validation skipped: {len(beir.queries)} queries, {folds} folds")
    if output is not None:
        output.write_text(json.dumps({
            "data": str(data), "queries": len(beir.queries), "chunks": len(target.snapshot),
            "ingest_documents_per_s": ingest_rate,
            "results": [r.__dict__ for r in results],
            "cross_validation": None if cv is None else {
                **cv.__dict__, "mean": cv.mean, "spread": cv.spread,
            },
        }, indent=1))  # fmt: skip


def _cross_validate(snapshot: Any, beir: Any, embedder: Any, folds: int) -> Any:
    from rag.eval import cross_validate, grid_scores

    scores, default = grid_scores(snapshot, beir, embedder)
    cv = cross_validate(scores, default, folds)
    table = Table(
        "fold", "chosen on the other folds", "nDCG@10", "the default",
        title=f"hybrid settings by {folds}-fold CV over the queries (default: {default}; "
        f"{len(scores)} settings)",
    )  # fmt: skip
    for k, (name, got, base) in enumerate(
        zip(cv.chosen, cv.fold_ndcg, cv.default_fold_ndcg, strict=True), 1
    ):
        table.add_row(str(k), name, f"{got:.4f}", f"{base:.4f}")
    console.print(table)
    console.print(
        f"cross-validated hybrid nDCG@10: {cv.mean:.4f} ± {cv.spread:.4f} (mean ± std over "
        f"folds); the default on the same folds {np.mean(cv.default_fold_ndcg):.4f} ± "
        f"{np.std(cv.default_fold_ndcg):.4f}; on the full set {cv.full_set[default]:.4f}"
    )
    return cv


ingest_app = typer.Typer()
ingest_app.command("ingest")(ingest)
search_app = typer.Typer()
search_app.command("search")(search_command)


stores_app = typer.Typer(
    help="List and delete vector stores in RAGLINE_RAG_DIR.", no_args_is_help=True
)
RagDir = Annotated[
    Path | None,
    typer.Option(help="Where stores live (env RAGLINE_RAG_DIR; default ~/.cache/ragline/rag)."),
]


@stores_app.command("list")
def stores_list(
    rag_dir: RagDir = None,
    output_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every store: id, name, owner, documents, chunks, serving version, index."""
    root = _root(rag_dir)
    rows = []
    for path in sorted(root.glob("vs_*/store.json")) if root.exists() else []:
        store = VectorStore(path.parent)
        snapshot = store.snapshot
        rows.append({
            "id": store.id, "name": store.name, "owner": store.info.get("owner"),
            "documents": len(snapshot.documents), "chunks": len(snapshot),
            "version": snapshot.version, "index": store.info.get("index"),
        })  # fmt: skip
    if output_json:
        print(json.dumps(rows))
        return
    if not rows:
        console.print(f"no vector stores under {root}")
        return
    table = Table("id", "name", "owner", "documents", "chunks", "version", "index")
    for row in rows:
        table.add_row(*(escape(str(row[k] if row[k] is not None else "-")) for k in row))
    console.print(table)


@stores_app.command("delete")
def stores_delete(
    store: Annotated[str, typer.Argument(help="Store name or id.")],
    rag_dir: RagDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a store (a running gateway stops serving it at once; searches already running
    finish on the version they hold)."""
    import os
    import secrets
    import shutil

    root = _root(rag_dir)
    target = find_store(root, store)
    if target is None:
        raise _fail(f"no vector store {store!r} under {root}")
    if not yes and not typer.confirm(f"delete {target.id} ({target.name})?"):
        raise typer.Exit(1)
    trash = root / f".deleted-{target.id}-{secrets.token_hex(4)}"
    os.rename(target.path, trash)  # atomic: the store is gone for every reader at once
    shutil.rmtree(trash, ignore_errors=True)
    console.print(f"deleted {target.id} ({target.name})")
