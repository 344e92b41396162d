"""The README's newcomer path (keys -> config -> ingest -> grounded answer with citations ->
bench report -> metrics) runs as written: the block after the `newcomer-path` marker, in bash,
in an empty directory, on a free port, with the project's virtual environment first on PATH."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
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
    # output to files, in a session of its own: if the block stops before its `kill %1`, the
    # gateway it started would hold a pipe open until the timeout; here it is killed at once
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    done = subprocess.CompletedProcess(proc.args, returncode, out.read_text(), err.read_text())
    log = (tmp_path / "gateway.log").read_text() if (tmp_path / "gateway.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    # 4: a grounded answer: it states what only the leave document says, with citations of the
    # store's documents (which number SmolLM2 marks, if any, is a near tie: float32 marks none,
    # so every numbered chunk is listed, and the int4 default's int8 prefill marked [2] in stop
    # 45, the expenses chunk; the marker is the model's, the list the gateway's)
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert "30" in answer["choices"][0]["message"]["content"], answer
    cited = [c["document_id"] for c in answer["ragline"]["citations"]]
    assert cited and set(cited) <= {"leave.md", "expenses.md"}, answer
    assert answer["ragline"]["retrieval"]["used"] == 2, answer  # both chunks numbered
    assert answer["ragline"]["prompt"]["template"].startswith("grounded-qa@")
    # 5: the benchmark's reports, judged by the CPU goals, every request completed
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["failed"] for r in results["runs"]] == [0, 0]
    assert results["settings"]["goals"].startswith("cpu")
    assert (tmp_path / "bench" / "report.html").stat().st_size > 10_000
    # 6: the metrics the block printed count the chat request it made
    assert 'route="/v1/chat/completions"' in done.stdout and 'status="200"' in done.stdout
