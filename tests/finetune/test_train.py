"""The training loop on the real SmolLM2 (a few CPU steps): metadata, exact resume from a
checkpoint, and merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.train import TrainConfig, base_checksum, merge, train

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Code word {i}?"},
            {"role": "assistant", "content": f"Zeta-{i}."},
        ]
    }
    for i in range(10)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "codes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return path


def config(model_path: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "base": model_path, "data": data, "output": out, "rank": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ("q_proj", "v_proj"), "batch_size": 4, "lr": 5e-3, "max_steps": 4,
        "eval_fraction": 0.2, "seed": 3,
    }  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_training_writes_a_servable_adapter_with_metadata(
    model_path: Path, data: Path, tmp_path: Path
) -> None:
    result = train(config(model_path, data, tmp_path / "a"))
    meta = json.loads((tmp_path / "a" / "ragline.json").read_text())
    assert meta["base_model"]["checksum"] == base_checksum(model_path)
    assert (
        meta["dataset"]["examples"] == 10
        and meta["dataset"]["train"] + meta["dataset"]["eval"] == 10
    )
    assert meta["hyperparameters"]["rank"] == 8 and meta["metrics"]["steps"] == 4
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before  # it learned the pattern
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg.get("modules_to_save")


def test_resume_continues_exactly(model_path: Path, data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(config(model_path, data, straight, save_every=2))
    assert (straight / "checkpoints" / "step-2" / "trainer.pt").exists()
    # a run "interrupted" after step 2: its checkpoint, then --resume to the end
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (straight / "checkpoints" / "step-2").rename(resumed / "checkpoints" / "step-2")
    result = train(config(model_path, data, resumed, resume=True))
    assert result.steps == 4
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_bakes_the_adapter_into_a_checkpoint(
    model_path: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(config(model_path, data, tmp_path / "a", max_steps=6))
    merge(tmp_path / "a", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tok.encode("Code word 3?")])
    with torch.inference_mode():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(
            ids
        ).logits
        base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        base = base_model(ids).logits
        peft = PeftModel.from_pretrained(base_model, tmp_path / "a")(ids).logits
    assert (merged - peft).abs().max() < (base - peft).abs().max() / 4


def test_the_assistant_loss_is_the_causal_lm_loss_with_the_same_gradients(
    model_path: Path,
) -> None:
    """``assistant_loss`` applies the LM head to the labelled positions only; its value and its
    gradients are transformers' own causal-LM loss (labels shifted, prompt tokens ignored)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.data import IGNORE
    from finetune.train import assistant_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], lora_dropout=0)
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():  # B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(100, 20000, (3, 24))
    labels = ids.clone()
    labels[:, :15] = IGNORE  # a prompt of 15 tokens, then the answer
    labels[2, 20:] = IGNORE  # a padded row
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = model(**batch).loss
    ours = assistant_loss(model, batch)
    assert torch.allclose(ours, reference, rtol=1e-5), (float(ours), float(reference))
    ref_grads, our_grads = grads(reference), grads(assistant_loss(model, batch))
    assert ref_grads.keys() == our_grads.keys() and len(ref_grads) == 2 * 2 * 30
    for name, g in ref_grads.items():
        assert torch.allclose(our_grads[name], g, rtol=1e-4, atol=1e-7), name
    summed = assistant_loss(model, batch, reduction="sum")
    assert torch.allclose(summed, reference * int((labels[:, 1:] != IGNORE).sum()), rtol=1e-5)
