"""Replica failover, ejection and re-admission, and mid-stream failures.

These isolate the gateway with the fake upstream (``benchmarks.mock_upstream``), killing real
processes: what is under test is the gateway's behaviour when an upstream dies.
"""

from __future__ import annotations

import json
import signal

import httpx
import openai
import pytest

from tests.conftest import start_gateway, start_mock, stop_gateway, wait_until

MODEL = "smollm2"
MSG = [{"role": "user", "content": "hi"}]
FAST_HEALTH = {"interval": 0.2, "timeout": 0.5, "max_failures": 2, "eject_seconds": 0.5}


def vllm_model(*urls: str) -> list[dict[str, object]]:
    return [{"name": MODEL, "backend": "vllm", "upstreams": list(urls), "health": FAST_HEALTH}]


def healthy(gw) -> int:  # type: ignore[no-untyped-def]
    return int(httpx.get(gw.url + "/ready").json()["models"][MODEL]["healthy"])


def test_requests_keep_succeeding_when_a_replica_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = start_mock(tmp_path), start_mock(tmp_path)
    gw = start_gateway(tmp_path, models=vllm_model(a.url, b.url))
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
        assert wait_until(lambda: healthy(gw) == 2)
        for _ in range(10):
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        a.kill()  # a real process dies mid-test; nothing tells the gateway
        answers = [
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
            for _ in range(30)
        ]
        assert all(r.choices[0].message.content == " tok tok tok" for r in answers)
        streamed = [
            "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model=MODEL, messages=MSG, max_tokens=3, stream=True
                )
                if c.choices
            )
            for _ in range(10)
        ]
        assert streamed == [" tok tok tok"] * 10
        assert healthy(gw) == 1
    finally:
        stop_gateway(gw)
        b.kill()


def test_no_healthy_replica_is_503_with_retry_after_and_recovery(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = start_mock(tmp_path)
    port = int(a.url.rsplit(":", 1)[1])
    gw = start_gateway(tmp_path, models=vllm_model(a.url))
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        a.kill()
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "no_healthy_upstream"
        # once the health check has ejected it too, the answer is the same (not "not ready")
        assert wait_until(lambda: healthy(gw) == 0, timeout=20)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert info.value.status_code == 503 and info.value.body["code"] == "no_healthy_upstream"
        # the replica comes back on the same port: the health check re-admits it
        a = start_mock(tmp_path, port=port)
        assert wait_until(lambda: healthy(gw) == 1, timeout=20)
        r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert r.choices[0].message.content == " tok tok"
    finally:
        stop_gateway(gw)
        a.kill()


def test_stream_broken_after_first_byte_ends_with_an_error_not_a_replay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    slow = start_mock(tmp_path, tokens_per_s=20)
    spare = start_mock(tmp_path)
    gw = start_gateway(tmp_path, models=vllm_model(slow.url, spare.url))
    try:
        # Pin the stream to the slow replica: the spare is frozen (its health check times out)
        # until the stream is under way, then it is back, ready for a (wrong) replay.
        spare.process.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: healthy(gw) == 1, timeout=20)
        body = {"model": MODEL, "messages": MSG, "max_tokens": 200, "stream": True}
        events: list[dict] = []  # type: ignore[type-arg]
        tail: list[str] = []
        with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    tail.append(line)
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    spare.process.send_signal(signal.SIGCONT)
                    assert wait_until(lambda: healthy(gw) == 2, timeout=20)
                    slow.kill()  # the upstream dies after the client has seen bytes
        assert tail == ["data: [DONE]"]
        assert "error" in events[-1] and "upstream" in events[-1]["error"]["message"]
        chunks = [e for e in events if "choices" in e]
        roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
        assert len(roles) == 1, "the stream must not restart on another replica"
        assert len({c["id"] for c in chunks}) == 1
        # the output guard (safety) may merge deltas; count the mock's tokens in the text
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert 2 <= text.count(" tok") < 200
    finally:
        stop_gateway(gw)
        spare.process.send_signal(signal.SIGCONT)
        spare.kill()


def test_adapter_placement_is_shared_through_redis(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import redis

    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in r.scan_iter("ragline:lora:*"):
        r.delete(key)
    upstream = start_mock(tmp_path)
    models = vllm_model(upstream.url)
    adapters = [{"name": "tuned", "path": "/adapters/tuned", "base": MODEL}]
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0"}
    one = start_gateway(tmp_path, models=models, adapters=adapters, env=env)
    two = start_gateway(tmp_path, models=models, adapters=adapters, env=env)
    try:
        for gw in (one, two, one, two):
            client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
            r_ = client.chat.completions.create(model="tuned", messages=MSG, max_tokens=2)
            assert r_.model == "tuned"
        metrics = httpx.get(upstream.url + "/metrics").text
        assert "mock_lora_loads_total 1" in metrics, "the second gateway must reuse the placement"
        assert r.smembers(f"ragline:lora:{MODEL}:tuned") == {upstream.url.encode()}
    finally:
        stop_gateway(one)
        stop_gateway(two)
        upstream.kill()


def test_first_token_timeout_moves_on_then_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    slow = start_mock(tmp_path, ttft_ms=5000)
    fast = start_mock(tmp_path)
    models = [
        {
            "name": MODEL,
            "backend": "vllm",
            "upstreams": [slow.url, fast.url],
            "health": FAST_HEALTH,
            "timeouts": {"first_token": 0.5},
        }
    ]
    gw = start_gateway(tmp_path, models=models)
    try:
        client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
        # every request succeeds: one stuck on the slow replica times out and moves on
        streams = [
            list(
                client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, stream=True)
            )
            for _ in range(4)
        ]
        assert all(s[-1].choices[0].finish_reason == "length" for s in streams)
        fast.kill()
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, stream=True)
        assert info.value.status_code == 503
        assert "timed out" in info.value.body["message"] or "answer" in info.value.body["message"]
    finally:
        stop_gateway(gw)
        slow.kill()
