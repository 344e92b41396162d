"""Every ``Settings`` field as a ``ragline serve`` flag, generated from the one definition: the
flag ``--max-request-bytes`` is the variable ``RAGLINE_MAX_REQUEST_BYTES``, with the same type,
choices, description and default, grouped into panels in ``--help``. A flag left out leaves the
environment's value (or the default) in place: pydantic-settings reads the environment, the
flags arrive as overrides, and one formatter reports a bad value of either."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Union

import typer

from gateway.config import Settings

# help panels, in order; a field not named here goes under "Other"
PANELS: dict[str, list[str]] = {
    "Listening": ["host", "port", "workers", "shutdown_grace", "send_timeout"],
    "Models and files": ["config", "vllm", "models_dir", "adapters_file", "prompts_dir"],
    "Keys, limits and shared state": [
        "admin_key", "keys_file", "redis_url", "redis_failure", "max_request_bytes", "max_n",
        "max_completion_tokens", "default_reserve_tokens", "cache_ttl", "cache_max_entry_bytes",
        "cache_max_entries",
    ],
    "Retrieval and uploads": [
        "rag_dir", "embedding_model", "embedding_document_precision", "parse_workers",
        "parse_timeout", "max_upload_bytes", "upload_bytes_per_day", "max_vector_stores",
    ],
    "Embeddings API": [
        "embedding_model_name", "embedding_token_ids", "max_embedding_inputs",
        "max_embedding_tokens", "embedding_concurrency",
    ],
    "Logging": ["log_level", "log_format", "log_prompts"],
}  # fmt: skip
SHORT = {"config": "-c"}
SECRET = {"admin_key"}


def env_names(name: str) -> list[str]:
    """The environment variables a field is read from."""
    alias = Settings.model_fields[name].validation_alias
    choices = getattr(alias, "choices", None)
    return [str(c) for c in choices] if choices else [f"RAGLINE_{name.upper()}"]


def _panel(name: str) -> str:
    return next((panel for panel, names in PANELS.items() if name in names), "Other")


def _flag_type(annotation: Any) -> Any:
    """The flag's type: the field's, without ``| None`` (a flag not given is None anyway)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _default(name: str) -> str:
    value = Settings.model_fields[name].default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size} {unit}"
    return str(value)


def with_settings_flags(func: Callable[..., None]) -> Callable[..., None]:
    """``func(**flags)`` given a signature typer reads: one ``--flag`` per ``Settings`` field,
    default None (not given), help ``description (env RAGLINE_X; default D)``."""
    parameters = []
    annotations: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        kind = _flag_type(field.annotation)
        dashed = name.replace("_", "-")
        decls = [f"--{dashed}/--no-{dashed}"] if kind is bool else [f"--{dashed}"]
        decls += [SHORT[name]] if name in SHORT else []
        description = (field.description or "").rstrip(".")
        if name in SECRET:
            description += " (a flag shows in the process list: prefer the variable)"
        envs = " or ".join(env_names(name))
        option = typer.Option(
            *decls,
            help=f"{description}. (env {envs}; default {_default(name)})",
            show_default=False,
            rich_help_panel=_panel(name),
        )
        annotations[name] = Annotated[kind | None, option]
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=annotations[name])
        )  # fmt: skip

    @functools.wraps(func)
    def command(**flags: Any) -> None:
        func(**flags)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {**annotations, "return": None}
    return command


def hide_flag_types() -> None:
    """typer 0.29 labels every flag (``--help``, ``--cache/--no-cache``) ``<bool>`` in help, as
    though it took a value; a flag's type column is left empty instead. Presentation only, and
    skipped when typer changes the method."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_ragline", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._ragline = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
