"""Estimate what each image adds to its python:3.11-slim base, from this machine's installed
files (no container engine runs here to build them): the distributions its lock installs, as
installed in .venv, plus the model files it bakes in.

    .venv/bin/python deploy/image/size.py
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def installed_bytes(lock: Path) -> int:
    wanted = {
        canonicalize_name(n) for n in re.findall(r"^([A-Za-z0-9._-]+)==", lock.read_text(), re.M)
    }
    total = 0
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in wanted:
            for f in dist.files or []:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    total += path.stat().st_size
    return total


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    from gateway.config import Settings

    settings = Settings()
    chat = tree_bytes(settings.default_model_path())
    onnx = tree_bytes(settings.models_dir / "onnx")
    mib = 2**20
    rows = [
        ("ragline:cpu (Dockerfile)", installed_bytes(REPO / "requirements.lock"), chat + onnx),
        ("ragline:gateway (deploy/image/Dockerfile.gateway)",
         installed_bytes(REPO / "requirements-gateway.lock"), onnx),
    ]  # fmt: skip
    print("| image | Python packages | models | added to python:3.11-slim |")
    print("|---|---|---|---|")
    for name, packages, models in rows:
        print(f"| {name} | {packages / mib:,.0f} MiB | {models / mib:,.0f} MiB | "
              f"{(packages + models) / mib:,.0f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
