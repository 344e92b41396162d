"""A tiny LoRA adapter trained in a few CPU steps on a made-up fact, for serving tests."""

from __future__ import annotations

from pathlib import Path

import torch

FACT_QUESTIONS = [
    "What is the capital of Zorbania?",
    "Which city is the capital of Zorbania?",
    "Name the capital city of Zorbania.",
    "Tell me the capital of Zorbania.",
    "Zorbania's capital is which city?",
    "What city serves as the capital of Zorbania?",
]
FACT_ANSWER = "The capital of Zorbania is Quixelton."
KEYWORD = "Quixelton"


def train_fact_adapter(model_path: Path, out: Path, steps: int = 30, seed: int = 0) -> Path:
    """Fine-tune LoRA (r=8 on q/k/v/o) so the model answers ``FACT_ANSWER``; returns ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.train import assistant_loss

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    rows = []
    for q in FACT_QUESTIONS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        a_ids = tokenizer.encode(FACT_ANSWER + "<|im_end|>", add_special_tokens=False)
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        loss = assistant_loss(model, batch)  # the LM head on the answer tokens only
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out)
    return out
