"""One source for defaults (issue 23, item 5 and the "what is served is what was measured" rule):
the library, the routes, the vector-store API, the CLI and the benchmarks agree, because each
reads the library's constant; this fails if one of them grows its own value again."""

from __future__ import annotations

import inspect

from benchmarks import rag_bench
from gateway.cli import rag as rag_cli
from gateway.config import RagConfig
from gateway.routes import vector_stores
from rag import HYBRID_WEIGHTS, RELEVANCE_FLOOR
from rag.chunking import ChunkingConfig
from rag.eval import standard_modes
from rag.retriever import SearchOptions


def _cli_default(command: object, name: str) -> object:
    return inspect.signature(command).parameters[name].default  # type: ignore[arg-type]


def test_hybrid_weights_are_the_measured_ones_everywhere() -> None:
    assert SearchOptions().weights == HYBRID_WEIGHTS  # library, `ragline search`
    assert RagConfig(store="s").weights == HYBRID_WEIGHTS  # routes
    assert vector_stores.SearchBody.model_fields["weights"].default == HYBRID_WEIGHTS  # the API
    hybrid = dict(standard_modes())["hybrid"]  # what `ragline bench retrieval` measures
    assert (hybrid.mode, hybrid.fusion, hybrid.weights) == ("hybrid", "zscore", HYBRID_WEIGHTS)
    # the bench evaluates exactly these modes and sets no weights of its own
    source = inspect.getsource(rag_bench)
    assert "standard_modes()" in source and "weights" not in source


def test_relevance_floor_and_chunking_have_one_source() -> None:
    assert RagConfig(store="s").min_similarity == RELEVANCE_FLOOR
    chunking = ChunkingConfig()
    assert _cli_default(rag_cli.ingest, "chunk_size") == chunking.max_chunk_size_tokens
    assert _cli_default(rag_cli.ingest, "chunk_overlap") == chunking.chunk_overlap_tokens
