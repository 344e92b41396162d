"""``ragline finetune``: supervised LoRA (or QLoRA) fine-tuning with a plain PyTorch loop.

Why a plain loop and not TRL's ``SFTTrainer``: the loss must cover assistant tokens only, which
``data.tokenize`` computes from the model's own chat template (and tests); the loop around it is
short, runs the same on CPU and CUDA, and keeps checkpoints we can resume exactly (adapter
weights, optimizer, scheduler, step, RNG). Everything that can be wrong with the inputs (data,
rank, target modules, output directory, QLoRA without CUDA) is checked before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from finetune.augment import augment
from finetune.data import (
    IGNORE,
    DataError,
    Example,
    Summary,
    Tokenized,
    choose_split,
    load_examples,
    pack,
    prepare,
)
from finetune.meta import (
    ALL_LINEAR,
    META_FILE,
    VLLM_RANKS,
    FinetuneError,
    base_checksum,
)

log = logging.getLogger("ragline.finetune")


@dataclass
class TrainConfig:
    base: Path
    data: Path
    output: Path
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEAR
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 1024
    truncate: bool = False
    packing: bool = False
    eval_fraction: float | None = None  # None: data.choose_split decides by the set's size
    augment: int = 0  # reworded copies of each training question (finetune/augment.py)
    neftune: float = 0.0  # NEFTune's alpha: uniform noise on the input embeddings while training
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    qlora: bool = False
    device: str = "auto"

    def hyperparameters(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("base", "data", "output", "resume", "overwrite", "device"):
            out.pop(key)
        out["target_modules"] = list(self.target_modules)
        return out


@dataclass
class Result:
    output: Path
    steps: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    peak_memory_mb: float = 0.0
    summary: Summary | None = None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def check(config: TrainConfig) -> None:
    """Settings that can be checked without loading anything."""
    if config.rank not in VLLM_RANKS:
        raise FinetuneError(
            f"rank {config.rank} is not one vLLM serves; use one of "
            f"{', '.join(map(str, VLLM_RANKS))}"
        )
    if not (config.base / "config.json").exists():
        raise FinetuneError(f"{config.base}: no config.json; pass a model directory as --base")
    unknown = set(config.target_modules) - set(ALL_LINEAR)
    if unknown:
        raise FinetuneError(
            f"unknown target module(s) {sorted(unknown)}; Llama's are {', '.join(ALL_LINEAR)}"
        )
    if config.batch_size < 1 or config.grad_accum < 1 or config.lr <= 0:
        raise FinetuneError("batch size, gradient accumulation and learning rate must be > 0")
    if not 0 <= config.augment <= 32 or not 0 <= config.neftune <= 100:
        raise FinetuneError("--augment must be 0-32 copies and --neftune 0-100")
    if config.qlora and not torch.cuda.is_available():
        raise FinetuneError("--qlora needs a CUDA GPU (4-bit base weights through bitsandbytes)")
    if config.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FinetuneError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
    has_adapter = (config.output / "adapter_config.json").exists()
    if has_adapter and not (config.resume or config.overwrite):
        raise FinetuneError(
            f"{config.output} already holds an adapter; pass --overwrite or --resume"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(
    config: TrainConfig,
    tokenizer: Any,
    context_limit: int,
    loaded: tuple[list[Example], str] | None = None,
) -> tuple[list[Tokenized], list[Tokenized], Summary]:
    """Tokenized train and eval rows; ``loaded``: ``load_examples(config.data)`` already read."""
    examples, checksum = loaded or load_examples(config.data)
    chosen = choose_split(examples, config.eval_fraction)
    eval_ex = chosen.held
    copies = []
    if config.augment:  # training examples only: a copy never teaches what eval measures
        held_out = {ex.line for ex in eval_ex}
        trained = [ex for ex in examples if ex.line not in held_out]
        copies = augment(trained, config.augment, config.seed)
    rows, summary = prepare(
        examples + copies,
        tokenizer,
        config.max_length,
        truncate=config.truncate,
        context_limit=context_limit,
        path=config.data,
    )
    held_lines = {ex.line for ex in eval_ex}
    train = [r for r in rows if r.line not in held_lines]
    held = [r for r in rows if r.line in held_lines]
    summary.train, summary.eval = len(train), len(held)
    summary.checksum = checksum
    summary.duplicates, summary.warnings = chosen.duplicates, chosen.warnings
    summary.augmented = len(copies)
    for warning in chosen.warnings:
        log.warning("%s: %s", config.data, warning)
    if config.packing:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        train = pack(train, config.max_length, eos)
        summary.packed_sequences = len(train)
    return train, held, summary


def _batches(rows: list[Tokenized], size: int, pad: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        width = max(len(r.input_ids) for r in chunk)
        out.append(
            {
                "input_ids": torch.tensor(
                    [r.input_ids + [pad] * (width - len(r.input_ids)) for r in chunk]
                ),
                "labels": torch.tensor(
                    [r.labels + [IGNORE] * (width - len(r.labels)) for r in chunk]
                ),
                "attention_mask": torch.tensor(
                    [[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in chunk]
                ),
            }
        )
    return out


@torch.no_grad()
def eval_loss(model: Any, rows: list[Tokenized], batch_size: int, pad: int, device: Any) -> float:
    """Mean loss per assistant token over ``rows``."""
    if not rows:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size, pad):
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(assistant_loss(model, batch, reduction="sum"))
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def assistant_loss(model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean") -> Any:
    """Next-token cross-entropy at the labelled (assistant) positions of ``batch``, as
    transformers' causal-LM loss computes it, but with the LM head applied to those positions
    only: the head (576 x 49,152 for SmolLM2) and its float32 logits are not computed for prompt
    tokens, which no loss reads (about 11% of a CPU training step on the one-phrasing data, and
    the logits' memory for long prompts). Models whose head does more than a linear layer (logit
    soft-capping) take the model's own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    if not isinstance(head, torch.nn.Linear) or getattr(
        base.config, "final_logit_softcapping", None
    ):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction=reduction,
        )
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    keep = labels != IGNORE
    logits = head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction=reduction)


def train(
    config: TrainConfig,
    progress: Callable[[int, int, float, float], None] | None = None,
    on_summary: Callable[[Summary], None] | None = None,
) -> Result:
    """Fine-tune; writes the adapter and ``ragline.json`` to ``config.output``."""
    # settings, then the dataset (which needs the tokenizer only), before PEFT and the model
    # load: a mistyped flag or a bad line fails in a second or two, not after seconds of imports
    check(config)
    device = _device(config.device)
    loaded = load_examples(config.data)  # malformed or empty data: before any model file
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base)
    model_config = AutoConfig.from_pretrained(config.base)
    context = int(getattr(model_config, "max_position_embeddings", 2048))
    train_rows, eval_rows, summary = load_data(config, tokenizer, context, loaded)
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, get_scheduler

    if on_summary is not None:
        on_summary(summary)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    model: Any = AutoModelForCausalLM.from_pretrained(config.base, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    else:
        model.to(device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.rank,
            lora_alpha=int(config.alpha),
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train_rows) / (config.batch_size * config.grad_accum))
    total = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
    scheduler = get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=int(total * config.warmup_ratio),
        num_training_steps=total,
    )
    step = 0
    losses: list[float] = []
    checkpoints = config.output / "checkpoints"
    if config.resume:
        latest = _latest_checkpoint(checkpoints)
        if latest is None:
            raise FinetuneError(f"--resume: no checkpoint under {checkpoints}")
        set_peft_model_state_dict(model, load_file(str(latest / "adapter_model.safetensors")))
        state = torch.load(latest / "trainer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
    elif config.overwrite and config.output.exists():
        shutil.rmtree(config.output)
    config.output.mkdir(parents=True, exist_ok=True)

    before = eval_loss(model, eval_rows, config.batch_size, pad, device)
    if config.neftune:
        model.get_input_embeddings().register_forward_hook(_neftune(config.neftune))
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        order = list(range(len(train_rows)))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)  # same order on resume
        rows = [train_rows[i] for i in order]
        micro = _batches(rows, config.batch_size, pad)
        for chunk_start in range(offset * config.grad_accum, len(micro), config.grad_accum):
            group = micro[chunk_start : chunk_start + config.grad_accum]
            tokens = sum(int((b["labels"] != IGNORE).sum()) for b in group)
            step_loss = 0.0
            for batch in group:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = assistant_loss(model, batch)
                share = int((batch["labels"] != IGNORE).sum()) / max(tokens, 1)
                (loss * share).backward()
                step_loss += float(loss.detach()) * share
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            if progress is not None:
                progress(step, total, step_loss, scheduler.get_last_lr()[0])
            if config.save_every and step % config.save_every == 0 and step < total:
                where = checkpoints / f"step-{step}"
                _save_checkpoint(model, optimizer, scheduler, step, losses, where)
            if step >= total:
                break
    seconds = time.perf_counter() - started
    after = eval_loss(model, eval_rows, config.batch_size, pad, device)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    model.save_pretrained(config.output)
    result = Result(config.output, step, seconds, losses, before, after, peak, summary)
    _write_meta(config, result, summary, model_config)
    return result


def _neftune(alpha: float) -> Callable[..., torch.Tensor]:
    """NEFTune (Jain et al. 2023): while training, add uniform noise of magnitude
    ``alpha / sqrt(length * dim)`` to the token embeddings; evaluation sees none."""

    def hook(module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return hook


def _save_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, step: int, losses: list[float], path: Path
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "losses": losses,
            "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "trainer.pt",
    )
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint is complete or absent


def _latest_checkpoint(directory: Path) -> Path | None:
    found = [
        (int(p.name.split("-")[1]), p)
        for p in directory.glob("step-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer.pt").exists()
    ]
    return max(found)[1] if found else None


def _write_meta(config: TrainConfig, result: Result, summary: Summary, base_config: Any) -> None:
    meta = {
        "format": 1,
        "base_model": {
            "path": str(config.base),
            "name": str(getattr(base_config, "_name_or_path", "") or config.base.name),
            "architecture": (base_config.architectures or ["?"])[0],
            "checksum": base_checksum(config.base),
        },
        "dataset": {"path": str(config.data), "checksum": summary.checksum, **summary.as_dict()},
        "hyperparameters": config.hyperparameters(),
        "metrics": {
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "steps_per_second": round(result.steps_per_second, 3),
            "first_train_loss": round(result.train_loss[0], 4) if result.train_loss else None,
            "last_train_loss": round(result.train_loss[-1], 4) if result.train_loss else None,
            "eval_loss_before": _round(result.eval_loss_before),
            "eval_loss_after": _round(result.eval_loss_after),
            "peak_memory_mb": round(result.peak_memory_mb, 1),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (config.output / META_FILE).write_text(json.dumps(meta, indent=2))


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def merge(adapter: Path, output: Path, base: Path | None = None) -> Path:
    """Write base + adapter as one full checkpoint (safetensors, tokenizer included)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta_path = adapter / META_FILE
    if base is None:
        if not meta_path.exists():
            raise FinetuneError(f"{adapter}: no {META_FILE}; pass --base")
        base = Path(json.loads(meta_path.read_text())["base_model"]["path"])
    if output.exists() and any(output.iterdir()):
        raise FinetuneError(f"{output} is not empty")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)
    AutoTokenizer.from_pretrained(base).save_pretrained(output)
    return output


__all__ = ["DataError", "FinetuneError", "TrainConfig", "train", "merge", "check"]
