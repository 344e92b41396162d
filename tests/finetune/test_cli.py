"""``ragline finetune`` and ``ragline adapters`` refuse bad input before any training time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "RAGLINE_ADAPTERS_FILE": str(tmp / "adapters.json")},
    )


def test_bad_training_inputs_fail_fast_and_write_nothing(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    cases = [
        ("malformed.jsonl", good + "\n{oops\n", [], "malformed.jsonl:2: not valid JSON"),
        ("empty.jsonl", "\n", [], "the dataset is empty"),
        (
            "long.jsonl",
            json.dumps({"instruction": "word " * 400, "output": "ok"}) + "\n",
            ["--max-length", "128"],
            "longer than --max-length 128: line 1",
        ),
        ("rank.jsonl", good + "\n", ["--rank", "4"], "rank 4 is not one vLLM serves"),
        ("augment.jsonl", good + "\n", ["--augment", "33"], "--augment must be 0-32"),
        ("noise.jsonl", good + "\n", ["--neftune", "-1"], "--neftune 0-100"),
    ]
    for name, text, extra, needle in cases:
        data = tmp_path / name
        data.write_text(text)
        out = tmp_path / f"out-{name}"
        result = run("finetune", "--data", str(data), "--output", str(out), *extra, tmp=tmp_path)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert needle in " ".join(result.stderr.split()), (name, result.stderr)
        assert not out.exists(), name  # refused before the model loaded or trained


PROBE = """
import json, sys
from pathlib import Path
from finetune.data import DataError
from finetune.train import FinetuneError, TrainConfig, train
base, data, out, rank = sys.argv[1:]
try:
    train(TrainConfig(base=Path(base), data=Path(data), output=Path(out), rank=int(rank)))
except (DataError, FinetuneError) as exc:
    print(json.dumps({"error": str(exc), "loaded": sorted(
        m for m in ("peft", "transformers", "transformers.models.llama.modeling_llama")
        if m in sys.modules)}))
"""


def test_bad_settings_and_data_are_refused_before_peft_and_the_model_are_imported(
    tmp_path: Path, model_path: Path
) -> None:
    """The order of ``train``: settings, then the JSONL's syntax, then the tokenizer-dependent
    checks; PEFT and the model's code only after all of them (a wrong flag costs seconds)."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    bad.write_text("{oops\n")
    seen = {}
    for name, data, rank in (("rank", good, "4"), ("syntax", bad, "16")):
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(model_path), str(data), str(tmp_path / name), rank],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert probe.returncode == 0, probe.stderr[-2000:]
        seen[name] = json.loads(probe.stdout.strip().splitlines()[-1])
    assert "rank 4" in seen["rank"]["error"] and seen["rank"]["loaded"] == []
    assert "not valid JSON" in seen["syntax"]["error"] and seen["syntax"]["loaded"] == []
    assert not (tmp_path / "rank").exists() and not (tmp_path / "syntax").exists()


def test_register_refuses_a_non_adapter_and_lists_nothing(tmp_path: Path) -> None:
    result = run("adapters", "register", str(tmp_path), "--name", "x", tmp=tmp_path)
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr
    listed = run("adapters", "list", "--json", tmp=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout) == {}
