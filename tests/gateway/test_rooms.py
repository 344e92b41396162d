"""Rooms with one door: what serving imports, and what the lower packages may not import."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# modules that train, evaluate or benchmark: `ragline serve` must not load them
HEAVY = ("benchmarks", "finetune.train", "finetune.data", "safety.train", "gateway.cli.evals",
         "gateway.cli.rag", "gateway.cli.safety", "gateway.cli.finetune", "prompts.eval",
         "rag.eval")  # fmt: skip


def _imported(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return set(done.stdout.split())


def test_serving_imports_no_training_evaluation_or_benchmark_code() -> None:
    modules = _imported(
        "import typer.main\n"
        "from gateway.cli import app\n"
        "typer.main.get_command(app).get_command(None, 'serve')\n"
        "from gateway.app import create_app\n"
        "from gateway.config import FileConfig, Settings\n"
        "create_app(Settings(), FileConfig(models=[]))"
    )
    assert "gateway.cli.serve" in modules and "gateway.pipeline" in modules
    loaded = sorted(m for m in modules if m.startswith(HEAVY))
    assert loaded == []


def test_lower_packages_do_not_import_the_gateway() -> None:
    modules = _imported(
        "import prompts.budget, prompts.eval, prompts.registry, prompts.fewshot\n"
        "import rag.store, rag.retriever, safety.policy, safety.stream"
    )
    assert sorted(m for m in modules if m.split(".")[0] == "gateway") == []
