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
HardOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--hard-benign",
        help="Hard benign prompts (.txt; `# category:` lines): everyday requests that look like "
        "attacks, weighted apart and reported per category. Repeatable. Default: the ones "
        "shipped in the package (safety/data/hard_benign.txt).",
    ),
]


def _load(data: Path, benign: list[Path] | None, hard: list[Path] | None) -> Any:
    from safety.train import EVERYDAY_PROMPTS, HARD_BENIGN, load_benign, load_csv, word_lists

    try:
        texts, labels = load_csv(data)
        sets = [load_benign(path) for path in (benign or [EVERYDAY_PROMPTS])]
        sets += [load_benign(path, hard=True) for path in (hard or [HARD_BENIGN])]
        sets.append(word_lists(sets))
    except (OSError, ValueError) as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    return texts, labels, sets


def _data(texts: list[str], labels: np.ndarray, sets: list[Any], embedder: Any) -> Any:
    from safety.train import Data

    def embed(items: list[str]) -> np.ndarray:
        return np.asarray(embedder.embed(items), dtype=np.float64)

    return Data(texts, labels, embed(texts), [(b, embed(b.texts)) for b in sets])


@safety_app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="CSV with text,label (1 = injection).")],
    benign: BenignOption = None,
    hard_benign: HardOption = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Weights file to write; serve it with a policy's injection scanner option "
            "`model_path`. The packaged classifier is replaced only when named here."
        ),
    ] = Path("injection.npz"),
    holdout: Annotated[
        bool,
        typer.Option(
            "--holdout/--all",
            help="Fit on the train part of every set (the test parts, which `ragline eval "
            "safety` reports, stay unseen: the shipped weights are fitted so) or on all of it.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Fit the injection classifier on DATA and the benign sets and write its weights (.npz, no
    pickle)."""
    if out.exists() and not force:
        errors.print(f"[red]error:[/] {escape(str(out))} exists; --force overwrites it")
        raise typer.Exit(2)
    from safety.train import fit, save

    texts, labels, sets = _load(data, benign, hard_benign)
    started = time.perf_counter()
    everything = _data(texts, labels, sets, Settings().embedder())
    used = everything.holdout()[0] if holdout else everything
    save(fit(*used.training_set()), out)
    benign_count = sum(len(b.texts) for b, _ in used.benign)
    console.print(
        f"trained on {len(used.texts)} examples ({int(used.labels.sum())} injections) and "
        f"{benign_count} benign texts ({'train parts' if holdout else 'all'}) in "
        f"{time.perf_counter() - started:.1f}s -> {out} ({out.stat().st_size / 1024:.0f} KiB)"
    )


def _table(title: str, layers: list[Any]) -> Table:
    table = Table("layer", "precision", "recall", "F1", "FPR", "p50 ms", "p99 ms", title=title)
    for layer in layers:
        if " on benign " in layer.name:  # no attacks in it: only the false-positive rate
            table.add_row(escape(layer.name), "-", "-", "-", f"{layer.fpr:.3f}", "-", "-")
            continue
        p50 = f"{layer.latency_ms['p50']:.2f}" if layer.latency_ms else "-"
        p99 = f"{layer.latency_ms['p99']:.2f}" if layer.latency_ms else "-"
        f1 = f"{layer.f1:.3f}"
        if layer.f1_folds:
            f1 += f" ± {np.std(layer.f1_folds):.3f}"
        table.add_row(escape(layer.name), f"{layer.precision:.3f}", f"{layer.recall:.3f}", f1,
                      f"{layer.fpr:.3f}", p50, p99)  # fmt: skip
    return table


def eval_safety(
    data: Annotated[Path, typer.Option(help="CSV with text,label (1 = injection).")],
    benign: BenignOption = None,
    hard_benign: HardOption = None,
    folds: Annotated[int, typer.Option(min=2, help="k for stratified k-fold CV.")] = 5,
    search: Annotated[
        bool,
        typer.Option(
            "--search",
            help="Choose the hard prompts' weight, the threshold and the gate by CV on the "
            "train parts (the grid in safety/train.py) and report with that choice.",
        ),
    ] = False,
    output: Annotated[Path | None, typer.Option("--json", help="Also write results here.")] = None,
) -> None:
    """Each layer's precision, recall, F1 and false-positive rate by k-fold CV on the train
    parts and once on the held-out test parts (safety/splits.py), hard-benign false positives
    per category, and latency."""
    from safety.base import ScanContext
    from safety.policy import build_policy, default_policy
    from safety.train import GATE, THRESHOLD, WEIGHTS, layers, out_of_fold, predict
    from safety.train import search as grid_search

    texts, labels, sets = _load(data, benign, hard_benign)
    embedder = Settings().embedder()
    train_part, test_part = _data(texts, labels, sets, embedder).holdout()
    weight, threshold, gate = WEIGHTS["hard"], THRESHOLD, GATE
    trials: list[Any] = []
    try:
        if search:
            trials, best = grid_search(train_part, folds)
            weight, threshold, gate = best.hard_weight, best.threshold, best.gate
            console.print(
                f"chosen by {folds}-fold CV on the train parts: hard-prompt weight {weight}, "
                f"threshold {threshold}, gate {gate} (CV F1 {best.f1:.3f}, FPR {best.fpr:.3f}, "
                f"hard FPR {best.hard_fpr:.3f})"
            )
        cv = layers(out_of_fold(train_part, folds, weights={"hard": weight}), threshold, gate)
    except ValueError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    held = layers(predict(train_part, test_part, {"hard": weight}), threshold, gate)
    # latency of each layer, the shipped scanner and the whole default input policy, one text
    # at a time, nothing cached (each text is embedded by whatever needs the embedding)
    from safety.scanners.heuristics import attack_phrases
    from safety.scanners.unicode import normalise

    policy = build_policy(default_policy(), {"embedder": embedder})
    injection = next(s for spec, s in policy.scanners if spec.type == "injection")
    model = injection.model  # type: ignore[attr-defined]

    def classifier(text: str) -> None:
        model.probability([text], embedder.embed_one(text).reshape(1, -1))

    steps: dict[str, tuple[str | None, Any]] = {
        "phrase list": ("phrase list (baseline)", lambda t: attack_phrases(normalise(t))),
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
        for layer in cv + held:
            if layer.name == steps[name][0]:
                layer.latency_ms = latency[name]
    n_train, n_test = len(train_part.texts), len(test_part.texts)
    console.print(_table(f"{data.name}: {folds}-fold CV on the train parts ({n_train})", cv))
    console.print(_table(f"held out: the test parts ({n_test}), fitted on the train parts", held))
    for layer in held:
        if layer.categories and len(layer.categories) > 1:
            parts = ", ".join(f"{name} {rate:.2f}" for name, rate in layer.categories.items())
            console.print(f"{escape(layer.name)}, held out, per category: {escape(parts)}")
    for name, stats in latency.items():
        console.print(
            f"{name}: p50 {stats['p50']:.2f} ms, p95 {stats['p95']:.2f} ms, "
            f"p99 {stats['p99']:.2f} ms per text"
        )
    if output is not None:
        result = {
            "settings": {"hard_weight": weight, "threshold": threshold, "gate": gate},
            "cv": [vars(x) for x in cv],
            "held_out": [vars(x) for x in held],
            "search": [vars(t) for t in trials],
            "latency": latency,
        }
        output.write_text(json.dumps(result))
