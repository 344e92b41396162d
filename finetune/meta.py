"""What the adapter registry (and so the serving gateway) needs to know about fine-tuning
without loading PyTorch: the ranks and modules vLLM serves, the metadata file's name and the
base checkpoint's checksum. ``finetune.train`` re-exports them."""

from __future__ import annotations

import hashlib
from pathlib import Path

# LoRA ranks vLLM's punica kernels accept (vllm/config/lora.py, 0.32)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_FILE = "ragline.json"


class FinetuneError(ValueError):
    """Bad settings or inputs, found before training starts."""


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_checksum(base: Path) -> str:
    """SHA-256 over the base checkpoint's weight files (sorted by name)."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise FinetuneError(f"{base}: no *.safetensors weights (is this a model directory?)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(file_checksum(f).encode())
    return digest.hexdigest()
