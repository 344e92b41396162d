"""Reading the YAML config file (or the built-in default) into a validated ``FileConfig``, with
the adapters ``ragline adapters register`` recorded added to it."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import (
    DEFAULT_MODEL_NAME,
    AdapterConfig,
    EmbeddedModelConfig,
    FileConfig,
    KeyConfig,
    Settings,
    VllmModelConfig,
)
from gateway.config_errors import format_error, format_problems

log = logging.getLogger("ragline.config")


class ConfigError(Exception):
    """The YAML file is missing, unreadable or invalid; the message names the file."""


def load_settings(**overrides: object) -> Settings:
    """``Settings`` from the environment and the given (flag) values; unset (None) values are
    left to the environment. Invalid values raise ``ConfigError`` naming the variable."""
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        heading = "invalid settings (environment variables or flags)"
        raise ConfigError(
            format_error(exc, Settings, heading=heading, env_prefix="RAGLINE_")
        ) from None


def load_file_config(settings: Settings) -> FileConfig:
    """Read ``settings.config`` (or the built-in default) into a validated ``FileConfig``."""
    config = _load_file_config(settings)
    if settings.keys_file is not None:
        _add_keys_file(config, settings.keys_file.expanduser())
    if settings.prompts_dir is not None:
        config.prompts.dir = settings.prompts_dir.expanduser()
    _add_registered_adapters(config, settings.adapters_file)
    return config


class _KeysFile(BaseModel):
    """The keys file's schema: the config file's ``keys`` alone."""

    model_config = ConfigDict(extra="forbid")

    keys: list[KeyConfig] = Field(default_factory=list)


def _add_keys_file(config: FileConfig, path: Path) -> None:
    """Add the keys of ``RAGLINE_KEYS_FILE`` (a Secret in Kubernetes) to the config file's."""
    text, raw = _read_yaml(path, "keys file")
    try:
        extra = _KeysFile.model_validate(raw).keys
    except ValidationError as exc:
        heading = f"keys file {path} is invalid"
        raise ConfigError(
            format_error(exc, _KeysFile, heading=heading, source=str(path), text=text)
        ) from None
    merged = config.keys + extra
    for attr in ("id", "sha256"):
        values = [getattr(k, attr) for k in merged]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            where = "ids" if attr == "id" else "hashes"
            raise ConfigError(
                f"keys file {path}: key {where} repeat the config file's or each other: "
                + ", ".join(repeated if attr == "id" else [r[:12] + "…" for r in repeated])
            )
    known = config.safety.names()
    for key in extra:
        if key.policy.safety_policy not in known:
            raise ConfigError(
                f"keys file {path}: keys[{key.id}]: safety policy "
                f"{key.policy.safety_policy!r} is not declared under safety in the config file"
            )
    config.keys = merged


def _read_yaml(path: Path, what: str) -> tuple[str, object]:
    """The text of a YAML file and what it holds; a ConfigError naming ``what`` and ``path``."""
    try:
        text = path.read_text()
        return text, yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc


def _add_registered_adapters(config: FileConfig, registry: Path) -> None:
    """Serve the adapters ``ragline adapters register`` recorded (the file's own win on names)."""
    from finetune.adapters import AdapterError, AdapterRegistry

    try:
        entries = AdapterRegistry(registry).entries()
    except AdapterError as exc:
        raise ConfigError(str(exc)) from None
    models = {m.name for m in config.models}
    taken = models | {a.name for a in config.adapters}
    for name, entry in sorted(entries.items()):
        if name in taken:
            log.warning("registered adapter %r is shadowed by the config file; not served", name)
        elif entry.get("base") not in models:
            log.warning(
                "registered adapter %r is for model %r, which this gateway does not serve",
                name,
                entry.get("base"),
            )
        else:
            config.adapters.append(AdapterConfig(name=name, path=entry["path"], base=entry["base"]))


def _load_file_config(settings: Settings) -> FileConfig:
    if settings.config is None:
        if settings.vllm:
            urls = [u.strip() for u in settings.vllm.split(",") if u.strip()]
            try:
                model = VllmModelConfig(name=DEFAULT_MODEL_NAME, backend="vllm", upstreams=urls)
            except ValidationError as exc:
                problems = format_problems(exc, VllmModelConfig)
                raise ConfigError(
                    f"--vllm {settings.vllm!r} is invalid: {'; '.join(problems)}"
                ) from None
            return FileConfig(models=[model])
        return FileConfig(models=[EmbeddedModelConfig(name=DEFAULT_MODEL_NAME)])
    path = settings.config.expanduser()
    text, raw = _read_yaml(path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping (models:, routes:, ...)")
    try:
        config = FileConfig.model_validate(raw)
    except ValidationError as exc:
        message = format_error(
            exc, FileConfig, heading=f"config file {path} is invalid", source=str(path), text=text
        )
        raise ConfigError(message) from None
    if not config.models:
        raise ConfigError(f"config file {path} declares no models")
    if config.prompts.dir is not None and not config.prompts.dir.expanduser().is_absolute():
        config.prompts.dir = path.parent / config.prompts.dir
    for declared in config.models:
        tok = declared.tokenizer if isinstance(declared, VllmModelConfig) else None
        if tok is not None and not tok.expanduser().is_absolute():
            declared.tokenizer = path.parent / tok  # type: ignore[union-attr]
    return config
