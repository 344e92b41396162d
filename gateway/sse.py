"""Server-sent events exactly as OpenAI sends them: ``data: {json}\\n\\n`` ... ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from gateway.errors import RaglineError, error_body

DONE = b"data: [DONE]\n\n"


def sse_event(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error event for a stream that already started (the status line is long gone)."""
    if isinstance(exc, RaglineError):
        body = exc.body()
    else:
        body = error_body("The server had an error while streaming the response.", "server_error")
    return sse_event(json.dumps(body))


async def guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Turn an exception after the first byte into an error event followed by ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # the client gets the error in-band; the log gets the traceback
        import logging

        logging.getLogger("ragline.stream").exception("stream failed")
        yield sse_error(exc)
        yield DONE
