"""Structured logs: JSON lines with the request id; an access log per request; an audit log.

Prompts and completions are never logged unless ``RAGLINE_LOG_PROMPTS=true`` asks for it; keys
never are (only key ids).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access = logging.getLogger("ragline.access")
audit = logging.getLogger("ragline.audit")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
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


class AccessLogMiddleware:
    """One JSON line per request: id, method, path, status, duration, key id, model, tokens."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if access.isEnabledFor(logging.INFO):
                state = scope.get("state", {})
                principal = state.get("principal")
                fields = {
                    "request_id": state.get("request_id"),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "key_id": getattr(principal, "key_id", None),
                    **state.get("log_fields", {}),
                }
                access.info("request", extra={"fields": fields})
