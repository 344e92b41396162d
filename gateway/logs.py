"""Structured logs: JSON lines with the request id; an access log per request; an audit log.

Prompts and completions are never logged unless ``RAGLINE_LOG_PROMPTS=true`` asks for it; keys
never are (only key ids).
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

access = logging.getLogger("ragline.access")
audit = logging.getLogger("ragline.audit")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class BatchingHandler(logging.StreamHandler):
    """A stream handler that can hold its writes: inside ``batch()`` lines go to a buffer and
    reach the stream in one write at the end (warnings and worse at once); outside, each line is
    written as it comes, as ``StreamHandler`` does."""

    holding = 0

    def flush(self) -> None:
        if not self.holding:
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.holding and record.levelno >= logging.WARNING:
            self.drain()

    def drain(self) -> None:
        """Write what is held (``Handler.release`` is the lock's: not overridden)."""
        self.acquire()
        try:
            self.stream.flush()
        finally:
            self.release()


@contextmanager
def batch() -> Iterator[None]:
    """Write the lines logged inside in one go (the access lines of a batch of responses)."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, BatchingHandler)]
    for handler in handlers:
        handler.holding += 1
    try:
        yield
    finally:
        for handler in handlers:
            handler.holding -= 1
            if not handler.holding:
                handler.drain()


def configure(level: str, fmt: str) -> None:
    # the logging HOWTO's optimisations: no caller lookup (a stack walk per record), no thread
    # or multiprocessing names; none of them is in our lines
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # stderr itself is line-buffered (one write per line): a buffered writer on its descriptor
    stream = io.TextIOWrapper(
        open(sys.stderr.fileno(), "wb", buffering=1 << 16, closefd=False),  # noqa: SIM115
        encoding="utf-8",
        errors="backslashreplace",
    )
    handler = BatchingHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def audit_event(event: str, **fields: Any) -> None:
    """An audit record (admin actions, safety blocks): ids and types only, never raw values."""
    audit.info(event, extra={"fields": {"event": event, **fields}})


def access_log(
    request_id: str,
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    key_id: str | None,
    fields: dict[str, Any] | None,
) -> None:
    """One line per request: id, method, path, status, duration, key id, model, tokens."""
    if access.isEnabledFor(logging.INFO):
        record = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration_ms, 2),
            "key_id": key_id,
            **(fields or {}),
        }
        access.info("request", extra={"fields": record})
