"""Redis going away and coming back; graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import free_port, start_gateway, stop_gateway, wait_until

MODEL = "smollm2"
MSG = [{"role": "user", "content": "Say yes."}]
KEY = "sk-faults-123456"
KEYS = [{"id": "faults", "sha256": hash_key(KEY), "policy": {"rpm": 1000}}]


def start_redis(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    assert server, "redis-server must be installed (the CI machine has it)"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}", timeout=0.2) is not None
        except httpx.RemoteProtocolError:
            return True  # something speaks on the port: Redis answered (not HTTP)
        except httpx.TransportError:
            return False

    assert wait_until(up, timeout=10)
    return proc


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_outage_fails_as_configured_and_recovers(model_path, tmp_path, mode) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    redis_proc = start_redis(port)
    gw = start_gateway(
        tmp_path,
        models=[{"name": MODEL}],
        keys=KEYS,
        env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "RAGLINE_REDIS_FAILURE": mode},
    )
    c = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=60)
    try:
        assert c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices
        redis_proc.kill()
        redis_proc.wait()
        if mode == "closed":
            with pytest.raises(openai.APIStatusError) as info:
                c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
            assert info.value.status_code == 503
            assert info.value.body["code"] == "rate_limiter_unavailable"
            assert "Redis" in info.value.body["message"]
        else:
            r = c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
            assert r.parse().choices[0].message.content is not None
            assert "x-ratelimit-limit-requests" not in r.headers  # limits skipped, not faked
        redis_proc = start_redis(port)  # Redis comes back: the gateway recovers by itself
        r = c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
        assert r.headers["x-ratelimit-limit-requests"] == "1000"
    finally:
        stop_gateway(gw)
        redis_proc.kill()


def test_sigterm_lets_in_flight_streams_finish(model_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, models=[{"name": MODEL}])
    body = {
        "model": MODEL,
        "messages": MSG,
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines: list[str] = []
    try:
        with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    gw.process.send_signal(signal.SIGTERM)
                    # no new connections once shutdown started
                    assert wait_until(lambda: _refused(gw.url), timeout=10)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == 60, "the stream in flight finished all its tokens"
        # uvicorn re-raises the signal once its graceful shutdown is complete
        assert gw.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gw.logs()
    finally:
        if gw.process.poll() is None:
            stop_gateway(gw)


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=0.5)
        return False
    except httpx.TransportError:
        return True
