"""Configuration: one pydantic-settings ``Settings`` (env prefix ``RAGLINE_``) plus a YAML file.

The environment holds process settings (where to listen, where models live, limits); the YAML
file (``ragline serve --config FILE`` or ``RAGLINE_CONFIG``) declares the models the gateway
serves. Without a file the gateway serves one model, ``smollm2``, on the embedded engine.
Config is read once at start-up, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


class EmbeddedModelConfig(BaseModel):
    """A model served in-process by the embedded engine (transformers weights, our scheduler)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Public model id clients send as `model`.")
    backend: Literal["embedded"] = "embedded"
    path: Path | None = Field(
        default=None, description="Checkpoint directory; default: the pulled SmolLM2 checkpoint."
    )
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_batch: int = Field(default=16, ge=1, le=256, description="Sequences decoded together.")
    max_waiting: int = Field(
        default=64, ge=0, description="Requests queued beyond the batch before 503 Retry-After."
    )
    max_model_len: int = Field(default=2048, ge=16, description="Prompt + completion tokens.")
    owned_by: str = "ragline"


ModelConfig = EmbeddedModelConfig


class FileConfig(BaseModel):
    """The YAML file's schema."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models


class Settings(BaseSettings):
    """Process settings; every field can be set as ``RAGLINE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="RAGLINE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    config: Path | None = Field(default=None, description="YAML file declaring models.")
    models_dir: Path = Field(
        default=Path("~/.cache/ragline/models"), description="Where `ragline models pull` writes."
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_n: int = Field(default=8, ge=1, description="Largest `n` (choices per request).")
    log_level: str = "info"

    @field_validator("models_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    def default_model_path(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_DIRNAME


class ConfigError(Exception):
    """The YAML file is missing, unreadable or invalid; the message names the file."""


def load_file_config(settings: Settings) -> FileConfig:
    """Read ``settings.config`` (or the built-in default) into a validated ``FileConfig``."""
    if settings.config is None:
        return FileConfig(models=[EmbeddedModelConfig(name=DEFAULT_MODEL_NAME)])
    path = settings.config.expanduser()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    try:
        config = FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config file {path} is invalid:\n{exc}") from exc
    if not config.models:
        raise ConfigError(f"config file {path} declares no models")
    return config
