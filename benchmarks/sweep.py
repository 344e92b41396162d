"""``ragline bench run``'s machinery: prompts, the sweep over concurrencies or rates, the table,
the reports, and the goals chosen for the target."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks.loadgen import (
    LoadSpec,
    Prompt,
    RequestFailed,
    jsonl_prompts,
    random_prompts,
    run,
    scifact_questions,
)
from benchmarks.metrics import GOALS, SLO, RequestRecord, summarize
from benchmarks.report import point_name, verdict, write_html, write_json

console = Console(width=140)  # tables stay readable when piped to a file or CI log

SHARED_SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def _floats(text: str | None) -> list[float]:
    return [float(x) for x in text.split(",")] if text else []


def load_prompts(
    dataset: str,
    n: int,
    input_len: int,
    output_len: int,
    model_dir: Path | None,
) -> list[Prompt]:
    """``random``, ``jsonl:PATH`` or ``scifact[:DIR]``."""
    if dataset == "random":
        tokenizer = None
        if model_dir is not None and (model_dir / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return random_prompts(max(n, 1), input_len, output_len, tokenizer=tokenizer)
    if dataset.startswith("jsonl:"):
        return jsonl_prompts(Path(dataset[6:]), output_len)
    if dataset.startswith("scifact"):
        directory = Path(dataset[8:]) if dataset.startswith("scifact:") else SHARED_SCIFACT
        return scifact_questions(directory, max(n, 1), output_len)
    raise typer.BadParameter(f"unknown dataset {dataset!r}: random, jsonl:PATH or scifact[:DIR]")


def _default_model_dir() -> Path | None:
    from gateway.config import Settings

    path = Settings().default_model_path()
    return path if path.exists() else None


def _print_runs(title: str, runs: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for col in (
        "point",
        "ok/failed",
        "req/s",
        "out tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50 ms",
        "tok/s/stream",
        "ITL p50 ms",
        "goodput",
        "goals",
    ):
        table.add_column(col, justify="right")
    for r in runs:
        per_stream = r.get("median_output_tokens_per_s_per_stream")
        table.add_row(
            point_name(r),
            f"{r['completed']}/{r['failed']}",
            f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}",
            f"{r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f}",
            f"{r['median_tpot_ms']:.1f}",
            f"{per_stream:.1f}" if per_stream is not None else "-",
            f"{r['median_itl_ms']:.1f}",
            f"{r['request_goodput']:.2f}",
            "PASS" if r["verdict"]["pass"] else "FAIL",
        )
    console.print(table)
    for r in runs:
        if not r["verdict"]["pass"]:
            console.print(f"[red]FAIL[/] {point_name(r)}: {'; '.join(r['verdict']['reasons'])}")


async def sweep(
    spec: LoadSpec,
    prompts: list[Prompt],
    concurrencies: list[int],
    rates: list[float],
    slo: SLO,
    keep_going: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, list[RequestRecord]]]:
    runs, records = [], {}
    points: list[tuple[str, float, LoadSpec]] = (
        [("rate", r, replace(spec, rate=r, concurrency=None)) for r in rates]
        if rates
        else [("concurrency", c, replace(spec, concurrency=c, rate=None)) for c in concurrencies]
    )
    for name, x, point in points:
        recs, duration = await run(point, prompts, label=f"{name}={x:g}", keep_going=keep_going)
        summary = summarize(recs, duration, slo)
        summary |= {"x": x, "x_name": name, "verdict": verdict(summary, slo)}
        runs.append(summary)
        records[f"{name}={x:g}"] = recs
    return runs, records


def execute(
    spec: LoadSpec,
    prompts: list[Prompt],
    concurrencies: list[int],
    rates: list[float],
    slo: SLO,
    out: Path,
    title: str,
    settings: dict[str, Any],
    keep_going: bool = False,
) -> tuple[bool, int]:
    """Run the sweep, print and write the reports; (every goal met, failed requests). Without
    ``keep_going`` the first failed request stops it: exit 1 with the server's answer."""
    try:
        runs, records = asyncio.run(sweep(spec, prompts, concurrencies, rates, slo, keep_going))
    except RequestFailed as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        console.print("(the run stopped at the first failed request; --keep-going runs on)")
        raise typer.Exit(1) from None
    _print_runs(title, runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", runs, settings)
    write_html(out / "report.html", title, runs, records, settings)
    console.print(f"wrote {out / 'results.json'} and {out / 'report.html'}")
    failed = sum(r["failed"] for r in runs)
    return all(r["verdict"]["pass"] for r in runs), failed


def choose_goals(goals: str, url: str, api_key: str | None) -> tuple[str, str]:
    """``(gpu|cpu, why)``: as asked, or (``auto``) by the device the server's ``/ready`` names."""
    if goals in GOALS:
        return goals, "--goals"
    if goals != "auto":
        raise typer.BadParameter("use auto, gpu or cpu", param_hint="--goals")
    import httpx

    root = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(root + "/ready", headers=headers, timeout=5).json().get("models", {})
    except (httpx.HTTPError, ValueError, AttributeError):
        return "gpu", "the server does not report its device; --goals cpu for a CPU server"
    devices = {m.get("device") for m in models.values() if isinstance(m, dict)}
    if "cpu" in devices:
        return "cpu", "the server reports its model on CPU"
    return "gpu", "the server does not report a CPU model"
