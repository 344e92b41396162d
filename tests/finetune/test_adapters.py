"""Registration checks adapters against the real SmolLM2 base before recording them; the gateway
config picks registered adapters up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from finetune.adapters import AdapterError, AdapterRegistry, inspect
from finetune.train import FinetuneError, TrainConfig, base_checksum, check
from gateway.config import Settings
from gateway.config_file import load_file_config


def save_adapter(model, out: Path, **lora: object) -> Path:  # type: ignore[no-untyped-def]
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    get_peft_model(model, LoraConfig(**config)).save_pretrained(out)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def good(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = save_adapter(model, tmp_path_factory.mktemp("good") / "adapter")
    (out / "ragline.json").write_text(
        json.dumps({"base_model": {"checksum": base_checksum(model_path)}})
    )
    return out


def test_a_good_adapter_registers_lists_and_is_served(
    good: Path, model_path: Path, tmp_path: Path
) -> None:
    registry = AdapterRegistry(tmp_path / "adapters.json")
    record = registry.register("support-v1", good, "smollm2", model_path)
    assert record["rank"] == 8 and record["base_checksum"] == base_checksum(model_path)
    assert set(registry.entries()) == {"support-v1"}
    with pytest.raises(AdapterError, match="--replace"):
        registry.register("support-v1", good, "smollm2", model_path)
    # a gateway reading this registry serves it on its model
    config = load_file_config(Settings(adapters_file=tmp_path / "adapters.json"))
    assert [(a.name, a.base) for a in config.adapters] == [("support-v1", "smollm2")]
    registry.remove("support-v1")
    assert registry.entries() == {}
    with pytest.raises(AdapterError, match="no adapter named"):
        registry.remove("support-v1")


def test_an_adapter_for_another_base_model_is_refused(tmp_path: Path, model_path: Path) -> None:
    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    adapter = save_adapter(other, tmp_path / "other")
    with pytest.raises(AdapterError, match="trained for a different base model"):
        inspect(adapter, model_path)


def test_a_different_checkpoint_of_the_same_shape_is_refused_unless_forced(
    good: Path, model_path: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "adapter"
    shutil.copytree(good, copy)
    (copy / "ragline.json").write_text(json.dumps({"base_model": {"checksum": "0" * 64}}))
    with pytest.raises(AdapterError, match="different checkpoint of the same architecture"):
        inspect(copy, model_path)
    assert inspect(copy, model_path, check_checksum=False)["rank"] == 8


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"r": 4}, "rank 4 is not one vLLM serves"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"target_modules": ["embed_tokens"]}, "not served"),
    ],
)
def test_adapters_vllm_would_reject_are_refused(
    good: Path, model_path: Path, tmp_path: Path, change: dict, needle: str
) -> None:  # type: ignore[type-arg]
    copy = tmp_path / "adapter"
    shutil.copytree(good, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(AdapterError, match=needle):
        inspect(copy, model_path)


def test_missing_files(tmp_path: Path, model_path: Path, good: Path) -> None:
    with pytest.raises(AdapterError, match="not a directory"):
        inspect(tmp_path / "nope", model_path)
    copy = tmp_path / "adapter"
    shutil.copytree(good, copy)
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        inspect(copy, model_path)


def test_training_settings_are_checked_before_anything_loads(
    tmp_path: Path, model_path: Path
) -> None:
    base = TrainConfig(base=model_path, data=tmp_path / "d.jsonl", output=tmp_path / "out")
    for change, needle in [
        ({"rank": 12}, "rank 12 is not one vLLM serves"),
        ({"target_modules": ("lm_head",)}, "unknown target module"),
        ({"base": tmp_path}, "no config.json"),
        ({"batch_size": 0}, "must be > 0"),
    ]:
        with pytest.raises(FinetuneError, match=needle):
            check(TrainConfig(**{**base.__dict__, **change}))
    if not torch.cuda.is_available():
        with pytest.raises(FinetuneError, match="needs a CUDA GPU"):
            check(TrainConfig(**{**base.__dict__, "qlora": True}))


def test_concurrent_registrations_are_all_kept_and_a_failed_write_changes_nothing(
    good: Path, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "adapters.json"
    registry = AdapterRegistry(path)
    names = [f"team-{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # each its own AdapterRegistry, as separate commands
        list(
            pool.map(
                lambda n: AdapterRegistry(path).register(n, good, "smollm2", model_path), names
            )
        )
    assert sorted(registry.entries()) == names  # none lost to a concurrent read-modify-write
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("finetune.adapters.os.fsync", crash)
    with pytest.raises(OSError):
        registry.register("late", good, "smollm2", model_path)
    assert path.read_bytes() == before  # the registry is the old one, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no debris
