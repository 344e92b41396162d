"""The ``ragline`` command line.

``serve``, ``keys``, ``models`` and ``version`` are loaded with it; every other command group
(benchmarks, evaluations, fine-tuning, ingestion, safety training) lives in its own module that
is imported only when that command runs, so ``ragline serve`` imports no benchmark, evaluation
or training code.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from gateway.cli.flags import hide_flag_types, with_settings_flags
from gateway.cli.serve import SERVE_HELP, keys_app, models_app, serve, version

# command -> (module, attribute): a typer app, imported when the command is used
LAZY = {
    "adapters": ("gateway.cli.finetune", "adapters_app"),
    "bench": ("benchmarks.cli", "app"),
    "eval": ("gateway.cli.evals", "app"),
    "finetune": ("gateway.cli.finetune", "finetune_app"),
    "ingest": ("gateway.cli.rag", "ingest_app"),
    "safety": ("gateway.cli.safety", "safety_app"),
    "search": ("gateway.cli.rag", "search_app"),
    "stores": ("gateway.cli.rag", "stores_app"),
}


class LazyGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in LAZY:
            return super().get_command(ctx, cmd_name)
        module, attribute = LAZY[cmd_name]
        target: Any = getattr(importlib.import_module(module), attribute)
        command = typer.main.get_command(target)
        command.name = cmd_name
        return command


hide_flag_types()
app = typer.Typer(
    cls=LazyGroup,
    help="ragline: an OpenAI-compatible LLM serving and RAG gateway.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("serve", help=SERVE_HELP)(with_settings_flags(serve))  # a flag per setting
app.command()(version)


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """ragline: an OpenAI-compatible LLM serving and RAG gateway."""


app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")


def main() -> None:
    """The ``ragline`` entry point: configuration errors from any command are printed by one
    formatter (file:line, path, what was expected; secrets never echoed), exit status 2."""
    from pydantic import ValidationError

    from gateway.cli.serve import console
    from gateway.config import Settings
    from gateway.config_errors import format_error
    from gateway.config_file import ConfigError

    try:
        app()
    except ConfigError as exc:
        message = str(exc)
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        heading = "invalid settings (environment variables or flags)"
        message = format_error(exc, Settings, heading=heading, env_prefix="RAGLINE_")
    else:
        return
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise SystemExit(2)
