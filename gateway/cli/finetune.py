"""``ragline finetune`` (train, merge) and ``ragline adapters`` (register, list, remove)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.config import EmbeddedModelConfig, Settings
from gateway.config_file import ConfigError, load_file_config

finetune_app = typer.Typer(
    help="LoRA/QLoRA supervised fine-tuning (`ragline finetune --data ...`), and `merge`.",
    invoke_without_command=True,
)
adapters_app = typer.Typer(help="The adapter registry the gateway serves.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


@finetune_app.callback()
def finetune(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Chat or Alpaca JSONL.")] = None,
    output: Annotated[Path | None, typer.Option(help="Adapter directory to write.")] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base model directory (default: the pulled SmolLM2).")
    ] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank (vLLM's set).")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[
        str, typer.Option(help="Comma-separated, or `all-linear`.")
    ] = "all-linear",
    epochs: Annotated[float, typer.Option(help="Passes over the training set.")] = 3.0,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    schedule: Annotated[str, typer.Option(help="cosine | linear | constant.")] = "cosine",
    warmup_ratio: Annotated[float, typer.Option(help="Warm-up share of the steps.")] = 0.05,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 1024,
    truncate: Annotated[bool, typer.Option(help="Cut longer examples instead of failing.")] = False,
    packing: Annotated[bool, typer.Option(help="Pack short examples into full blocks.")] = False,
    eval_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share held out for eval loss (default: 0.1 from 100 distinct examples up; "
            "below that none, with a warning: each example may be a fact's only teacher)."
        ),
    ] = None,
    augment: Annotated[
        int,
        typer.Option(
            help="Add N reworded copies of each training question (framing, case, a dropped or "
            "swapped word): for data that states each fact in one phrasing."
        ),
    ] = 0,
    neftune: Annotated[
        float,
        typer.Option(help="NEFTune noise alpha on the input embeddings (0: off; 5 is usual)."),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: end only).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter.")] = False,
    qlora: Annotated[bool, typer.Option(help="4-bit base weights (CUDA + bitsandbytes).")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
) -> None:
    """Fine-tune a LoRA adapter on chat or Alpaca JSONL; writes a vLLM-ready adapter directory."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None or output is None:
        raise _fail("--data and --output are required (see ragline finetune --help)")
    from finetune.data import DataError
    from finetune.train import ALL_LINEAR, FinetuneError, TrainConfig, train

    modules = (
        ALL_LINEAR
        if target_modules == "all-linear"
        else tuple(m.strip() for m in target_modules.split(",") if m.strip())
    )
    if schedule not in ("cosine", "linear", "constant"):
        raise _fail("--schedule must be cosine, linear or constant")
    config = TrainConfig(
        base=(base or Settings().default_model_path()).expanduser(),
        data=data,
        output=output,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=modules,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        schedule=schedule,  # type: ignore[arg-type]
        warmup_ratio=warmup_ratio,
        max_length=max_length,
        truncate=truncate,
        packing=packing,
        eval_fraction=eval_fraction,
        augment=augment,
        neftune=neftune,
        seed=seed,
        save_every=save_every,
        resume=resume,
        overwrite=overwrite,
        qlora=qlora,
        device=device,
    )
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeRemainingColumn(),
        console=errors,
    )
    task = progress.add_task("train", total=None, loss=float("nan"), lr=0.0)

    def on_summary(summary: object) -> None:
        table = Table(title="dataset", show_header=False)
        for key, value in summary.as_dict().items():  # type: ignore[attr-defined]
            if key != "warnings":
                table.add_row(key, str(value))
        errors.print(table)
        for warning in summary.warnings:  # type: ignore[attr-defined]
            errors.print(f"[yellow]warning:[/] {warning}")
        progress.start()

    def on_step(step: int, total: int, loss: float, rate: float) -> None:
        progress.update(task, completed=step, total=total, loss=loss, lr=rate)

    try:
        result = train(config, progress=on_step, on_summary=on_summary)
    except (DataError, FinetuneError) as exc:
        raise _fail(str(exc)) from None
    finally:
        progress.stop()
    meta = json.loads((result.output / "ragline.json").read_text())
    table = Table(title=f"adapter written to {result.output}", show_header=False)
    for key, value in meta["metrics"].items():
        table.add_row(key, str(value))
    console.print(table)


@finetune_app.command("merge")
def merge_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory.")],
    output: Annotated[Path, typer.Option(help="Directory for the merged checkpoint.")],
    base: Annotated[
        Path | None, typer.Option(help="Base model (default: from ragline.json).")
    ] = None,
) -> None:
    """Write base + adapter as one full checkpoint (serve it like any model)."""
    from finetune.train import FinetuneError, merge

    try:
        merge(adapter, output, base)
    except FinetuneError as exc:
        raise _fail(str(exc)) from None
    console.print(f"merged checkpoint written to {output}")


def _base_path(base: str, config: Path | None, base_path: Path | None) -> Path:
    if base_path is not None:
        return base_path.expanduser()
    settings = Settings(config=config) if config else Settings()
    try:
        file_config = load_file_config(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    for model in file_config.models:
        if model.name != base:
            continue
        if isinstance(model, EmbeddedModelConfig):
            return (model.path or settings.default_model_path()).expanduser()
        if model.tokenizer is not None and (model.tokenizer / "config.json").exists():
            return model.tokenizer
        raise _fail(f"model {base!r} is served by vLLM: pass --base-path (its weights directory)")
    raise _fail(f"no model named {base!r} in the gateway's configuration")


@adapters_app.command("register")
def register(
    path: Annotated[Path, typer.Argument(help="Adapter directory (PEFT LoRA).")],
    name: Annotated[str, typer.Option(help="Public name clients send as `model`.")],
    base: Annotated[str, typer.Option(help="The gateway model it adapts.")] = "smollm2",
    base_path: Annotated[
        Path | None, typer.Option(help="Base weights to check against (default: from config).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Gateway YAML.")] = None,
    replace: Annotated[bool, typer.Option(help="Replace an adapter of the same name.")] = False,
    force: Annotated[bool, typer.Option(help="Skip the base checksum check.")] = False,
) -> None:
    """Check an adapter against its base model and record it; gateways serve it from start-up."""
    from finetune.adapters import AdapterError, AdapterRegistry

    settings = Settings(config=config) if config else Settings()
    try:
        record = AdapterRegistry(settings.adapters_file).register(
            name, path, base, _base_path(base, config, base_path), replace=replace, force=force
        )
    except AdapterError as exc:
        raise _fail(str(exc)) from None
    console.print(f"registered {name} (rank {record['rank']}) on {base}: {record['path']}")


@adapters_app.command("list")
def list_adapters(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The registered adapters: name, base model, path (the gateway serves them at start)."""
    from finetune.adapters import AdapterError, AdapterRegistry

    try:
        entries = AdapterRegistry(Settings().adapters_file).entries()
    except AdapterError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    table = Table(title="registered adapters")
    for column in ("name", "base", "rank", "path", "registered"):
        table.add_column(column)
    for name, e in sorted(entries.items()):
        table.add_row(name, e["base"], str(e["rank"]), e["path"], e.get("registered", ""))
    console.print(table)


@adapters_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Adapter name.")]) -> None:
    """Unregister an adapter (its files stay; gateways stop serving it at their next start)."""
    from finetune.adapters import AdapterError, AdapterRegistry

    try:
        AdapterRegistry(Settings().adapters_file).remove(name)
    except AdapterError as exc:
        raise _fail(str(exc)) from None
    console.print(f"removed {name} (its files are left in place)")
