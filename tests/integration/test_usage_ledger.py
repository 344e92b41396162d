"""The usage ledger (issue 19, item 1) and the usage API (item 3): one record per finished
request, written in batches to SQLite or PostgreSQL; nothing lost when the database goes away
mid-load; two gateway processes writing to one database; usage grouped per key, team, model,
route, day as JSON or CSV, each key seeing its own."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, start_mock, stop_gateway, wait_until
from tests.integration.pg_helpers import fresh_database, own_postgres

ADMIN, TEAM_A, TEAM_B = "sk-ledger-admin", "sk-ledger-a", "sk-ledger-b"
KEYS = [
    {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
    {"id": "alice", "sha256": hash_key(TEAM_A), "policy": {"team": "red"}},
    {"id": "bob", "sha256": hash_key(TEAM_B), "policy": {"team": "blue"}},
]
PRICES = {"smollm2": {"prompt": 100.0, "completion": 200.0}}  # per million tokens


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)


def usage(
    gw: Gateway, key: str = ADMIN, path: str = "/admin/usage", **params: str
) -> httpx.Response:
    return httpx.get(gw.url + path, params=params, headers={"Authorization": f"Bearer {key}"},
                     timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def gw(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The embedded engine; the ledger on its default database, SQLite."""
    tmp = tmp_path_factory.mktemp("ledger")
    gateway = start_gateway(
        tmp, models=[{"name": "smollm2"}], keys=KEYS, extra={"prices": PRICES},
        env={"RAGLINE_DATABASE_URL": f"sqlite:///{tmp}/usage.db",
             "RAGLINE_USAGE_SPOOL_DIR": str(tmp / "spool")},
    )  # fmt: skip
    yield gateway
    stop_gateway(gateway)


def test_each_request_is_one_record_and_usage_adds_up(gw: Gateway) -> None:
    answers = []
    for key, n in ((TEAM_A, 2), (TEAM_B, 1)):
        for i in range(n):
            answers.append((key, sdk(gw, key).chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                max_tokens=6, temperature=0,
            )))  # fmt: skip
    sdk(gw, TEAM_A).embeddings.create(model="all-MiniLM-L6-v2", input="hello ledger")
    rows = usage(gw, group_by="key_id,team,model,route").json()["data"]
    by = {(r["key_id"], r["route"]): r for r in rows}
    alice = by["alice", "completions"]
    assert alice["team"] == "red" and alice["requests"] == 2 and alice["model"] == "smollm2"
    mine = [a.usage for k, a in answers if k == TEAM_A]
    assert alice["prompt_tokens"] == sum(u.prompt_tokens for u in mine)
    assert alice["completion_tokens"] == sum(u.completion_tokens for u in mine)
    expected = (alice["prompt_tokens"] * 100 + alice["completion_tokens"] * 200) / 1e6
    assert alice["cost"] == pytest.approx(expected)
    assert by["bob", "completions"]["requests"] == 1 and by["bob", "completions"]["team"] == "blue"
    assert by["alice", "embeddings"]["requests"] == 1 and by["alice", "embeddings"]["cost"] == 0
    # CSV, grouped by day
    text = usage(gw, group_by="day", format="csv").text
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert int(row["requests"]) == 4 and len(row["day"]) == 10
    # a time range that excludes everything
    assert usage(gw, group_by="key_id", end="2001-01-01").json()["data"] == []


def test_a_key_sees_its_own_usage_and_only_admins_see_everyones(gw: Gateway) -> None:
    own = usage(gw, TEAM_B, "/v1/usage", group_by="key_id,model").json()["data"]
    assert [r["key_id"] for r in own] == ["bob"]
    assert usage(gw, TEAM_B).status_code == 403  # /admin/usage
    bad = usage(gw, group_by="key_id,password")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    bad = usage(gw, TEAM_A, "/v1/usage", start="yesterday")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"


def _mock_gateway(tmp: Path, mock_url: str, url: str, env: dict[str, str] | None = None) -> Gateway:
    model = {"name": "m", "backend": "openai", "upstreams": [mock_url], "served_model": "mock"}
    return start_gateway(
        tmp, models=[model], keys=KEYS,
        env={"RAGLINE_DATABASE_URL": url, "RAGLINE_USAGE_SPOOL_DIR": str(tmp / "spool"),
             "RAGLINE_USAGE_FLUSH_SECONDS": "0.2", **(env or {})},
    )  # fmt: skip


def _load(gws: list[Gateway], n: int, prefix: str) -> list[str]:
    """n chat requests spread over the gateways; their request ids."""

    def one(i: int) -> str:
        gw = gws[i % len(gws)]
        reply = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"Authorization": f"Bearer {TEAM_A}", "X-Request-Id": f"{prefix}-{i}"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        return f"{prefix}-{i}"

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def _ids_in(url: str) -> list[str]:
    from sqlalchemy import select

    from gateway.ledger_db import engine_for, usage

    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            return [r[0] for r in connection.execute(select(usage.c.request_id))]
    finally:
        engine.dispose()


def test_two_gateway_processes_write_to_one_postgres_database(tmp_path: Path) -> None:
    mock = start_mock(tmp_path, model="mock", reply="ok", finish="stop")
    with fresh_database() as url:
        gws = [_mock_gateway(tmp_path, mock.url, url) for _ in range(2)]
        try:
            sent = _load(gws, 60, "two")
            for gw in gws:  # the usage API flushes what each process holds
                assert usage(gw).status_code == 200
            assert wait_until(lambda: len(_ids_in(url)) == 60, timeout=30)
            ids = _ids_in(url)
            assert sorted(ids) == sorted(sent)  # every request once, from both processes
        finally:
            for gw in gws:
                stop_gateway(gw)
    mock.kill()


def test_the_database_going_away_mid_load_loses_no_record(tmp_path: Path) -> None:
    """PostgreSQL stopped (immediate mode, as if killed) while requests keep coming: records
    spool to a file and are replayed when it is back; each request is in the ledger once."""
    mock = start_mock(tmp_path, model="mock", reply="ok", finish="stop")
    with own_postgres() as pg:
        gw = _mock_gateway(tmp_path, mock.url, pg.url)
        try:
            before = _load([gw], 40, "before")
            assert wait_until(lambda: len(_ids_in(pg.url)) == 40, timeout=30)
            pg.stop()
            during = _load([gw], 80, "during")  # served while the database is down
            spool = tmp_path / "spool"
            assert wait_until(lambda: any(spool.glob("spool-*.jsonl")), timeout=30)
            assert "database unreachable" in gw.logs()
            pg.start()
            after = _load([gw], 20, "after")
            assert wait_until(lambda: len(_ids_in(pg.url)) == 140, timeout=60), gw.logs()[-2000:]
            assert sorted(_ids_in(pg.url)) == sorted(before + during + after)
            assert wait_until(lambda: not any(spool.glob("*.jsonl")), timeout=30)
        finally:
            stop_gateway(gw)
    mock.kill()
