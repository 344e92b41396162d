"""Loaders, chunking, versioned stores and retrieval, with the real MiniLM, FAISS and bm25s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rag.chunking import Chunker, ChunkingConfig
from rag.embeddings import SentenceTransformerEmbedder
from rag.eval import metrics
from rag.loaders import Document, LoaderError, load_bytes, load_path
from rag.retriever import SearchOptions, search
from rag.store import StoreError, VectorStore, load_version
from tests.conftest import REPO
from tests.rag.helpers import claims_for, corpus, minimal_pdf, write_slice


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def new_store(tmp: Path, embedder: SentenceTransformerEmbedder, **kw: object) -> VectorStore:
    embedder.embed(["probe"])
    return VectorStore.create(tmp, "s", dim=embedder.dim, embedder_name=embedder.name, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scifact_store(
    tmp_path_factory: pytest.TempPathFactory, embedder: SentenceTransformerEmbedder
) -> VectorStore:
    tmp = tmp_path_factory.mktemp("scifact")
    store = new_store(tmp, embedder)
    store.upsert(load_path(write_slice(tmp / "corpus.jsonl", 400)), embedder)
    return store


# -- loaders and chunking ---------------------------------------------------------------------------


def test_loaders_read_each_format(tmp_path: Path) -> None:
    html = b"<html><head><title>Pump manual</title><style>p{}</style></head><body><h1>Pump</h1><p>Press &amp; hold the red button.</p><script>x()</script></body></html>"
    (doc,) = load_bytes("m.html", html)
    assert doc.title == "Pump manual" and "Press & hold the red button." in doc.text
    assert "x()" not in doc.text and "p{}" not in doc.text
    (md,) = load_bytes("guide.md", b"# Setup guide\n\nInstall it.\n")
    assert md.title == "Setup guide" and md.id == "guide.md"
    (pdf,) = load_bytes("spec.pdf", minimal_pdf("Torque limit is 42 newton metres"))
    assert "Torque limit is 42 newton metres" in pdf.text
    rows = load_bytes(
        "c.jsonl", b'{"_id": "7", "title": "T", "text": "body", "metadata": {"y": 1}}\n'
    )
    assert rows[0].id == "7" and rows[0].title == "T" and rows[0].metadata == {"y": 1}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha text")
    (tmp_path / "b.md").write_text("beta text")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert sorted(d.id for d in load_path(tmp_path)) == ["b.md", "sub/a.txt"]


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty.txt", b"  \n", "empty_file"),
        ("tool.exe", b"MZ...", "unsupported_file_type"),
        ("broken.pdf", b"%PDF-1.4\nthis is not a pdf at all", "file_parse_error"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "file_parse_error"),
        ("bad.jsonl", b'{"_id": "1", "text": "ok"}\n{not json\n', "file_parse_error"),
        (
            "dup.jsonl",
            b'{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n',
            "file_parse_error",
        ),
    ],
)
def test_loaders_reject_bad_files_with_a_code(name: str, data: bytes, code: str) -> None:
    with pytest.raises(LoaderError) as err:
        load_bytes(name, data)
    assert err.value.code == code
    assert name.split(".")[0] in err.value.message


def test_chunks_fit_the_embedding_model_and_overlap(embedder: SentenceTransformerEmbedder) -> None:
    from transformers import AutoTokenizer

    text = " ".join(d["text"] for d in corpus()[:6])
    config = ChunkingConfig(max_chunk_size_tokens=64, chunk_overlap_tokens=16)
    pieces = Chunker(embedder.path, config).split(text)
    tok = AutoTokenizer.from_pretrained(str(embedder.path))
    sizes = [len(tok.encode(p.text, add_special_tokens=False)) for p in pieces]
    assert len(pieces) > 5 and max(sizes) <= 64
    assert [p.position for p in pieces] == list(range(len(pieces)))
    shared = 0
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert text[b.start : b.start + len(b.text)] == b.text  # offsets point into the text
        shared += b.start < a.start + len(a.text)
    assert shared >= 1
    # the overlap is made of whole separator-delimited pieces: words overlap on every boundary
    words = " ".join(f"word{i}" for i in range(400))
    pieces = Chunker(embedder.path, config).split(words)
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert b.start < a.start + len(a.text)
    with pytest.raises(ValueError):
        ChunkingConfig(max_chunk_size_tokens=64, chunk_overlap_tokens=40)


def test_chunks_are_what_langchains_huggingface_splitter_makes(
    embedder: SentenceTransformerEmbedder,
) -> None:
    """The chunker counts tokens its own (faster) way; the chunks must not change."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from transformers import AutoTokenizer

    config = ChunkingConfig(max_chunk_size_tokens=120, chunk_overlap_tokens=24)
    chunker = Chunker(embedder.path, config)
    reference = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        AutoTokenizer.from_pretrained(str(embedder.path)),
        chunk_size=120,
        chunk_overlap=24,
        separators=["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", ""],
        keep_separator="end",
        strip_whitespace=True,
    )
    texts = [d["text"] for d in corpus()[:150]] + ["x" * 3000, "word " * 700]
    for text in texts:
        assert [p.text for p in chunker.split(text)] == reference.split_text(text)


# -- stores -------------------------------------------------------------------------------------------


def test_versions_update_delete_and_noop(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(tmp_path, embedder)
    docs = [
        Document("a", "The harbour bridge opened in 1932.", "Bridge", metadata={"team": "x"}),
        Document("b", "The museum sells tickets for 12 euros.", "Museum", metadata={"team": "y"}),
    ]
    first = store.upsert(docs, embedder)
    assert (first.version, sorted(first.added)) == (1, ["a", "b"])
    again = store.upsert(docs, embedder)
    assert again.unchanged == ["a", "b"] and again.version == 1 and store.snapshot.version == 1
    changed = store.upsert(
        [Document("a", "The harbour bridge opened in 1935.", "Bridge")], embedder
    )
    assert changed.updated == ["a"] and store.snapshot.version == 2
    hits = search(store.snapshot, "when did the bridge open", embedder, SearchOptions(top_k=1))
    assert "1935" in hits[0].chunk.text
    assert all("1932" not in c.text for c in store.snapshot.chunks)
    store.delete(["b"])
    assert sorted(store.snapshot.documents) == ["a"] and store.snapshot.version == 3
    with pytest.raises(StoreError) as err:
        store.delete(["nope"])
    assert err.value.status == 404
    # a second reader (another process, say) sees the current version from disk
    other = VectorStore(store.path)
    assert other.snapshot.version == 3 and len(other.snapshot) == len(store.snapshot)
    # no pickle anywhere: every array loads with allow_pickle=False
    version = store.path / "versions" / (store.path / "CURRENT").read_text().strip()
    for npy in version.rglob("*.npy"):
        np.load(npy, allow_pickle=False)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["documents"] == 1
    # v1 stopped being current a moment ago: a reader elsewhere may still be loading it
    assert sorted(p.name for p in (store.path / "versions").glob("v*")) == [
        "v000001", "v000002", "v000003",
    ]  # fmt: skip
    from rag import store as store_module

    monkeypatch.setattr(store_module, "PRUNE_GRACE", 0.0)  # as if minutes had passed
    store.upsert([Document("c", "The ferry runs hourly.", "Ferry")], embedder)
    assert sorted(p.name for p in (store.path / "versions").glob("v*")) == [
        "v000003", "v000004",
    ]  # fmt: skip


def test_killed_writer_leaves_the_previous_version_serving(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    corpus_file = write_slice(tmp_path / "first.jsonl", 30)
    rag_dir = tmp_path / "rag"
    env = {**os.environ, "RAGLINE_RAG_DIR": str(rag_dir)}
    cli = [sys.executable, "-m", "gateway.cli", "ingest"]
    subprocess.run([*cli, str(corpus_file), "--store", "kb"], env=env, check=True, cwd=REPO)
    store_dir = rag_dir / "stores" / "vs_kb"
    before = (store_dir / "CURRENT").read_text()
    # a second ingest, parked by the test hook after the FAISS index is written, then SIGKILLed
    second = write_slice(tmp_path / "second.jsonl", 30, start=30)
    proc = subprocess.Popen(
        [*cli, str(second), "--store", "kb"],
        env={**env, "RAGLINE_TEST_HOLD": "index-written"},
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"holding at index-written" in line:
            break
    debris = list((store_dir / "versions").glob(".tmp-*"))
    assert debris and (debris[0] / "index.faiss").exists()  # it really was mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (store_dir / "CURRENT").read_text() == before
    store = VectorStore(store_dir)
    assert len(store.snapshot.documents) == 30
    hits = search(store.snapshot, corpus()[3]["title"], embedder, SearchOptions(top_k=3))
    assert corpus()[3]["_id"] in {h.chunk.doc_id for h in hits}
    # the next write sweeps the debris and lands
    done = subprocess.run(
        [*cli, str(second), "--store", "kb"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not list((store_dir / "versions").glob(".tmp-*"))
    assert len(VectorStore(store_dir).snapshot.documents) == 60


def test_a_damaged_version_is_refused_not_half_loaded(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    store = new_store(tmp_path, embedder)
    store.upsert([Document("a", "some text here")], embedder)
    version = store.path / "versions" / "v000001"
    with open(version / "vectors.npy", "ab") as f:
        f.write(b"junk")
    with pytest.raises(StoreError) as err:
        load_version(version)
    assert err.value.code == "store_corrupt" and "vectors.npy" in err.value.message


# -- retrieval ------------------------------------------------------------------------------------------


def test_hybrid_finds_the_evidence_for_scifact_claims(
    scifact_store: VectorStore, embedder: SentenceTransformerEmbedder
) -> None:
    ids = frozenset(d["_id"] for d in corpus()[:400])
    claims = claims_for(ids)
    assert len(claims) >= 20
    recall = {}
    for mode in ("bm25", "dense", "hybrid"):
        found = 0
        for claim, relevant in claims:
            hits = search(
                scifact_store.snapshot, claim, embedder, SearchOptions(top_k=10, mode=mode)
            )  # type: ignore[arg-type]
            ranked = list(dict.fromkeys(h.chunk.doc_id for h in hits))
            found += metrics(ranked, dict.fromkeys(relevant, 1))[1]
        recall[mode] = found / len(claims)
    assert recall["hybrid"] >= 0.9, recall
    assert recall["hybrid"] >= max(recall["bm25"], recall["dense"]) - 0.02, recall


def test_filters_apply_inside_the_search(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    store = new_store(tmp_path, embedder)
    docs = [
        Document(f"d{i}", f"Report {i}: the reactor cooling loop pressure was nominal.", f"R{i}",
                 metadata={"site": "north" if i % 10 == 0 else "south", "year": 2000 + i})
        for i in range(60)
    ]  # fmt: skip
    store.upsert(docs, embedder)
    snap = store.snapshot
    only = {"type": "eq", "key": "site", "value": "north"}
    for mode in ("dense", "bm25", "hybrid"):
        hits = search(
            snap, "reactor pressure", embedder, SearchOptions(top_k=6, mode=mode, filters=only)
        )  # type: ignore[arg-type]
        assert len(hits) == 6 and {h.chunk.metadata["site"] for h in hits} == {"north"}, mode
    both = {"type": "and", "filters": [only, {"type": "gte", "key": "year", "value": 2030}]}
    hits = search(snap, "reactor pressure", embedder, SearchOptions(top_k=10, filters=both))
    assert sorted(h.chunk.doc_id for h in hits) == ["d30", "d40", "d50"]
    with pytest.raises(StoreError) as err:
        search(
            snap, "x", embedder, SearchOptions(filters={"type": "eq", "key": "colour", "value": 1})
        )
    assert err.value.code == "unknown_filter_field" and err.value.status == 400
    with pytest.raises(StoreError):
        search(
            snap, "x", embedder, SearchOptions(filters={"type": "like", "key": "site", "value": 1})
        )


def test_mmr_trades_relevance_for_diversity(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    store = new_store(tmp_path, embedder)
    near = [
        Document(f"n{i}", f"The pump's red reset button is on the left side, note {i}.")
        for i in range(5)
    ]
    far = [
        Document("f1", "Reset the pump by unplugging it for ten seconds."),
        Document("f2", "The pump's warranty lasts two years from purchase."),
    ]
    store.upsert(near + far, embedder)
    plain = search(store.snapshot, "how do I reset the pump", embedder, SearchOptions(top_k=3))
    diverse = search(
        store.snapshot, "how do I reset the pump", embedder, SearchOptions(top_k=3, mmr=0.3)
    )
    near_plain = sum(h.chunk.doc_id.startswith("n") for h in plain)
    near_diverse = sum(h.chunk.doc_id.startswith("n") for h in diverse)
    assert near_plain >= 2 and near_diverse == 1, (plain, diverse)


def test_hnsw_and_ivf_stores_answer_like_flat(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    docs = list(load_path(write_slice(tmp_path / "c.jsonl", 120)))
    results = {}
    for kind in ("flat", "hnsw", "ivf"):
        embedder.embed(["probe"])
        store = VectorStore.create(
            tmp_path / kind, kind, dim=embedder.dim, embedder_name=embedder.name, index=kind
        )  # type: ignore[arg-type]
        store.upsert(docs, embedder)
        hits = search(store.snapshot, docs[7].title, embedder, SearchOptions(top_k=3, mode="dense"))
        results[kind] = hits[0].chunk.doc_id
    assert results["flat"] == results["hnsw"] == results["ivf"] == docs[7].id


def test_onnx_backend_computes_sentence_transformers_vectors(
    embedder: SentenceTransformerEmbedder,
) -> None:
    texts = [f"{d['title']}\n{d['text']}" for d in corpus()[:40]] + ["short", "a b"]
    onnx = embedder.embed(texts)
    assert embedder.backend == "onnx"
    reference = SentenceTransformerEmbedder(backend="torch").embed(texts)
    assert onnx.shape == reference.shape == (len(texts), 384)
    assert float((onnx * reference).sum(axis=1).min()) > 0.9999
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)


def test_onnx_encoder_tokenises_as_the_hugging_face_tokenizer(
    embedder: SentenceTransformerEmbedder,
) -> None:
    """The encoder tokenises with ``tokenizer.json`` directly (no ``transformers`` import): the
    same ids, truncation included, as the Hugging Face tokenizer it replaced."""
    from transformers import AutoTokenizer

    encoder = embedder._load()
    texts = [f"{d['title']}\n{d['text']}" for d in corpus()[:300]]  # many longer than the window
    texts += (REPO / "safety" / "data" / "hard_benign.txt").read_text().splitlines()[:200]
    texts += ["", " ", "\t\n", "Straße 東京 🤖 zero\u200bwidth İstanbul ǅ ﬁ", "[CLS] [PAD] [MASK]"]
    texts += ["x" * 5000, "word " * 2000]
    hf = AutoTokenizer.from_pretrained(str(embedder.path))
    expected = hf(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    assert encoder.token_ids(texts) == expected
    whole = hf(texts, verbose=False)["input_ids"]
    assert embedder.token_ids(texts, truncate=False) == whole
    assert max(map(len, whole)) > encoder.max_length
    assert max(map(len, expected)) == encoder.max_length  # truncation was exercised
    assert encoder.pad_id == hf.pad_token_id


def test_embedding_text_imports_neither_transformers_nor_torch() -> None:
    """Safety's classifier and retrieval embed through ONNX Runtime: a gateway whose models are
    all remote starts without PyTorch (5 s of imports on 2 cores)."""
    code = (
        "import sys\n"
        "from rag.embeddings import SentenceTransformerEmbedder\n"
        "vectors = SentenceTransformerEmbedder().embed(['is this an injection?'])\n"
        "print(vectors.shape, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 384) []"


def test_documents_embed_with_an_int8_model_close_to_float32(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    texts = [f"{d['title']}\n{d['text']}" for d in corpus()[40:80]]
    exact = embedder.embed(texts)
    documents = embedder.embed_documents(texts)
    cosine = (exact * documents).sum(axis=1)
    assert float(cosine.min()) > 0.98 and float(cosine.mean()) > 0.99
    assert float(np.abs(exact - documents).max()) > 1e-3  # another (the quantised) model ran
    assert np.allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)
    # a float32 query still finds its own int8 document first
    assert ((exact @ documents.T).argmax(axis=1) == np.arange(len(texts))).all()
    # ingestion stores exactly what embed_documents computes
    store = new_store(tmp_path, embedder)
    docs = [Document(str(i), d["text"], title=d["title"]) for i, d in enumerate(corpus()[40:44])]
    store.upsert(docs, embedder)
    snap = store.snapshot
    expected = embedder.embed_documents([c.embed_text() for c in snap.chunks])
    assert np.allclose(snap.vectors, expected, atol=1e-5)
    # and ``document_precision: float32`` ingests float32 vectors
    plain = SentenceTransformerEmbedder(document_precision="float32")
    assert np.allclose(plain.embed_documents(texts), exact, atol=1e-5)


def test_a_store_refuses_another_embedding_model(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    store = new_store(tmp_path, embedder)
    store.upsert([Document("a", "text")], embedder)
    other = SentenceTransformerEmbedder()
    other.name = "another-model"
    with pytest.raises(StoreError) as err:
        store.upsert([Document("b", "more text")], other)
    assert err.value.code == "embedding_model_mismatch" and "another-model" in err.value.message
    assert sorted(store.snapshot.documents) == ["a"]


def test_html_text_takes_linear_time_on_hostile_markup() -> None:
    """Unclosed tags, unterminated comments and deep nesting, which Python's HTMLParser handled
    in quadratic time (100 kB of `<a`: seconds, on the event loop). A ratio within one run."""
    import time

    from rag.loaders import _html

    title, text = _html("<title>T</title><p>x < y and a<b</p><!-- c --><p>Hi &amp; bye</p>")
    assert (title, text.strip()) == ("T", "x < y and a<b\n\nHi & bye")
    for unit in ("<a", "<!--", "<p>", "</p>", "<a href=", "<br>"):
        seconds = []
        for size in (20_000, 80_000):
            text = unit * (size // len(unit))
            start = time.perf_counter()
            _html(text)
            seconds.append(time.perf_counter() - start)
        assert seconds[1] / max(seconds[0], 1e-4) < 10, (unit, seconds)


def test_a_pdf_with_too_many_pages_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rag import loaders
    from rag.loaders import LoaderError, load_bytes
    from tests.rag.helpers import minimal_pdf

    monkeypatch.setattr(loaders, "MAX_PDF_PAGES", 0)
    with pytest.raises(LoaderError) as err:
        load_bytes("big.pdf", minimal_pdf("hello"))
    assert err.value.code == "file_too_large" and "pages" in err.value.message
