"""The README's newcomer path (keys -> config -> ingest -> grounded answer with citations ->
bench report -> metrics) runs as written: the block after the `newcomer-path` marker, in bash,
in an empty directory, on a free port, with the project's virtual environment first on PATH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port

MARKER = "<!-- newcomer-path"


def newcomer_block() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER) :]
    match = re.search(r"```bash\n(.*?)```", after, re.S)
    assert match is not None, "no bash block after the newcomer-path marker"
    return match.group(1)


def test_the_readme_newcomer_path_runs_as_written(model_path: Path, tmp_path: Path) -> None:
    block = newcomer_block()
    env = {**os.environ, "RAGLINE_PORT": str(free_port())}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAGLINE_CONFIG", None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    log = (tmp_path / "gateway.log").read_text() if (tmp_path / "gateway.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    # 4: a grounded answer whose citations name the leave document
    answer = json.loads((tmp_path / "answer.json").read_text())
    cited = [c["document_id"] for c in answer["ragline"]["citations"]]
    assert "leave.md" in cited, answer
    assert answer["ragline"]["prompt"]["template"].startswith("grounded-qa@")
    # 5: the benchmark's reports, judged by the CPU goals, every request completed
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["failed"] for r in results["runs"]] == [0, 0]
    assert results["settings"]["goals"].startswith("cpu")
    assert (tmp_path / "bench" / "report.html").stat().st_size > 10_000
    # 6: the metrics the block printed count the chat request it made
    assert 'route="/v1/chat/completions"' in done.stdout and 'status="200"' in done.stdout
