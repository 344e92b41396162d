"""Helpers for tests of the engine's forward pass against transformers/PEFT as the reference."""

from __future__ import annotations

import torch

from gateway.backends.llama import LlamaRunner, PrefillItem


def chat_ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """One user turn through the chat template, as the engine tokenizes it."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def tables_for(runner: LlamaRunner, count: int, first: int = 1) -> list[list[int]]:
    """``count`` disjoint block tables of a full-length sequence each, from block ``first``."""
    per = runner.max_blocks
    return [list(range(first + i * per, first + (i + 1) * per)) for i in range(count)]


def runner_greedy(
    runner: LlamaRunner,
    prompts: list[list[int]],
    steps: int,
    adapters: list[int] | None = None,
    tables: list[list[int]] | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of every prompt decoded together in one batch (each at its own position),
    and the prefill's logits."""
    tables = tables or tables_for(runner, len(prompts))
    which = adapters or [0] * len(prompts)
    items = [PrefillItem(p, 0, t, a) for p, t, a in zip(prompts, tables, which, strict=True)]
    first = runner.prefill(items).clone()
    outs = [[int(row.argmax())] for row in first]
    positions = [len(ids) for ids in prompts]
    for _ in range(steps - 1):
        logits = runner.decode([o[-1] for o in outs], positions, tables, adapters)
        for o, row in zip(outs, logits, strict=True):
            o.append(int(row.argmax()))
        positions = [p + 1 for p in positions]
    return outs, first


def reference_greedy(model, ids: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    """``model.generate``'s greedy continuation of ``ids`` (no EOS stop)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return list(out[0, len(ids) :].tolist())
