"""Uploaded files: written whole or not at all, owned, and the debris of a crash swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.auth import Principal
from gateway.errors import NotFound
from gateway.retrieval import FileStore


def test_files_are_owned_and_crash_debris_is_swept(tmp_path: Path) -> None:
    root = tmp_path / "files"
    stale, fresh = root / ".tmp-file-old", root / ".tmp-file-new"
    stale.mkdir(parents=True)
    fresh.mkdir()
    an_hour_ago = time.time() - 2 * FileStore.STALE_SECONDS
    os.utime(stale, (an_hour_ago, an_hour_ago))
    files = FileStore(root)
    assert not stale.exists() and fresh.exists()  # a write in progress elsewhere is kept
    alice, bob = Principal("alice"), Principal("bob")
    made = files.create("a.txt", b"hello", "assistants", alice)
    assert "_ragline_owner" not in made
    assert files.content(made["id"], alice) == b"hello"
    with pytest.raises(NotFound):
        files.content(made["id"], bob)
    assert files.get(made["id"], Principal("ops", admin=True))["id"] == made["id"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == [fresh.name]
