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

safety_app = typer.Typer(
    help="Safety filters: train the injection classifier.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)


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
        Path | None, typer.Option(help="Weights file (default: the one shipped in the package).")
    ] = None,
) -> None:
    """Fit the injection classifier on all of DATA and the benign sets and write its weights
    (.npz, no pickle)."""
    from safety.scanners.injection import MODEL_PATH
    from safety.train import fit, save, training_set

    texts, labels, sets = _load(data, benign)
    embedder = Settings().embedder()
    started = time.perf_counter()
    vectors = _embed(embedder, texts)
    extra = [(b, _embed(embedder, b.texts)) for b in sets]
    weights = fit(*training_set(texts, labels, vectors, extra))
    target = out or MODEL_PATH
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
    # latency of the shipped layer and the whole default input policy, one text at a time
    policy = build_policy(default_policy(), {"embedder": embedder})
    injection = next(s for spec, s in policy.scanners if spec.type == "injection")
    timings: dict[str, list[float]] = {"injection layer": [], "default input policy": []}
    for text in texts:
        embedder.clear_cache()
        started = time.perf_counter()
        injection.scan(text, ScanContext())
        timings["injection layer"].append((time.perf_counter() - started) * 1000)
        embedder.clear_cache()
        started = time.perf_counter()
        policy.run(text, ScanContext())
        timings["default input policy"].append((time.perf_counter() - started) * 1000)
    table = Table(
        "layer", "precision", "recall", "F1", "FPR", title=f"{data.name}: {folds}-fold CV"
    )
    for layer in layers:
        if " on benign " in layer.name:  # no attacks in it: only the false-positive rate
            table.add_row(escape(layer.name), "-", "-", "-", f"{layer.fpr:.3f}")
            continue
        table.add_row(escape(layer.name), f"{layer.precision:.3f}", f"{layer.recall:.3f}",
                      f"{layer.f1:.3f}", f"{layer.fpr:.3f}")  # fmt: skip
    console.print(table)
    latency = {}
    for name, values in timings.items():
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        latency[name] = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
        console.print(f"{name}: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms per text")
    if output is not None:
        output.write_text(json.dumps({"layers": [vars(x) for x in layers], "latency": latency}))
