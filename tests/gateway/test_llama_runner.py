"""The lean Llama forward pass against transformers' own ``generate`` (the reference)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from gateway.backends.llama import LlamaRunner
from tests.engine_helpers import chat_ids, reference_greedy, runner_greedy

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Explain gravity."]


def test_greedy_matches_transformers_generate(model_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """float32: token for token equal to ``generate``, with every prompt in one batch."""
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=4, max_len=512, dtype=torch.float32, device=torch.device("cpu")
    )
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    steps = 32
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    # prompts of different lengths prefill in one padded pass, then decode together in one
    # batch, each at its own position
    outs, _ = runner_greedy(runner, prompts, steps)
    for ids, out in zip(prompts, outs, strict=True):
        assert out == reference_greedy(reference, ids, steps)


def test_bf16_follows_generate_up_to_rounding_ties(model_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """bfloat16: batched and unbatched matmuls round differently (on CPUs without native bf16
    more so), so a near-tie can flip. Teacher-forced on ``generate``'s tokens, the runner must
    rank each of them first or within bf16 rounding of first, at every step of every prompt."""
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=4, max_len=512, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    steps = 24
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    refs = [reference_greedy(reference, ids, steps) for ids in prompts]
    rows = runner.prefill(0, prompts)
    positions = [len(ids) for ids in prompts]
    exact = 0
    for step in range(steps):
        for row, ref in zip(rows, refs, strict=True):
            top = float(row.max())
            assert float(row[ref[step]]) >= top - 0.25 * max(1.0, abs(top) / 16), (step, ref)
            exact += int(row.argmax()) == ref[step]
        if step + 1 < steps:
            rows = runner.decode([r[step] for r in refs], positions)
            positions = [p + 1 for p in positions]
    assert exact >= 0.9 * steps * len(prompts)  # ties are rare, not the rule


def test_move_slot_keeps_a_sequence_intact(model_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=3, max_len=256, dtype=torch.float32, device=torch.device("cpu")
    )
    ids = chat_ids(tokenizer, PROMPTS[0])
    first = int(runner.prefill(2, [ids]).argmax())
    runner.move_slot(2, 0, len(ids))
    moved = runner.decode([first], [len(ids)])[0]
    runner.prefill(0, [ids])
    direct = runner.decode([first], [len(ids)])[0]
    assert torch.equal(moved, direct)


def test_static_whole_cache_step_equals_the_dynamic_step(model_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """What a CUDA graph replays (whole-cache attention, batch padded with free slots at
    position 0) computes the same logits as the dynamic step, checked here on the CPU."""
    runner = LlamaRunner.from_pretrained(
        model_path, max_slots=4, max_len=256, dtype=torch.float32, device=torch.device("cpu")
    )
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS[:2]]
    first = [int(row.argmax()) for row in runner.prefill(0, prompts)]
    positions = [len(p) for p in prompts]
    dynamic = runner.decode(first, positions).clone()
    runner.prefill(0, prompts)  # restore the cache the dynamic step wrote into
    ids = torch.tensor(first + [0, 0]).view(4, 1)
    pos = torch.tensor(positions + [0, 0])
    with torch.inference_mode():
        static = runner._decode(ids, pos, runner.max_len)[:2]
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)
    assert runner.capture_cuda_graphs() == []  # no graphs on the CPU
