"""A client that stops reading its stream cannot take the upstream down with it: the stream is
closed after the send timeout (freeing the upstream connection), a request that finds every
pooled connection busy gets a 503 without the replica being ejected, and health checks run on
connections of their own. Fault injection: the mock upstream, one pooled connection."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx

from tests.conftest import start_gateway, start_mock, stop_gateway, wait_until


def running(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    match = re.search(r"^vllm:num_requests_running (\d+)", text, re.M)
    assert match
    return int(match.group(1))


def test_a_stalled_reader_is_cut_off_and_never_ejects_the_replica(tmp_path: Path) -> None:
    mock = start_mock(tmp_path, output_tokens=400_000)  # far more than the socket buffers hold
    model = {
        "name": "smollm2",
        "backend": "vllm",
        "upstreams": [mock.url],
        "max_connections": 1,
        "timeouts": {"pool_wait": 0.5},
        # one failed check ejects; a generous timeout, so that only a check that cannot get
        # through (not a machine slowed by other work) could fail one
        "health": {"interval": 0.2, "max_failures": 1, "timeout": 10},
    }
    gw = start_gateway(
        tmp_path,
        models=[model],
        env={"RAGLINE_SEND_TIMEOUT": "3", "RAGLINE_MAX_COMPLETION_TOKENS": "400000"},
    )
    stalled = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    try:
        body = (
            b'{"model":"smollm2","messages":[{"role":"user","content":"go"}],'
            b'"stream":true,"max_tokens":400000}'
        )
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )  # and never read a byte of the answer
        assert wait_until(lambda: running(mock.url) == 1, timeout=20)
        # the only pooled connection is held: a second request waits, then gets a 503...
        busy = httpx.post(
            gw.base_url + "/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert busy.status_code == 503
        # ...while the replica stays in rotation: its health checks have their own connection
        assert httpx.get(gw.url + "/ready").status_code == 200
        # the stalled stream is closed after the send timeout, and the upstream with it
        assert wait_until(lambda: running(mock.url) == 0, timeout=60)
        ok = httpx.post(
            gw.base_url + "/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 4},
            timeout=30,
        )  # fmt: skip
        assert ok.status_code == 200
    finally:
        stalled.close()
        stop_gateway(gw)
        mock.kill()
