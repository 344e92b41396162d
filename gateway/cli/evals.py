"""``ragline eval ...``: offline evaluations (prompt variants today)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.cli.rag import eval_retrieval
from gateway.cli.safety import eval_safety
from gateway.config import EmbeddedModelConfig, Settings
from gateway.config_file import ConfigError, load_file_config
from prompts.template import PromptError

app = typer.Typer(help="Evaluate prompts, retrieval and safety.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@app.command("prompts")
def eval_prompts(
    data: Annotated[Path, typer.Option(help="JSONL: input/variables, expected, scorer.")],
    variants: Annotated[
        str, typer.Option(help="Templates to compare: `a,b` or `short=qa@2,long=qa@1`.")
    ],
    templates: Annotated[
        Path | None, typer.Option(help="Template directory (default: the config's prompts.dir).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Gateway YAML (models, prompts).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model to ask (default: the first configured model).")
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(help="Ask an OpenAI-compatible server (…/v1) instead of an in-process model."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=["RAGLINE_API_KEY", "OPENAI_API_KEY"],
            help="Bearer key (env RAGLINE_API_KEY or OPENAI_API_KEY).",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="With --base-url: the served model's tokenizer (default: SmolLM2)."),
    ] = None,
    max_model_len: Annotated[int, typer.Option(help="With --base-url: context length.")] = 2048,
    max_tokens: Annotated[int, typer.Option(help="Completion tokens per answer.")] = 32,
    scorer: Annotated[str, typer.Option(help="Default scorer: exact|contains|regex|json.")] = (
        "contains"
    ),
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items.")] = None,
    output: Annotated[
        Path | None, typer.Option("--json", help="Also write the results (and misses) here.")
    ] = None,
) -> None:
    """Run each template variant over a labelled set; print accuracy, tokens and latency."""
    if scorer not in ("exact", "contains", "regex", "json"):
        raise typer.BadParameter("use exact, contains, regex or json", param_hint="--scorer")
    try:
        settings = Settings(config=config) if config else Settings()
        file_config = load_file_config(settings)
        directory = templates or file_config.prompts.dir
        if directory is None:
            raise PromptError("no template directory: pass --templates or set prompts.dir")
        summaries = asyncio.run(
            _run(
                settings,
                file_config,
                directory,
                data,
                variants,
                model,
                base_url,
                api_key,
                tokenizer,
                max_model_len,
                max_tokens,
                scorer,
                concurrency,
                limit,
            )
        )
    except (ConfigError, PromptError) as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table(title=f"ragline eval prompts: {data.name}")
    columns: tuple[str, ...] = ("variant", "template", "items", "accuracy")
    columns += ("mean_prompt_tokens", "mean_completion_tokens", "latency_p50_ms", "latency_p95_ms")
    headers = ("variant", "template", "items", "accuracy", "prompt tok", "compl tok", "p50 ms")
    for header in (*headers, "p95 ms"):
        table.add_column(header, justify="left" if header in headers[:2] else "right")
    base = summaries[0][0]
    for summary, _ in summaries:
        row = [str(summary[c]) for c in columns]
        ratio = summary["mean_prompt_tokens"] / base["mean_prompt_tokens"]
        row[4] += f" ({ratio - 1:+.0%})" if summary is not base else ""
        table.add_row(*row)
    console.print(table)
    if output is not None:
        output.write_text(
            json.dumps([{**s, "misses": m} for s, m in summaries], indent=2, ensure_ascii=False)
        )


async def _run(
    settings: Settings,
    file_config: Any,
    directory: Path,
    data: Path,
    variants: str,
    model: str | None,
    base_url: str | None,
    api_key: str | None,
    tokenizer: Path | None,
    max_model_len: int,
    max_tokens: int,
    scorer: str,
    concurrency: int,
    limit: int | None,
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    from gateway.backends.embedded import EmbeddedBackend
    from prompts.budget import ChatFormat
    from prompts.eval import http_runner, load_items, parse_variants, run_eval
    from prompts.fewshot import FewShotSelector
    from prompts.registry import PromptRegistry
    from rag.embeddings import SentenceTransformerEmbedder

    registry = PromptRegistry.load(directory)
    pairs = parse_variants(variants)
    for _, ref in pairs:
        registry.resolve(ref)
    items = load_items(data)[:limit]
    backend: EmbeddedBackend | None = None
    if base_url is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer or settings.default_model_path()))
        chat = ChatFormat(tok, max_model_len)
        complete = http_runner(base_url, model or "smollm2", api_key)
    else:
        declared = [m for m in file_config.models if model in (None, m.name)]
        if not declared or not isinstance(declared[0], EmbeddedModelConfig):
            raise PromptError(
                "in-process evaluation runs an embedded model; for a vLLM model pass --base-url"
            )
        spec = declared[0]
        path = spec.path.expanduser() if spec.path else settings.default_model_path()
        backend = EmbeddedBackend(spec, path)
        await backend.start()
        tok, max_len = backend.chat_tokenizer()
        chat = ChatFormat(tok, max_len)
        complete = backend_runner(backend)
    try:
        results = await run_eval(
            registry,
            pairs,
            items,
            complete,
            chat,
            selector=FewShotSelector(SentenceTransformerEmbedder()),
            max_tokens=max_tokens,
            default_scorer=scorer,  # type: ignore[arg-type]
            concurrency=concurrency,
        )
    finally:
        if backend is not None:
            await backend.aclose()
    return [(r.summary(), r.misses) for r in results]


app.command("retrieval")(eval_retrieval)
app.command("safety")(eval_safety)


def backend_runner(backend: Any) -> Any:
    """A backend in this process (the embedded engine) as the evaluation's ``Complete``."""
    from gateway.backends.base import GenerationParams, GenerationRequest
    from prompts.eval import Answer

    async def complete(messages: list[dict[str, str]], max_tokens: int) -> Answer:
        started = time.perf_counter()
        generation = await backend.generate(
            GenerationRequest(
                request_id="eval",
                model="eval",
                params=GenerationParams(max_tokens=max_tokens, temperature=0.0),
                messages=tuple(messages),
            )
        )
        return Answer(
            generation.choices[0].text,
            generation.usage.prompt_tokens,
            generation.usage.completion_tokens,
            time.perf_counter() - started,
        )

    return complete
