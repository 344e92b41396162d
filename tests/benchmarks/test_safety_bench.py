"""``ragline bench safety`` runs end to end and reports against its goals (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_safety_bench_reports_both_cases(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", "safety", "--requests", "6",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "safety.json").read_text())
    assert report["requests"] == 6 and report["tokens"] == 500
    for case in ("own_embedding", "shared_embedding"):
        assert 0 < report[case]["p50_ms"] <= report[case]["p99_ms"]
    assert set(report["goals"]) == {"p50_ms", "p99_ms"}
    assert "own_embedding" in done.stdout
