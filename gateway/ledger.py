"""The usage ledger: one record per finished request (step 9), written to the database in
batches by a background task, never on the request path.

Records wait in a small in-memory buffer; every ``flush_seconds`` (or sooner, when the buffer
fills) the writer inserts them in one transaction in a worker thread. When the database cannot
be reached the batch goes to a spool file instead (JSON lines, fsynced), so memory stays flat
however long the outage lasts; once an insert succeeds again, spool files are claimed (an
atomic rename: one process replays each) and replayed. Inserts skip request ids already
present, so a replay after a partial failure writes each record once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway import ledger_db
from gateway.ledger_db import UsageRecord

log = logging.getLogger("ragline.ledger")
_CLAIM_STALE_SECONDS = 300.0  # a claimed spool file this old was left by a process that died
_REPLAY_BATCH = 1000


class Ledger:
    def __init__(
        self,
        url: str,
        spool_dir: Path,
        prices: dict[str, Any] | None = None,
        buffer: int = 10_000,
        flush_seconds: float = 1.0,
        retention_days: float | None = None,
    ) -> None:
        self.url = url
        self.spool_dir = spool_dir
        self.prices = prices or {}
        self.buffer_limit = buffer
        self.flush_seconds = flush_seconds
        self.retention_days = retention_days
        self.engine = ledger_db.engine_for(url)
        self._pending: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._migrated = False
        self._purged_at = 0.0
        self._warned_at = -math.inf
        self.spooled = 0  # records written to spool files by this process (for tests, metrics)
        self.written = 0

    # -- the request side (step 9): cheap, synchronous ------------------------------------------

    def add(self, record: UsageRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.buffer_limit:
            self._wake.set()

    # -- the writer -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(self._migrate)
        except Exception as exc:  # the database is down at start: spool until it is back
            log.warning("usage ledger: database unreachable at start (%s); spooling", _why(exc))
        self._task = asyncio.create_task(self._run())

    def _migrate(self) -> None:
        ledger_db.migrate(self.engine)
        self._migrated = True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # never let the writer die; the next round tries again
                log.exception("usage ledger: flush failed")

    async def flush(self) -> None:
        """Write what is pending (to the database, else to a spool file), then replay spool
        files if the database took the batch; one flush at a time."""
        async with self._lock:
            batch = list(self._pending)
            self._pending.clear()
            await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[UsageRecord]) -> None:
        inserted = False
        try:
            if not self._migrated:
                self._migrate()
            self.written += ledger_db.insert(self.engine, batch)
            inserted = True
            self._replay()
            if self.retention_days and time.time() - self._purged_at > 3600:
                self._purged_at = time.time()
                removed = ledger_db.purge(self.engine, self.retention_days)
                if removed:
                    log.info("usage ledger: %d records older than %g days removed", removed,
                             self.retention_days)  # fmt: skip
        except Exception as exc:
            if batch and not inserted:
                self._spool(batch)
            now = time.monotonic()
            if now - self._warned_at > 30:  # one line per outage, not one per second
                self._warned_at = now
                log.warning(
                    "usage ledger: database unreachable (%s); records spool to %s until it "
                    "is back", _why(exc), self.spool_dir,
                )  # fmt: skip

    def _spool(self, batch: list[UsageRecord]) -> None:
        path = self.spool_dir / f"spool-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        data = "".join(json.dumps(asdict(r)) + "\n" for r in batch).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.spooled += len(batch)

    def _replay(self) -> None:
        mine = sorted(self.spool_dir.glob(f"claimed-{os.getpid()}-*.jsonl"))  # a failed replay's
        for path in mine + sorted(self.spool_dir.glob("spool-*.jsonl")) + self._stale_claims():
            if not path.exists():
                continue
            prefix = f"claimed-{os.getpid()}-"
            claimed = path
            if not path.name.startswith(prefix):  # a spool file, or a dead process's claim
                claimed = self.spool_dir / f"{prefix}{secrets.token_hex(4)}-{path.name}"
                try:
                    os.rename(path, claimed)  # atomic: one process replays each file
                except FileNotFoundError:
                    continue  # another process claimed it first
            records = [
                UsageRecord.from_dict(json.loads(line))
                for line in claimed.read_text().splitlines()
                if line.strip()
            ]
            for i in range(0, len(records), _REPLAY_BATCH):
                self.written += ledger_db.insert(self.engine, records[i : i + _REPLAY_BATCH])
            claimed.unlink()
            log.info("usage ledger: replayed %d spooled records", len(records))

    def _stale_claims(self) -> list[Path]:
        now = time.time()
        out = []
        for path in self.spool_dir.glob("claimed-*.jsonl"):
            if path.name.startswith(f"claimed-{os.getpid()}-"):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > _CLAIM_STALE_SECONDS:
                    out.append(path)
        return out

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        await asyncio.to_thread(self.engine.dispose)

    # -- reading ----------------------------------------------------------------------------------

    async def summarize(self, **query: Any) -> list[dict[str, Any]]:
        await self.flush()
        return await asyncio.to_thread(ledger_db.summarize, self.engine, **query)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
