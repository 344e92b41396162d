"""A store's serving version is loaded in a worker thread, never on the event loop: loading
reads its index and every chunk, which for a large store takes long enough to stall every
request. Whichever way a request reaches the store (by id, by name, from a route, a listing),
the load happens on another thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import rag.store
from gateway.auth import Principal
from gateway.config import RagConfig, Settings
from gateway.metrics import Metrics
from gateway.retrieval import RagService
from rag.embeddings import SentenceTransformerEmbedder
from rag.loaders import Document
from rag.store import VectorStore


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def test_serving_versions_load_off_the_event_loop(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder.embed(["probe"])
    root = tmp_path / "stores"
    made = VectorStore.create(root, "handbook", dim=embedder.dim, embedder_name=embedder.name)
    made.upsert([Document("leave", "Staff get 30 days of paid leave.")], embedder)
    loads: list[str] = []
    real = rag.store.load_version

    def recording(path: Path) -> Any:
        loads.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(rag.store, "load_version", recording)
    principal = Principal("ops", admin=True)

    async def main() -> None:
        loop_thread = threading.current_thread().name
        for reach in ("id", "name", "route"):
            service = RagService(Settings(rag_dir=tmp_path), embedder, Metrics())  # cold
            if reach == "route":
                found = await service.retrieve(
                    principal, RagConfig(store="handbook"), "how many days of leave?"
                )
                assert found.citations  # the route's search read the version it loaded
            else:
                store = await service.open("vs_handbook" if reach == "id" else "handbook")
                assert store.snapshot.documents.keys() == {"leave"}
            assert len(loads) == 1 and loads[0] != loop_thread, (reach, loads)
            loads.clear()

    asyncio.run(main())
