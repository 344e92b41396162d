"""``ragline safety train`` and ``ragline eval safety``: the injection classifier, offline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.config import Settings

safety_app = typer.Typer(no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@safety_app.callback()
def safety() -> None:
    """Safety filters: train the injection classifier."""


BenignOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--benign",
        help="Benign set: prompts (.txt, one per line) or a BEIR corpus (.jsonl, one document "
        "in ten). Repeatable. Default: the everyday prompts shipped in the package.",
    ),
]


def _load(data: Path, benign: list[Path] | None) -> tuple[list[str], np.ndarray, list[Any]]:
    from safety.train import EVERYDAY_PROMPTS, load_benign, load_csv

    try:
        texts, labels = load_csv(data)
        sets = [load_benign(path) for path in (benign or [EVERYDAY_PROMPTS])]
    except (OSError, ValueError) as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    return texts, labels, sets


def _embed(embedder: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(embedder.embed(texts), dtype=np.float64)


@safety_app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="CSV with text,label (1 = injection).")],
    benign: BenignOption = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Weights file to write; serve it with a policy's injection scanner option "
            "`model_path`. The packaged classifier is replaced only when named here."
        ),
    ] = Path("injection.npz"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Fit the injection classifier on all of DATA and the benign sets and write its weights
    (.npz, no pickle)."""
    if out.exists() and not force:
        errors.print(f"[red]error:[/] {escape(str(out))} exists; --force overwrites it")
        raise typer.Exit(2)
    from safety.train import fit, save, training_set

    texts, labels, sets = _load(data, benign)
    embedder = Settings().embedder()
    started = time.perf_counter()
    vectors = _embed(embedder, texts)
    extra = [(b, _embed(embedder, b.texts)) for b in sets]
    weights = fit(*training_set(texts, labels, vectors, extra))
    target = out
    save(weights, target)
    benign_count = sum(len(b.texts) for b in sets)
    console.print(
        f"trained on {len(texts)} examples ({int(labels.sum())} injections) and "
        f"{benign_count} benign texts in "
        f"{time.perf_counter() - started:.1f}s -> {target} ({target.stat().st_size / 1024:.0f} KiB)"
    )


def eval_safety(
    data: Annotated[Path, typer.Option(help="CSV with text,label (1 = injection).")],
    benign: BenignOption = None,
    folds: Annotated[int, typer.Option(min=2, help="k for stratified k-fold CV.")] = 5,
    output: Annotated[Path | None, typer.Option("--json", help="Also write results here.")] = None,
) -> None:
    """Precision, recall, F1 and false-positive rate per layer (k-fold CV), and latency."""
    from safety.base import ScanContext
    from safety.policy import build_policy, default_policy
    from safety.train import cross_validate

    texts, labels, sets = _load(data, benign)
    embedder = Settings().embedder()
    vectors = _embed(embedder, texts)
    extra = [(b, _embed(embedder, b.texts)) for b in sets]
    layers = cross_validate(texts, labels, vectors, extra, folds=folds)
    # latency of each layer, the shipped scanner and the whole default input policy, one text
    # at a time, nothing cached (each text is embedded by whatever needs the embedding)
    from safety.scanners.heuristics import heuristic_hits
    from safety.scanners.unicode import normalise

    policy = build_policy(default_policy(), {"embedder": embedder})
    injection = next(s for spec, s in policy.scanners if spec.type == "injection")
    model = injection.model  # type: ignore[attr-defined]

    def classifier(text: str) -> None:
        model.probability([text], embedder.embed_one(text).reshape(1, -1))

    steps: dict[str, tuple[str | None, Any]] = {
        "phrase list": ("phrase list (baseline)", lambda t: heuristic_hits(normalise(t))),
        "char gate": ("char n-grams + LR", lambda t: model.gate([t])),
        "classifier (embedding included)": ("char n-grams + MiniLM + LR", classifier),
        "injection layer as shipped": (
            "shipped: phrases, char gate, classifier",
            lambda t: injection.scan(t, ScanContext()),
        ),
        "default input policy": (None, lambda t: policy.run(t, ScanContext())),
    }
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for text in texts:
        for name, (_, step) in steps.items():
            embedder.clear_cache()
            started = time.perf_counter()
            step(text)
            timings[name].append((time.perf_counter() - started) * 1000)
    latency = {}
    for name, values in timings.items():
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        latency[name] = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
        for layer in layers:
            if layer.name == steps[name][0]:
                layer.latency_ms = latency[name]
    table = Table(
        "layer", "precision", "recall", "F1", "FPR", "p50 ms", "p99 ms",
        title=f"{data.name}: {folds}-fold CV; latency per text",
    )  # fmt: skip
    for layer in layers:
        p50 = f"{layer.latency_ms['p50']:.2f}" if layer.latency_ms else "-"
        p99 = f"{layer.latency_ms['p99']:.2f}" if layer.latency_ms else "-"
        if " on benign " in layer.name:  # no attacks in it: only the false-positive rate
            table.add_row(escape(layer.name), "-", "-", "-", f"{layer.fpr:.3f}", "-", "-")
            continue
        table.add_row(escape(layer.name), f"{layer.precision:.3f}", f"{layer.recall:.3f}",
                      f"{layer.f1:.3f}", f"{layer.fpr:.3f}", p50, p99)  # fmt: skip
    console.print(table)
    for name, stats in latency.items():
        console.print(
            f"{name}: p50 {stats['p50']:.2f} ms, p95 {stats['p95']:.2f} ms, "
            f"p99 {stats['p99']:.2f} ms per text"
        )
    if output is not None:
        output.write_text(json.dumps({"layers": [vars(x) for x in layers], "latency": latency}))
