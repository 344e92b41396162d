"""Budgets (issue 19, item 2): token and cost budgets per key and team, per day and month,
exact across two gateway processes sharing Redis; 429 budget_exceeded naming the budget and its
reset; x-ratelimit-*-budget headers; the soft threshold's warning, metric and webhook; the admin
routes. The upstream is the mock (fixed usage per answer), to isolate the gateway's arithmetic."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from gateway.auth import hash_key
from tests.conftest import free_port, start_gateway, start_mock, stop_gateway, wait_until

REDIS = "redis://127.0.0.1:6379/0"
RUN = str(time.time_ns())[-9:]  # counters are per key id and day: fresh ids per run
ADMIN, ALICE, BOB, CAROL = "sk-budget-admin", "sk-budget-alice", "sk-budget-bob", "sk-budget-c"
DAVE, ERIN = "sk-budget-dave", "sk-budget-erin"


def _ask(url: str, key: str, max_tokens: int = 20) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": max_tokens},
        timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hook() -> object:
    """A webhook receiver on loopback, recording what it is sent."""
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], received
    server.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, hook: object):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("budgets")
    port, _ = hook  # type: ignore[misc]
    mock = start_mock(tmp, model="mock", finish="length")
    keys = [
        {"id": f"ops-{RUN}", "sha256": hash_key(ADMIN), "admin": True},
        {"id": f"alice-{RUN}", "sha256": hash_key(ALICE),
         "policy": {"budget": {"tokens_per_day": 600}}},
        {"id": f"bob-{RUN}", "sha256": hash_key(BOB), "policy": {"team": f"blue-{RUN}"}},
        {"id": f"carol-{RUN}", "sha256": hash_key(CAROL), "policy": {"team": f"blue-{RUN}"}},
        {"id": f"dave-{RUN}", "sha256": hash_key(DAVE)},
        {"id": f"erin-{RUN}", "sha256": hash_key(ERIN),
         "policy": {"budget": {"tokens_per_day": 40}}},
    ]  # fmt: skip
    extra = {
        "teams": {f"blue-{RUN}": {"budget": {
            "cost_per_month": 0.01, "soft": 0.5, "webhook": f"http://127.0.0.1:{port}/hook"}}},
        "prices": {"m": {"prompt": 100.0, "completion": 100.0}},  # $0.0001 per token
    }  # fmt: skip
    model = {"name": "m", "backend": "openai", "upstreams": [mock.url], "served_model": "mock"}
    gws = [
        start_gateway(tmp, models=[model], keys=keys, extra=extra,
                      env={"REDIS_URL": REDIS, "RAGLINE_USAGE_LEDGER": "false"})
        for _ in range(2)
    ]  # fmt: skip
    yield gws
    for gw in gws:
        stop_gateway(gw)
    mock.kill()


def test_a_key_budget_holds_exactly_across_two_processes(pair) -> None:  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: _ask(pair[i % 2].url, ALICE), range(60)))
    served = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert served and refused and len(served) + len(refused) == 60
    used = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert used <= 600  # never overdrawn, whichever process served
    admin = {"Authorization": f"Bearer {ADMIN}"}
    status = httpx.get(pair[1].url + f"/admin/budgets/key/alice-{RUN}", headers=admin).json()
    day = next(u for u in status["usage"] if u["period"] == "day")
    assert day["used"] == str(used)  # settled to what the answers used, exactly
    error = refused[0].json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    assert f"daily token budget of key 'alice-{RUN}' (600)" in error["message"]
    assert "resets at" in error["message"] and refused[0].headers["retry-after"]
    assert refused[0].headers["x-ratelimit-limit-budget"] == "600"
    assert int(served[0].headers["x-ratelimit-remaining-budget"]) < 600
    # another key has no budget of its own: not affected
    assert _ask(pair[0].url, BOB).status_code == 200


def test_a_team_cost_budget_warns_once_then_refuses(pair, hook) -> None:  # type: ignore[no-untyped-def]
    _, received = hook
    statuses = []
    for i in range(12):  # each answer: ~20 tokens = $0.002; the team's month: $0.01
        statuses.append(_ask(pair[i % 2].url, (BOB, CAROL)[i % 2], max_tokens=10).status_code)
    assert 200 in statuses and 429 in statuses
    assert wait_until(lambda: len(received) >= 1, timeout=10)
    event = received[0]
    assert event["event"] == "budget.soft_limit" and event["scope"] == "team"
    assert event["id"] == f"blue-{RUN}" and event["unit"] == "cost" and event["limit"] == "0.01"
    assert len(received) == 1  # once per budget and period, across both processes
    admin = {"Authorization": f"Bearer {ADMIN}"}
    metrics = httpx.get(pair[0].url + "/metrics", headers=admin).text + httpx.get(
        pair[1].url + "/metrics", headers=admin).text  # fmt: skip
    assert 'ragline_budget_soft_limit_total{period="month",scope="team",unit="cost"} 1.0' in metrics
    assert 'ragline_budget_rejections_total{period="month",scope="team",unit="cost"}' in metrics


def test_admin_routes_set_read_and_delete_budgets(pair) -> None:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    url = pair[0].url + f"/admin/budgets/key/dave-{RUN}"
    assert httpx.get(url, headers=admin).status_code == 404
    assert httpx.put(url, headers={"Authorization": f"Bearer {DAVE}"},
                     json={"tokens_per_day": 10}).status_code == 403  # fmt: skip
    bad = httpx.put(url, headers=admin, json={"tokens_per_day": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens_per_day"
    assert _ask(pair[1].url, DAVE).status_code == 200
    made = httpx.put(url, headers=admin, json={"tokens_per_day": 10}).json()
    assert made["budget"]["tokens_per_day"] == 10
    # set on one process: enforced there at once, on the other within its 2 s refresh
    refused = _ask(pair[0].url, DAVE)
    assert refused.status_code == 429 and f"key 'dave-{RUN}'" in refused.json()["error"]["message"]
    assert wait_until(lambda: _ask(pair[1].url, DAVE).status_code == 429, timeout=10)
    listed = httpx.get(pair[1].url + "/admin/budgets", headers=admin).json()["data"]
    owners = {(b["scope"], b["id"]) for b in listed}
    assert owners >= {("key", f"dave-{RUN}"), ("key", f"alice-{RUN}"), ("team", f"blue-{RUN}")}
    assert httpx.delete(url, headers=admin).json()["deleted"] is True
    assert httpx.get(url, headers=admin).status_code == 404
    assert wait_until(lambda: _ask(pair[1].url, DAVE).status_code == 200, timeout=10)


def test_embeddings_count_against_the_budget(pair) -> None:  # type: ignore[no-untyped-def]
    statuses = []
    for i in range(12):
        reply = httpx.post(
            pair[i % 2].url + "/v1/embeddings", headers={"Authorization": f"Bearer {ERIN}"},
            json={"model": "all-MiniLM-L6-v2", "input": f"budgeted words number {i}"}, timeout=60,
        )  # fmt: skip
        statuses.append(reply.status_code)
        if reply.status_code == 429:
            assert reply.json()["error"]["code"] == "budget_exceeded"
            assert (
                f"daily token budget of key 'erin-{RUN}' (40)" in reply.json()["error"]["message"]
            )
    assert 200 in statuses and 429 in statuses
    admin = {"Authorization": f"Bearer {ADMIN}"}
    status = httpx.get(pair[0].url + f"/admin/budgets/key/erin-{RUN}", headers=admin).json()
    assert int(status["usage"][0]["used"]) <= 40
