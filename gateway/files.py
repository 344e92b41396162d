"""Uploaded files (``POST /v1/files``): their bytes and OpenAI file objects, owned per key.
``RagService`` (``gateway.retrieval``) holds one ``FileStore``; it is re-exported there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from gateway.auth import Principal
from gateway.errors import NotFound

_FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")


class FileStore:
    """Uploaded files (``POST /v1/files``): the bytes and an OpenAI file object per id.

    A file is written into a temporary directory, flushed to disk, and renamed into place (a
    crash leaves it whole or absent); temporary directories a crash left are swept at start."""

    STALE_SECONDS = 3600.0

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sweep()

    def _sweep(self) -> None:
        if not self.root.exists():
            return
        now = time.time()
        for debris in self.root.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - debris.stat().st_mtime > self.STALE_SECONDS:
                    shutil.rmtree(debris, ignore_errors=True)

    def create(self, filename: str, data: bytes, purpose: str, owner: Principal) -> dict[str, Any]:
        file_id = f"file-{secrets.token_hex(12)}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        tmp = self.root / f".tmp-{file_id}"
        tmp.mkdir(parents=True)
        _durable(tmp / "content", data)
        _durable(tmp / "file.json", json.dumps({**obj, _OWNER: owner.key_id}).encode())
        _fsync_dir(tmp)
        os.rename(tmp, self.root / file_id)
        _fsync_dir(self.root)
        return obj

    def get(self, file_id: str, principal: Principal) -> dict[str, Any]:
        """The file object, if ``principal`` owns the file (or is an admin); else 404: another
        key's file ids, which citations show, reveal nothing."""
        path = self._path(file_id) / "file.json"
        try:
            obj = dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise _no_file(file_id) from None
        owner = obj.pop(_OWNER, None)
        if owner is not None and owner != principal.key_id and not principal.admin:
            raise _no_file(file_id)
        return obj

    def list_files(
        self,
        principal: Principal,
        purpose: str | None = None,
        order: str = "desc",
        after: str | None = None,
        limit: int = 10_000,
    ) -> tuple[list[dict[str, Any]], bool]:
        """The files ``principal`` may read (its own; an admin: all), newest first unless
        ``order="asc"``, after the file id ``after``; and whether more follow. Reads every
        file's ``file.json``: call it off the event loop."""
        files = []
        for path in self.root.glob("file-*/file.json") if self.root.exists() else []:
            try:
                obj = dict(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # deleted meanwhile
            owner = obj.pop(_OWNER, None)
            if owner is not None and owner != principal.key_id and not principal.admin:
                continue
            if purpose is None or obj.get("purpose") == purpose:
                files.append(obj)
        files.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order == "desc")
        if after is not None:
            ids = [f["id"] for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        return files[:limit], len(files) > limit

    def content(self, file_id: str, principal: Principal) -> bytes:
        self.get(file_id, principal)
        return (self._path(file_id) / "content").read_bytes()

    def delete(self, file_id: str, principal: Principal) -> None:
        self.get(file_id, principal)
        shutil.rmtree(self._path(file_id), ignore_errors=True)

    def _path(self, file_id: str) -> Path:
        if not _FILE_ID.match(file_id):
            raise _no_file(file_id)
        return self.root / file_id


_OWNER = "_ragline_owner"  # in file.json only; never in a response


def _durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_file(file_id: str) -> NotFound:
    return NotFound(f"No file with id {file_id!r}.", param="file_id", code="file_not_found")
