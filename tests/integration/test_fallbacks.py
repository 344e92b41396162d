"""Fallbacks: a model names other models to try, in order, before the first byte reaches the
client. Fault injection, so the upstreams are the mock (two processes killed on purpose) and, for
the 4xx case, a real ragline serving the embedded engine."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Gateway, Upstream, start_gateway, start_mock, stop_gateway

MSG = [{"role": "user", "content": "hi"}]
PRIMARY = "from the primary, " * 20  # 60 pieces at 40/s: a stream that takes its time


def served_requests(mock: Upstream) -> int:
    text = httpx.get(mock.url + "/metrics").text
    match = re.search(r"^mock_requests_total (\d+)", text, re.M)
    assert match
    return int(match.group(1))


def fallbacks_counted(gw: Gateway) -> float:
    text = httpx.get(gw.url + "/metrics").text
    match = re.search(
        r'^ragline_fallbacks_total\{model="primary",to="spare"\} ([0-9.]+)', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def models(primary: str, spare: str) -> list[dict[str, object]]:
    # health checks far apart: the request itself must find the primary dead
    health = {"path": "/health", "interval": 60}
    common = {"backend": "openai", "served_model": "smollm2", "health": health}
    return [
        {"name": "primary", "upstreams": [primary], "fallbacks": ["spare"], **common},
        {"name": "spare", "upstreams": [spare], **common},
    ]


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[Gateway, Upstream, Upstream]]:
    first = start_mock(tmp_path, reply=PRIMARY, tokens_per_s=40)
    second = start_mock(tmp_path, reply="from the spare")
    gw = start_gateway(
        tmp_path, models=models(first.url, second.url), extra={"safety": {"enabled": False}}
    )
    yield gw, first, second
    stop_gateway(gw)
    first.kill()
    second.kill()


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=60)


def test_a_dead_backend_falls_back_before_the_first_byte(pair) -> None:  # type: ignore[no-untyped-def]
    gw, first, second = pair
    raw = sdk(gw).chat.completions.with_raw_response.create(model="primary", messages=MSG)
    assert raw.parse().choices[0].message.content == PRIMARY
    assert "x-ragline-backend" not in raw.headers
    first.kill()
    raw = sdk(gw).chat.completions.with_raw_response.create(model="primary", messages=MSG)
    answer = raw.parse()
    assert answer.choices[0].message.content == "from the spare"
    assert answer.model == "primary"  # the name the client asked for
    assert raw.headers["x-ragline-backend"] == "spare"
    chunks = list(sdk(gw).chat.completions.create(model="primary", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "from the spare"
    )
    assert fallbacks_counted(gw) >= 2 and served_requests(second) == 2


def test_no_fallback_once_the_stream_started(pair) -> None:  # type: ignore[no-untyped-def]
    gw, first, second = pair
    body = {"model": "primary", "messages": MSG, "stream": True, "max_tokens": 64}
    events: list[dict[str, object]] = []
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 2:  # the role chunk, then the first text: the client has bytes
                first.kill()
    assert "error" in events[-1]  # the stream ends with an error event, never a replay
    assert served_requests(second) == 0 and fallbacks_counted(gw) == 0


def test_a_client_error_does_not_fall_back(model_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    upstream = start_gateway(tmp_path, models=[{"name": "smollm2"}])
    spare = start_mock(tmp_path, reply="from the spare")
    gw = start_gateway(tmp_path, models=models(upstream.base_url, spare.url))
    try:
        with pytest.raises(
            openai.BadRequestError
        ) as info:  # too long for the context (2,048 tokens)
            sdk(gw).chat.completions.create(model="primary", messages=MSG, max_tokens=5000)
        assert info.value.body["code"] == "context_length_exceeded"  # the upstream's own error
        assert served_requests(spare) == 0 and fallbacks_counted(gw) == 0
        ok = sdk(gw).chat.completions.create(model="primary", messages=MSG, max_tokens=4)
        assert ok.choices[0].message.content  # the real model behind the primary answers
    finally:
        stop_gateway(gw)
        stop_gateway(upstream)
        spare.kill()
