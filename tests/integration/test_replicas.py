"""Replicas that agree: two gateway processes in front of one real vLLM, sharing Redis, one
PostgreSQL usage ledger and one stores directory (what deploy/compose.yaml and the Helm chart
run), with ``ragline ingest`` writing stores from a third process. Checked: both gateways serve
a new store version on their very next request after the ingest exits (stores are re-read when
their CURRENT file changes, so the watch interval is one request), a rate limit stays exact across
both, and a gateway stopped mid-stream (SIGTERM, as Kubernetes and Compose stop it) finishes
what it was sending and records it, while a gateway killed outright cuts the stream visibly and
the other one serves the retry."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import REPO, Gateway, Upstream, start_gateway, stop_gateway
from tests.integration.pg_helpers import fresh_database

ADMIN, USER = "sk-replicas-admin", "sk-replicas-user"
REDIS = "redis://127.0.0.1:6379/0"
RPM = 6
# SmolLM2 writes a long answer to this: the stream is still running when the gateway is stopped.
# The same prompt every run (greedy decoding gives the same long answer; a prompt made unique
# with a timestamp once drew a two-line answer), sent with Cache-Control: no-cache so that no
# cached answer is replayed at once, with nothing left to stop.
NUMBERS = "Write the numbers from 1 to 200, separated by commas."
NO_CACHE = {"Cache-Control": "no-cache"}


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
def replicas(
    vllm: Upstream, database: str, tmp_path: Path
) -> Iterator[tuple[list[Gateway], dict[str, str]]]:
    """Two gateways on one stores directory, Redis and ledger; a fresh key id per test, so that
    each test starts with an empty rate-limit bucket."""
    user_id = f"user-{time.time_ns()}"
    keys = [
        {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
        {"id": user_id, "sha256": hash_key(USER), "policy": {"rpm": RPM}},
    ]
    env = {
        "REDIS_URL": REDIS,
        "RAGLINE_RAG_DIR": str(tmp_path / "rag"),
        "RAGLINE_DATABASE_URL": database,
        "RAGLINE_USAGE_FLUSH_SECONDS": "0.2",
        "RAGLINE_SHUTDOWN_GRACE": "60",
        "RAGLINE_ADAPTERS_FILE": str(tmp_path / "adapters.json"),
    }
    model = {"name": "smollm2", "backend": "vllm", "upstreams": [vllm.url]}
    gws: list[Gateway] = []
    try:
        for i in range(2):
            spool = {"RAGLINE_USAGE_SPOOL_DIR": str(tmp_path / f"spool-{i}")}
            gws.append(start_gateway(tmp_path, models=[model], keys=keys, env={**env, **spool}))
        yield gws, {**env, "user_id": user_id}
    finally:
        for gw in gws:
            if gw.process.poll() is None:
                stop_gateway(gw)


def sdk(gw: Gateway, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)


def ingest(env: dict[str, str], path: Path) -> str:
    """``ragline ingest`` in its own process, as an operator's job would run it."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", str(path), "--store", "handbook",
         "--rag-dir", env["RAGLINE_RAG_DIR"]],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def store_on(gw: Gateway) -> Any:
    [store] = [s for s in sdk(gw).vector_stores.list().data if s.name == "handbook"]
    return store


def top_hit(gw: Gateway, store_id: str, query: str) -> str:
    page = sdk(gw).vector_stores.search(store_id, query=query, max_num_results=1)
    return page.data[0].content[0].text


def test_every_gateway_serves_a_new_store_version_on_its_next_request(
    replicas: Any, tmp_path: Path
) -> None:
    gws, env = replicas
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "wifi.md").write_text(
        "# Wifi\nThe office wifi password is rotated on the first Monday of every month.\n"
    )
    ingest(env, docs)
    first = [store_on(gw) for gw in gws]
    assert {s.id for s in first} == {first[0].id}
    assert [s.model_extra["ragline"]["version"] for s in first] == [1, 1]
    assert all(
        "wifi" in top_hit(gw, first[0].id, "When does the wifi password change?") for gw in gws
    )

    (docs / "garage.md").write_text(
        "# Garage\nThe parking garage under building C closes at 23:00 on weekdays.\n"
    )
    ingest(env, docs)
    # no waiting, no polling: the next request on each gateway sees version 2
    second = [store_on(gw) for gw in gws]
    assert [s.model_extra["ragline"]["version"] for s in second] == [2, 2]
    assert [s.model_extra["ragline"]["documents"] for s in second] == [2, 2]
    for gw in gws:
        assert "garage" in top_hit(gw, first[0].id, "What time does the parking garage close?")


def test_a_rate_limit_is_exact_across_both_gateways(replicas: Any) -> None:
    gws, _ = replicas

    async def one(i: int) -> int:
        async with httpx.AsyncClient(timeout=120) as client:
            reply = await client.post(
                gws[i % 2].base_url + "/chat/completions",
                headers={"Authorization": f"Bearer {USER}"},
                json={"model": "smollm2", "max_tokens": 1,
                      "messages": [{"role": "user", "content": f"Say {i}."}]},
            )  # fmt: skip
            return reply.status_code

    async def burst() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(3 * RPM)))

    started = time.monotonic()
    statuses = asyncio.run(burst())
    refill = int((time.monotonic() - started) * RPM / 60)  # tokens the bucket regained meanwhile
    assert statuses.count(200) + statuses.count(429) == 3 * RPM, statuses
    assert RPM <= statuses.count(200) <= RPM + refill, statuses
    # each gateway refused some: neither kept a bucket of its own
    by_gateway = [statuses[i::2] for i in range(2)]
    assert all(429 in part for part in by_gateway), by_gateway


def _ledger_row(url: str, request_id: str) -> Any:
    from sqlalchemy import select

    from gateway.ledger_db import engine_for, usage

    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            query = select(usage.c.completion_tokens, usage.c.status).where(
                usage.c.request_id == request_id
            )
            return connection.execute(query).first()
    finally:
        engine.dispose()


def test_a_gateway_stopped_mid_stream_finishes_it_and_records_it(
    replicas: Any, database: str
) -> None:
    gws, _ = replicas
    stopping, other = gws
    stream = sdk(stopping).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": NUMBERS}],
        max_tokens=200, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Request-Id": "replica-drain-1", **NO_CACHE},
    )  # fmt: skip
    chunks = iter(stream)
    text = [next(chunks).choices[0].delta.content or ""]
    stopping.process.send_signal(signal.SIGTERM)  # what a rolling update sends
    finish, usage = None, None
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert finish in ("stop", "length") and usage is not None
    # it left once the stream was done (uvicorn re-raises the SIGTERM it handled: -15)
    assert stopping.process.wait(timeout=90) in (0, -signal.SIGTERM)
    assert "Waiting for connections to close" in stopping.logs()
    # the whole answer reached the client, and the ledger has it as the client saw it
    answer = "".join(text)
    assert len(answer) > 100 and usage.completion_tokens > 20
    row = _ledger_row(database, "replica-drain-1")
    assert row is not None and row.status == 200
    assert row.completion_tokens == usage.completion_tokens
    # the stopped gateway takes nothing new; the other one serves
    with pytest.raises(httpx.TransportError):
        httpx.get(stopping.url + "/health", timeout=5)
    reply = sdk(other).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert reply.choices[0].message.content


def test_a_gateway_killed_mid_stream_cuts_it_visibly_and_the_other_serves_the_retry(
    replicas: Any,
) -> None:
    gws, _ = replicas
    killed, other = gws
    request = {
        "model": "smollm2",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": NUMBERS}],
    }
    received: list[str] = []
    auth = {"Authorization": f"Bearer {ADMIN}", **NO_CACHE}
    url = killed.base_url + "/chat/completions"
    with (
        pytest.raises(httpx.RemoteProtocolError),  # never a stream that looks finished
        httpx.stream("POST", url, json=request, headers=auth, timeout=120) as reply,
    ):
        assert reply.status_code == 200
        for line in reply.iter_lines():
            received.append(line)
            if len(received) == 2:
                killed.process.send_signal(signal.SIGKILL)
    assert received and not any('"finish_reason":"' in line for line in received)
    assert "data: [DONE]" not in received
    retry = sdk(other).chat.completions.create(
        model="smollm2", messages=request["messages"], max_tokens=8, temperature=0
    )  # type: ignore[arg-type]
    assert retry.choices[0].finish_reason in ("stop", "length")
