"""The adapter registry: LoRA adapters the gateway serves by name, with compatibility checks.

``ragline adapters register DIR --name NAME --base MODEL`` checks the directory before it is
recorded: the files vLLM loads (``adapter_config.json`` + ``adapter_model.safetensors``), a plain
LoRA (no DoRA, no bias, no ``modules_to_save``), a rank vLLM serves, target modules the engines
know, every weight's shape against the base model's layers, and, when the adapter carries
``ragline.json``, the checksum of the base weights it was trained on. Any mismatch is refused with
what differs. The registry is a small JSON file (``RAGLINE_ADAPTERS_FILE``, default
``~/.cache/ragline/adapters.json``) that the gateway reads at start-up: registered adapters join
the config file's ``adapters`` and appear in ``/v1/models``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.meta import ALL_LINEAR, META_FILE, VLLM_RANKS, base_checksum

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+_proj)\.lora_(?P<ab>[AB])\.weight$"
)


class AdapterError(ValueError):
    """The adapter cannot be registered or served; the message says why."""


def default_registry_path() -> Path:
    default = "~/.cache/ragline/adapters.json"
    return Path(os.environ.get("RAGLINE_ADAPTERS_FILE", default)).expanduser()


def _expected_shapes(base: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, module -> (in_features, out_features)) of a Llama base checkpoint."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{base}: cannot read the base model's config.json ({exc})") from None
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return int(config["num_hidden_layers"]), shapes


def inspect(adapter: Path, base: Path, *, check_checksum: bool = True) -> dict[str, Any]:
    """Validate ``adapter`` against ``base``; returns what the registry records."""
    from safetensors import safe_open

    if not adapter.is_dir():
        raise AdapterError(f"{adapter}: not a directory")
    config_path, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not config_path.exists():
        raise AdapterError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
    if not weights.exists():
        found = "adapter_model.bin" if (adapter / "adapter_model.bin").exists() else "none"
        raise AdapterError(
            f"{adapter}: no adapter_model.safetensors (found: {found}); save with "
            "safe_serialization=True"
        )
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc.msg})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter}: peft_type is {cfg.get('peft_type')!r}; only LORA is served")
    rank = int(cfg.get("r", 0))
    if rank not in VLLM_RANKS:
        raise AdapterError(
            f"{adapter}: rank {rank} is not one vLLM serves ({', '.join(map(str, VLLM_RANKS))})"
        )
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{adapter}: modules_to_save {cfg['modules_to_save']} cannot be served")
    if cfg.get("use_dora"):
        raise AdapterError(f"{adapter}: DoRA adapters are not served")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{adapter}: LoRA bias {cfg['bias']!r} is not served; use bias='none'")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(ALL_LINEAR))
    if unknown:
        raise AdapterError(
            f"{adapter}: target modules {unknown} are not served (Llama linear layers only)"
        )

    layers, shapes = _expected_shapes(base)
    seen = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            match = _KEY.search(key)
            if match is None:
                raise AdapterError(f"{adapter}: unexpected tensor {key!r}")
            layer, module, ab = int(match["layer"]), match["module"], match["ab"]
            if layer >= layers:
                raise AdapterError(
                    f"{adapter}: weights for layer {layer}, but the base model has {layers} "
                    "layers: it was trained for a different base model"
                )
            shape = tuple(f.get_slice(key).get_shape())
            fan_in, fan_out = shapes[module]
            want = (rank, fan_in) if ab == "A" else (fan_out, rank)
            if shape != want:
                raise AdapterError(
                    f"{adapter}: {key} has shape {list(shape)}, the base model needs {list(want)}: "
                    "it was trained for a different base model"
                )
            seen += 1
    if seen == 0:
        raise AdapterError(f"{adapter}: adapter_model.safetensors holds no LoRA weights")
    record: dict[str, Any] = {"rank": rank, "alpha": cfg.get("lora_alpha"), "targets": targets}
    meta_path = adapter / META_FILE
    if meta_path.exists() and check_checksum:
        meta = json.loads(meta_path.read_text())
        trained_on = meta.get("base_model", {}).get("checksum")
        actual = base_checksum(base)
        if trained_on and trained_on != actual:
            raise AdapterError(
                f"{adapter}: trained on base weights {trained_on[:12]}…, but {base} has "
                f"{actual[:12]}…: a different checkpoint of the same architecture (pass --force "
                "to register anyway)"
            )
        record["base_checksum"] = actual
    return record


class AdapterRegistry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_registry_path()

    def entries(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{self.path}: the adapter registry is corrupt: {exc.msg}") from None
        return dict(data.get("adapters", {}))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across processes (``ragline adapters register`` in two
        shells): each reads, changes and writes the registry under this lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        """A new file under a unique name, on disk (fsync) before it replaces the old one,
        and the rename on disk too: readers and a crash see the old registry or the new."""
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps({"adapters": entries}, indent=2, sort_keys=True))
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def register(
        self,
        name: str,
        adapter: Path,
        base_name: str,
        base_path: Path,
        *,
        replace: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        if not NAME.match(name):
            raise AdapterError(f"adapter name {name!r} must match {NAME.pattern}")
        record = inspect(adapter.resolve(), base_path, check_checksum=not force)
        record.update(
            name=name,
            path=str(adapter.resolve()),
            base=base_name,
            base_path=str(base_path),
            registered=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with self._locked():
            entries = self.entries()
            if name in entries and not replace:
                raise AdapterError(f"an adapter named {name!r} is registered; pass --replace")
            entries[name] = record
            self._write(entries)
        return record

    def remove(self, name: str) -> dict[str, Any]:
        with self._locked():
            entries = self.entries()
            if name not in entries:
                raise AdapterError(f"no adapter named {name!r} is registered")
            record = entries.pop(name)
            self._write(entries)
        return record
