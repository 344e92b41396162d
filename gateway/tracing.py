"""OpenTelemetry traces (issue 19, item 5): a server span per API request, a child span per
pipeline stage (authenticate, admission, input safety, retrieval, rendering, cache, backend
with a ``first_token`` event, output safety), W3C ``traceparent`` taken from the client and
sent on to vLLM and other upstreams.

Off by default, at no cost: tracing is on only when the standard variables ask for an exporter
(``OTEL_TRACES_EXPORTER=otlp|console``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not ``true``; the OTLP
exporter reads the rest of ``OTEL_*`` itself (headers, protocol, timeouts, service name). Off,
every ``span()`` is one shared no-op context manager, and a client's ``traceparent`` is still
passed through to the upstream unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("ragline.tracing")
_NOOP = contextlib.nullcontext()
_tracer: Any = None
# the client's own trace headers, passed through when tracing is off
incoming: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "ragline_trace_headers", default=None
)


def enabled() -> bool:
    return _tracer is not None


def configure_from_environment() -> bool:
    """Turn tracing on if the ``OTEL_*`` variables ask for it; True when on."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if exporters in ("", "none") and not endpoint:
        return False
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    chosen: list[SpanExporter] = []
    for name in [e.strip() for e in (exporters or "otlp").split(",") if e.strip()]:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen.append(OTLPSpanExporter())
        elif name == "console":
            chosen.append(ConsoleSpanExporter())
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console); ignored", name)
    install([BatchSpanProcessor(e) for e in chosen])
    log.info("OpenTelemetry tracing on: %s", exporters or "otlp")
    return True


def install(processors: list[Any]) -> Any:
    """Trace through a new provider with these span processors (tests: an in-memory one)."""
    global _tracer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    name = os.environ.get("OTEL_SERVICE_NAME", "ragline")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    for processor in processors:
        provider.add_span_processor(processor)
    _tracer = provider.get_tracer("ragline")
    return provider


def uninstall() -> None:
    global _tracer
    _tracer = None


def span(name: str, **attributes: Any) -> Any:
    """A child span of the current one (``with tracing.span("admission"):``); a no-op when off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def start(name: str, **attributes: Any) -> Any:
    """A span ended by the caller (``.end()``): the backend span of a stream. None when off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes=attributes or None)


@contextlib.contextmanager
def server_span(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Iterator[Any]:
    """The request's span, continuing the client's trace (W3C ``traceparent``); when tracing is
    off, only remembers the client's trace headers to pass them on."""
    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name in (b"traceparent", b"tracestate")
    }
    if _tracer is None:
        token = incoming.set(carrier or None)
        try:
            yield None
        finally:
            incoming.reset(token)
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    context = extract(carrier)
    attributes = {"http.request.method": method, "url.path": path}
    with _tracer.start_as_current_span(
        f"{method} {path}", context=context, kind=SpanKind.SERVER, attributes=attributes
    ) as current:
        yield current


def outgoing_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the trace headers an upstream call carries: the current span's (on), or the client's
    own, unchanged (off)."""
    if _tracer is not None:
        from opentelemetry.propagate import inject

        inject(headers)
    else:
        passed = incoming.get()
        if passed:
            headers.update(passed)
    return headers
