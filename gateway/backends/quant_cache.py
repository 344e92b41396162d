"""Quantized weights kept on disk between starts of the embedded engine.

Quantizing SmolLM2's linear layers to int4 takes about 1.2 s of every start on 2 cores (the
same result each time); reading them back from a safetensors file maps it in about 10 ms, its
pages read as they are first used (from the page cache on a restart). The
file lives beside the ONNX exports, under ``$RAGLINE_MODELS_DIR/engine/``, named by a hash of
what decides its content: the checkpoint files (path, size, modification time), the format
(``int8``/``int4``, the activation dtype, the int4 group), PyTorch's version and the CPU
capability its kernels were chosen for (the int4 kernel's packed layout is PyTorch's own). It is
written once, to a temporary name and renamed, so a killed start leaves nothing half-written; a
file that cannot be read or does not hold what is asked for is ignored and written again; a
models directory that cannot be written only costs the next start its quantization. Writing a
file removes those whose checkpoints no longer exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from gateway.backends.ort_int4 import NBITS_GROUP, NBitsWeight
from gateway.backends.quant import INT4_GROUP, Int4Weight, Int8Weight

log = logging.getLogger("ragline.embedded")

_RECIPE = "1"  # bump when quantize() changes: older files are not reused


def cache_dir() -> Path:
    root = Path(os.environ.get("RAGLINE_MODELS_DIR", "~/.cache/ragline/models")).expanduser()
    return root / "engine"


class QuantCache:
    """Quantized weights by name: read from the cache file when it has them, else quantized
    and, after ``save``, written for the next start."""

    def __init__(self, file: Path | None, sources: list[Path] | None = None) -> None:
        self.file = file
        self.sources = [str(f.resolve()) for f in sources or []]
        self._stored: dict[str, torch.Tensor] = {}
        self._new: dict[str, torch.Tensor] = {}
        if file is not None and file.exists():
            try:
                from safetensors.torch import load_file

                self._stored = load_file(str(file))
            except Exception as exc:  # noqa: BLE001 - a damaged file is rebuilt, not fatal
                log.warning("ignoring the unreadable quantized-weights cache %s: %s", file, exc)

    @classmethod
    def for_checkpoint(
        cls,
        files: list[Path],
        quant: str,
        dtype: torch.dtype,
        device: torch.device,
        kernel: str = "torch",
    ) -> QuantCache:
        """The cache of these checkpoint files' weights in ``quant`` (CPU only: the int8 and
        int4 kernels are CPU kernels); no file when there is nothing to quantize."""
        if quant == "none" or device.type != "cpu" or not files:
            return cls(None)
        if quant == "int4" and kernel != "torch":
            quant = f"int4-{kernel}"  # another layout, another file
        parts = [_RECIPE, quant, str(dtype), str(INT4_GROUP), torch.__version__]
        parts.append(torch.backends.cpu.get_cpu_capability())
        for file in files:
            stat = file.stat()
            parts += [str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        name = files[0].resolve().parent.name
        return cls(cache_dir() / f"{name}-{quant}-{digest}.safetensors", files)

    def int4(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
        """``Int4Weight.quantize(weight, dtype)``, from the file when it holds it."""
        out, inp = weight.shape
        packed = self._stored.get(f"{name}.packed")
        scales = self._stored.get(f"{name}.scales_zeros")
        if (
            packed is not None
            and scales is not None
            and packed.dtype == torch.uint8
            and packed.numel() * 2 == out * inp
            and scales.dtype == dtype
            and tuple(scales.shape) == (inp // INT4_GROUP, out, 2)
        ):
            return Int4Weight(packed, scales, INT4_GROUP, out)
        made = Int4Weight.quantize(weight, dtype, INT4_GROUP)
        self._new.update({f"{name}.packed": made.packed, f"{name}.scales_zeros": made.scales_zeros})
        return made

    def int8(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """``Int8Weight.quantize(weight, dtype)``, from the file when it holds it."""
        q = self._stored.get(f"{name}.q")
        scales = self._stored.get(f"{name}.scales")
        if (
            q is not None
            and scales is not None
            and q.dtype == torch.int8
            and q.shape == weight.shape
            and scales.dtype == dtype
            and tuple(scales.shape) == (weight.shape[0],)
        ):
            return Int8Weight(q, scales)
        made = Int8Weight.quantize(weight, dtype)
        self._new.update({f"{name}.q": made.q, f"{name}.scales": made.scales})
        return made

    def nbits(self, name: str, weight: torch.Tensor, bits: int) -> NBitsWeight:
        """``NBitsWeight.quantize(weight, bits)``, from the file when it holds it."""
        out, inp = weight.shape
        groups = inp // NBITS_GROUP
        packed = self._stored.get(f"{name}.nbits")
        scales = self._stored.get(f"{name}.nbits_scales")
        offsets = self._stored.get(f"{name}.nbits_offsets") if bits == 4 else None
        if (
            packed is not None
            and scales is not None
            and packed.dtype == torch.uint8
            and tuple(packed.shape) == (out, groups, NBITS_GROUP * bits // 8)
            and scales.dtype == torch.float32
            and scales.numel() == out * groups
            and (bits == 8 or (offsets is not None and tuple(offsets.shape) == (groups, out)))
        ):
            return NBitsWeight(packed, scales, offsets, bits, inp, out)
        made = NBitsWeight.quantize(weight, bits)
        self._new.update({f"{name}.nbits": made.packed, f"{name}.nbits_scales": made.scales})
        if made.offsets is not None:
            self._new[f"{name}.nbits_offsets"] = made.offsets
        return made

    def save(self) -> None:
        """Write what was quantized in this start, if anything (best effort)."""
        if self.file is None or not self._new:
            return
        from safetensors.torch import save_file

        tmp = self.file.with_name(f".tmp-{os.getpid()}-{self.file.name}")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            metadata = {"sources": json.dumps(self.sources)}
            save_file({**self._stored, **self._new}, str(tmp), metadata=metadata)
            os.replace(tmp, self.file)
            log.info("quantized weights cached at %s", self.file)
        except Exception as exc:  # noqa: BLE001 - a cache: never the reason a model fails to load
            log.info("quantized weights not cached (%s): the next start quantizes again", exc)
            return
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        _prune(self.file.parent)


def _prune(folder: Path) -> None:
    """Remove the cache files whose checkpoint files are all gone (a deleted model, a
    fine-tuning run's temporary merge): nothing else ever reads them; and temporary files a
    killed start left (an hour old)."""
    from safetensors import safe_open

    for file in folder.glob("*.safetensors"):
        if file.name.startswith(".tmp-"):  # another start's, being written, or a killed one's
            with contextlib.suppress(OSError):
                if time.time() - file.stat().st_mtime > 3600:
                    file.unlink()
            continue
        try:
            with safe_open(str(file), framework="pt") as opened:
                sources = json.loads((opened.metadata() or {}).get("sources", "[]"))
            if sources and not any(Path(s).exists() for s in sources):
                file.unlink()
        except Exception:  # noqa: BLE001, S112 - another process's file, being replaced
            continue
