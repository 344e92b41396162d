"""The embedded engine's multi-LoRA forward pass against PEFT on the real SmolLM2 weights: one
batch mixing the base model and two adapters (different ranks and target modules) gives the
logits and greedy tokens PEFT gives for each, in float32."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from gateway.backends.llama import LlamaRunner, PrefillItem
from tests.engine_helpers import chat_ids, reference_greedy, runner_greedy, tables_for

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hello."]


def random_adapter(model_path: Path, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A LoRA adapter with random, non-zero A and B (PEFT initialises B to zero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return {
        "attn8": random_adapter(model_path, tmp / "a", 1, 8, ["q_proj", "v_proj", "o_proj"]),
        "all16": random_adapter(
            model_path,
            tmp / "b",
            2,
            16,
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    }


def test_mixed_batch_matches_peft(model_path: Path, tokenizer, adapters: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=4, max_len=256, dtype=torch.float32, device=torch.device("cpu")
    )
    runner.load_adapters(adapters)
    assert runner.adapters == {"attn8": 1, "all16": 2}
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    which = [0, 1, 2]  # base, attn8, all16 in one batch
    steps = 12
    outs, first_logits = runner_greedy(runner, prompts, steps, which)

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapters["attn8"], adapter_name="attn8")
    peft.load_adapter(adapters["all16"], adapter_name="all16")
    for row, (ids, adapter) in enumerate(zip(prompts, [None, "attn8", "all16"], strict=True)):
        if adapter is not None:
            peft.set_adapter(adapter)
        with peft.disable_adapter() if adapter is None else nullcontext(), torch.inference_mode():
            ref_logits = peft(torch.tensor([ids])).logits[0, -1]
            ref = reference_greedy(peft, ids, steps)
        assert torch.allclose(first_logits[row], ref_logits.float(), atol=2e-3, rtol=1e-4), adapter
        assert outs[row] == ref, adapter
    # the adapters really change the output
    assert outs[0] != outs[1] and outs[0] != outs[2]


def test_a_copied_block_keeps_the_adapters_keys(
    model_path: Path, tokenizer, adapters: dict[str, Path]
) -> None:  # type: ignore[no-untyped-def]
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=3, max_len=128, dtype=torch.float32, device=torch.device("cpu")
    )
    runner.load_adapters(adapters)
    ids = tokenizer.encode("Hello", add_special_tokens=False)
    table = tables_for(runner, 1)[0]
    first = int(runner.prefill([PrefillItem(ids, 0, table, 2)]).argmax())
    runner.copy_block(table[0], table[-1] + 1)
    fork = [table[-1] + 1] + table[1:]
    forked = runner.decode([first], [len(ids)], [fork], [2])[0].clone()
    direct = runner.decode([first], [len(ids)], [table], [2])[0]
    base = runner.decode([first], [len(ids)], [table])[0]
    assert torch.equal(forked, direct) and not torch.equal(direct, base)


def test_adapters_beside_onnxruntimes_int4_kernel(
    model_path: Path, tokenizer, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """With ONNX Runtime's int4 kernel the adapters' deltas are added op by op (the layer graphs
    have no place for them): a mixed batch's logits are float32's with the same adapters up to
    the 8-bit LM head's rounding. The kernel multiplies in float32 here (``ACCURACY_LEVEL`` 0)
    and SmolLM2's weights, dequantized from a Q4_1 file, are stored by int4 without loss, so
    the only other difference is float rounding."""
    from gateway.backends import ort_int4

    monkeypatch.setattr(ort_int4, "ACCURACY_LEVEL", 0)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    which = [0, 1, 2]
    results = []
    for kernel in ("onnxruntime", None):
        runner = LlamaRunner.from_pretrained(
            model_path,
            max_slots=4,
            max_len=256,
            dtype=torch.float32,
            device=torch.device("cpu"),
            **({"quant": "int4", "int4_kernel": kernel} if kernel else {}),  # type: ignore[arg-type]
        )
        runner.load_adapters(adapters)
        results.append(runner_greedy(runner, prompts, 4, which))
    (int4_outs, int4_logits), (ref_outs, ref_logits) = results
    assert int4_outs == ref_outs
    torch.testing.assert_close(int4_logits, ref_logits, rtol=0, atol=0.25)  # measured: 0.14
    assert int4_outs[0] != int4_outs[1] and int4_outs[0] != int4_outs[2]
