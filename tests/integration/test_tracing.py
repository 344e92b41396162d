"""OpenTelemetry (issue 19, item 5): a span per pipeline stage under the request's server span,
continuing the client's W3C trace, the backend span with a first_token event, and traceparent
sent on to the upstream; with tracing off, the client's traceparent still reaches the upstream
unchanged. The gateway runs in this process (an in-memory exporter); the upstream is a loopback
server that records the headers it is sent (it isolates what the gateway forwards)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from gateway.app import create_app
from gateway.config import FileConfig, OpenAIModelConfig, Settings
from tests.conftest import free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"


class Upstream(ThreadingHTTPServer):
    seen: list[dict[str, str]]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def do_GET(self) -> None:  # noqa: N802
        self._send(200, b'{"object": "list", "data": [{"id": "mock", "object": "model"}]}')

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "mock",
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "Hi there"}}],
                      "usage": usage}  # fmt: skip
            self._send(200, json.dumps(answer).encode())
            return
        events = []
        for text in ("Hi", " there"):
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "mock",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            events.append(chunk)  # fmt: skip
        events.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "mock",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": usage})  # fmt: skip
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        data += b"data: [DONE]\n\n"
        self._send(200, data, "text/event-stream")

    def _send(self, status: int, data: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream(("127.0.0.1", free_port()), Handler)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def gateway_url(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tracing")
    port = free_port()
    settings = Settings(port=port, rag_dir=tmp / "rag", usage_ledger=False)
    model = OpenAIModelConfig(
        name="m", backend="openai", served_model="mock",
        upstreams=[f"http://127.0.0.1:{upstream.server_address[1]}"],
    )  # fmt: skip
    config = FileConfig(models=[model])
    server = uvicorn.Server(uvicorn.Config(create_app(settings, config), port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling the readiness probe
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install([SimpleSpanProcessor(exporter)])
    yield exporter
    tracing.uninstall()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                         default_headers={"traceparent": CLIENT_TRACEPARENT})  # fmt: skip


def test_a_span_per_stage_in_the_clients_trace(gateway_url: str, upstream: Upstream,
                                               spans: InMemorySpanExporter) -> None:  # fmt: skip
    upstream.seen.clear()
    _client(gateway_url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    server = by_name["POST /v1/chat/completions"]
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT
    assert server.attributes["http.response.status_code"] == 200
    stages = ["authenticate", "admission", "input_safety", "retrieval", "rendering", "cache",
              "backend", "output_safety"]  # fmt: skip
    for name in stages:
        stage = by_name[name]
        assert stage.context.trace_id == server.context.trace_id, name
        assert stage.parent is not None and stage.parent.span_id == server.context.span_id, name
    # the upstream was called inside the backend span, and told so
    (headers,) = upstream.seen
    version, trace, parent, _ = headers["traceparent"].split("-")
    assert trace == TRACE_ID and parent == format(by_name["backend"].context.span_id, "016x")


def test_a_stream_has_a_first_token_event(gateway_url: str, upstream: Upstream,
                                          spans: InMemorySpanExporter) -> None:  # fmt: skip
    stream = _client(gateway_url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hi there"
    backend = next(s for s in spans.get_finished_spans() if s.name == "backend")
    assert [e.name for e in backend.events] == ["first_token"]
    assert backend.events[0].attributes["ragline.ttft_ms"] > 0
    assert format(backend.context.trace_id, "032x") == TRACE_ID


def test_off_no_spans_and_the_clients_traceparent_passes_through(
    gateway_url: str, upstream: Upstream
) -> None:
    assert not tracing.enabled()
    upstream.seen.clear()
    _client(gateway_url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert upstream.seen[0]["traceparent"] == CLIENT_TRACEPARENT
    upstream.seen.clear()
    httpx.post(gateway_url + "/v1/chat/completions",
               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert "traceparent" not in upstream.seen[0]  # none sent, none made up
