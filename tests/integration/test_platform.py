"""API keys, rate limits, cache, metrics, logs and shutdown, against real Redis and real gateways
on the embedded engine."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import hash_key
from tests.conftest import start_gateway, stop_gateway, wait_until

MODEL = "smollm2"
MSG = [{"role": "user", "content": "Say yes."}]
REDIS = "redis://127.0.0.1:6379/0"
USER_KEY, LIMITED_KEY, TPM_KEY, NARROW_KEY, ADMIN_KEY = (
    "sk-user-123456",
    "sk-limited-123456",
    "sk-tpm-123456",
    "sk-narrow-123456",
    "sk-admin-123456",
)


def keys_config() -> list[dict[str, object]]:
    return [
        {"id": "user", "sha256": hash_key(USER_KEY), "policy": {"max_tokens": 64}},
        {"id": "limited", "sha256": hash_key(LIMITED_KEY), "policy": {"rpm": 20}},
        {"id": "tpm", "sha256": hash_key(TPM_KEY), "policy": {"tpm": 1000}},
        {"id": "narrow", "sha256": hash_key(NARROW_KEY), "policy": {"models": ["other-*"]}},
        {"id": "ops", "sha256": hash_key(ADMIN_KEY), "admin": True},
    ]


def clear_redis() -> None:
    r = redis.Redis.from_url(REDIS)
    for pattern in ("ragline:rl:*", "ragline:cache:*", "ragline:keys", "ragline:key-ids"):
        for key in r.scan_iter(pattern):
            r.delete(key)


@pytest.fixture(scope="module")
def pair(model_path, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two gateway processes sharing the real Redis, with keys."""
    clear_redis()
    tmp = tmp_path_factory.mktemp("platform")
    gws = [
        start_gateway(tmp, models=[{"name": MODEL}], env={"REDIS_URL": REDIS}, keys=keys_config())
        for _ in range(2)
    ]
    yield gws
    for gw in gws:
        stop_gateway(gw)


def client(gw, key: str | None):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=gw.base_url, api_key=key or "none", max_retries=0, timeout=120)


def aclient(gw, key: str):  # type: ignore[no-untyped-def]
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=120)


# -- keys -------------------------------------------------------------------------------------


PUBLIC = ("/health", "/ready", "/openapi.json", "/docs", "/ui")


def test_every_route_needs_a_key(pair) -> None:  # type: ignore[no-untyped-def]
    from gateway.app import create_app
    from gateway.config import FileConfig, Settings

    app = create_app(Settings(), FileConfig(models=[]))
    seen = 0
    for route in app.routes:
        path = getattr(route, "path", "")
        for method in getattr(route, "methods", None) or {"GET"}:
            if path in PUBLIC or path.startswith(("/docs/", "/ui/")) or method == "HEAD":
                continue  # public by design: probes, the API reference, the console's page
            url = pair[0].url + path.replace("{model_id:path}", "x").replace("{key_id}", "x")
            url = url.replace("{name}", "x")
            r = httpx.request(method, url, json={})
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            seen += 1
    assert seen >= 10
    assert httpx.get(pair[0].url + "/health").status_code == 200
    assert httpx.get(pair[0].url + "/nope").status_code == 401  # no probing of unknown routes


def test_keys_from_config(pair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.AuthenticationError):
        client(pair[0], None).models.list()
    with pytest.raises(openai.AuthenticationError) as info:
        client(pair[0], "sk-wrong").models.list()
    assert info.value.body["code"] == "invalid_api_key"
    r = client(pair[0], USER_KEY).chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=4, temperature=0
    )
    assert r.choices[0].message.content


def test_model_restrictions_and_max_tokens(pair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(pair[0], NARROW_KEY).chat.completions.create(model=MODEL, messages=MSG)
    assert info.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as info2:
        client(pair[0], USER_KEY).chat.completions.create(model=MODEL, messages=MSG, max_tokens=65)
    assert info2.value.body["param"] == "max_tokens"
    # what a key may not use, it does not see either
    assert client(pair[0], NARROW_KEY).models.list().data == []
    with pytest.raises(openai.NotFoundError):
        client(pair[0], NARROW_KEY).models.retrieve(MODEL)
    assert [m.id for m in client(pair[0], USER_KEY).models.list().data] == [
        MODEL,
        "all-MiniLM-L6-v2",
    ]


def test_metrics_need_an_admin_or_the_metrics_scope(pair) -> None:  # type: ignore[no-untyped-def]
    plain = httpx.get(pair[0].url + "/metrics", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert plain.status_code == 403 and plain.json()["error"]["code"] == "metrics_not_allowed"
    admin = httpx.get(pair[0].url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200 and "ragline_requests_total" in admin.text


def test_runtime_keys_and_immediate_revocation(pair) -> None:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        httpx.post(
            pair[0].url + "/admin/keys",
            json={"name": "x"},
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ).status_code
        == 403
    )
    bare = httpx.post(pair[0].url + "/admin/keys", json={"name": "bare"}, headers=admin).json()
    assert bare["policy"]["models"] == [] and bare["policy"]["vector_stores"] == []
    assert client(pair[0], bare["key"]).models.list().data == []  # least privilege
    with pytest.raises(openai.PermissionDeniedError):
        client(pair[0], bare["key"]).chat.completions.create(model=MODEL, messages=MSG)
    created = httpx.post(
        pair[0].url + "/admin/keys",
        json={"name": "ci", "policy": {"rpm": 100, "models": ["*"]}},
        headers=admin,
    ).json()
    key, key_id = created["key"], created["id"]
    assert "sha256" not in created
    # made on one process, usable on the other at once (Redis)
    assert client(pair[1], key).models.list().data[0].id == MODEL
    listed = httpx.get(pair[1].url + "/admin/keys", headers=admin).json()["data"]
    assert key_id in [k["id"] for k in listed] and key not in json.dumps(listed)
    assert httpx.delete(pair[0].url + f"/admin/keys/{key_id}", headers=admin).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(pair[1], key).models.list()


def test_cli_lists_and_revokes_keys(pair) -> None:  # type: ignore[no-untyped-def]
    """Issue 23, item 9: `ragline keys list|revoke` against a running gateway (its admin API)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = httpx.post(pair[0].url + "/admin/keys", json={"name": "cli"}, headers=admin).json()
    env = {**os.environ, "RAGLINE_ADMIN_KEY": ADMIN_KEY, "RAGLINE_URL": pair[1].url}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "keys", *args], cwd=REPO,
                              capture_output=True, text=True, env={**env, **extra})  # fmt: skip

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    keys = {k["id"]: k for k in json.loads(listed.stdout)}
    assert {"user", "ops", made["id"]} <= set(keys) and keys["user"]["source"] == "config"
    assert made["key"] not in listed.stdout and "sha256" not in listed.stdout
    assert cli("revoke", made["id"]).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        client(pair[0], made["key"]).models.list()
    refused = cli("list", RAGLINE_ADMIN_KEY=USER_KEY)  # not an admin: the gateway's answer
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr
    gone = cli("list", RAGLINE_URL="http://127.0.0.1:1")
    assert gone.returncode == 1 and "cannot reach the gateway" in gone.stderr


def test_key_lookup_is_timing_safe(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hmac

    from gateway import auth
    from gateway.config import KeyConfig

    calls = []
    real = hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = auth.KeyStore([KeyConfig(id="a", sha256=hash_key("secret"))], None, None)
    assert asyncio.run(store.lookup("secret")).key_id == "a"
    assert calls and all("secret" not in str(c) for c in calls)


# -- rate limits ------------------------------------------------------------------------------


async def hammer(gws, key: str, n: int, **kwargs):  # type: ignore[no-untyped-def]
    clients = [aclient(gw, key) for gw in gws]
    start = time.monotonic()
    results = await asyncio.gather(
        *(
            clients[i % len(clients)].chat.completions.with_raw_response.create(
                model=MODEL, messages=MSG, temperature=1.0, **kwargs
            )
            for i in range(n)
        ),
        return_exceptions=True,
    )
    return results, time.monotonic() - start


async def test_rpm_is_exact_across_two_processes(pair) -> None:  # type: ignore[no-untyped-def]
    results, elapsed = await hammer(pair, LIMITED_KEY, 50, max_tokens=1)
    ok = [r for r in results if not isinstance(r, BaseException)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(limited) == 50
    refill = int(elapsed * 20 / 60) + 1
    assert 20 <= len(ok) <= 20 + refill, (len(ok), elapsed)
    for exc in limited:
        h = exc.response.headers
        assert int(h["retry-after"]) >= 1
        assert h["x-ratelimit-limit-requests"] == "20"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"].endswith("s")
        assert exc.body["type"] == "rate_limit_error"
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining[0] == 0 and remaining[-1] >= 19 - refill


async def test_tpm_reserves_then_settles_across_two_processes(pair) -> None:  # type: ignore[no-untyped-def]
    # each request reserves its prompt estimate + max_tokens=100 (about 109 tokens): 9 fit
    results, elapsed = await hammer(pair, TPM_KEY, 20, max_tokens=100)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert all(
        isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException)
    )
    assert 9 <= len(ok) <= 9 + int(elapsed * 1000 / 60 / 100) + 1, (len(ok), elapsed)
    h = ok[0].headers
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert int(h["x-ratelimit-remaining-tokens"]) < 1000
    with pytest.raises(openai.BadRequestError) as info:  # can never fit
        client(pair[0], TPM_KEY).chat.completions.create(model=MODEL, messages=MSG, max_tokens=1500)
    assert info.value.body["code"] == "exceeds_tpm"


# -- cache ------------------------------------------------------------------------------------


def test_cache_hits_replay_json_and_streams_across_processes(pair) -> None:  # type: ignore[no-untyped-def]
    question = [{"role": "user", "content": f"Name a planet. ({time.time()})"}]
    kwargs = dict(model=MODEL, messages=question, temperature=0, max_tokens=12)
    first = client(pair[0], USER_KEY).chat.completions.with_raw_response.create(**kwargs)
    second = client(pair[1], USER_KEY).chat.completions.with_raw_response.create(**kwargs)
    assert first.headers["x-ragline-cache"] == "miss"
    assert second.headers["x-ragline-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    fresh = client(pair[1], USER_KEY).chat.completions.with_raw_response.create(
        **kwargs, extra_headers={"Cache-Control": "no-cache"}
    )
    assert fresh.headers["x-ragline-cache"] == "miss"
    sampled = client(pair[1], USER_KEY).chat.completions.with_raw_response.create(
        model=MODEL, messages=question, temperature=1.0, max_tokens=4
    )
    assert sampled.headers["x-ragline-cache"] == "bypass"

    def stream(gw):  # type: ignore[no-untyped-def]
        body = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream(
            "POST",
            gw.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {USER_KEY}"},
            timeout=60,
        ) as r:
            return r.headers["x-ragline-cache"], [line for line in r.iter_lines() if line]

    miss, events = stream(pair[0])
    hit, replayed = stream(pair[1])
    assert (miss, hit) == ("miss", "hit")
    assert replayed == events and replayed[-1] == "data: [DONE]"


# -- metrics and logs -------------------------------------------------------------------------


def test_metrics_parse_and_move(pair) -> None:  # type: ignore[no-untyped-def]
    def scrape() -> dict[str, float]:
        text = httpx.get(
            pair[0].url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).text
        assert USER_KEY not in text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ragline_requests_total" and sample.labels["key"] == "user":
                    values[sample.labels["status"]] = (
                        values.get(sample.labels["status"], 0) + sample.value
                    )
                if (
                    sample.name == "ragline_completion_tokens_total"
                    and sample.labels["key"] == "user"
                ):
                    values["tokens"] = sample.value
        return values

    before = scrape()
    client(pair[0], USER_KEY).chat.completions.create(
        model=MODEL, messages=MSG, temperature=1.0, max_tokens=3
    )
    after = scrape()
    assert after["200"] == before.get("200", 0) + 1
    assert after["tokens"] > before.get("tokens", 0)


def test_logs_are_json_with_key_ids_and_no_secrets(pair) -> None:  # type: ignore[no-untyped-def]
    secret_prompt = f"my secret prompt {time.time()}"
    client(pair[0], USER_KEY).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": secret_prompt}],
        max_tokens=2,
        extra_headers={"X-Request-Id": "trace-42"},
    )
    assert wait_until(lambda: "trace-42" in pair[0].logs(), timeout=10)
    logs = pair[0].logs()
    assert USER_KEY not in logs and ADMIN_KEY not in logs
    assert secret_prompt not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "trace-42")
    assert entry["key_id"] == "user" and entry["status"] == 200 and entry["model"] == MODEL
    audit = [
        json.loads(line)
        for gw in pair
        for line in gw.logs().splitlines()
        if line.startswith("{") and '"ragline.audit"' in line
    ]
    assert any(e["event"] == "key.created" and e["by"] == "ops" for e in audit)
    assert all(not k.startswith("sk-") for e in audit for k in map(str, e.values()))


def test_metrics_count_every_response_with_its_code_and_report_load(pair) -> None:  # type: ignore[no-untyped-def]
    """Issue 23, item 7: 4xx responses rejected before the pipeline (no key, unknown path, a
    body too large, a bad body) are counted with status and error code, and logged with it;
    queue, batch and slot gauges, process collectors and build info exist; no `_created`."""
    gw = pair[1]
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    assert (
        httpx.get(gw.base_url + "/models", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert httpx.get(gw.base_url + "/no/such/path", headers=headers).status_code == 404
    bad = httpx.post(gw.base_url + "/chat/completions", headers=headers, json={"model": MODEL})
    assert bad.status_code == 400
    one = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Metrics?"}]}
    assert httpx.post(gw.base_url + "/chat/completions", headers=headers, json=one).is_success
    bad_code = bad.json()["error"]["code"] or bad.json()["error"]["type"]
    big = httpx.post(gw.base_url + "/embeddings", headers=headers, content=b"x" * (5 << 20))
    assert big.status_code == 413
    admin = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    families = {f.name: f for f in text_string_to_metric_families(admin.text)}
    seen = {
        (s.labels["route"], s.labels["status"], s.labels["code"], s.labels["key"])
        for s in families["ragline_http_responses"].samples
        if s.name.endswith("_total") and s.value >= 1
    }
    assert ("/v1/models", "401", "invalid_api_key", "-") in seen, seen
    assert ("unmatched", "404", "not_found_error", "user") in seen, seen
    assert ("/v1/chat/completions", "400", bad_code, "user") in seen, seen
    assert ("/v1/embeddings", "413", "payload_too_large", "user") in seen or (
        "/v1/embeddings",
        "413",
        "payload_too_large",
        "-",
    ) in seen, seen
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "python_info",
                 "ragline_build_info", "ragline_backend_running_sequences",
                 "ragline_backend_waiting_requests", "ragline_backend_kv_slots"):  # fmt: skip
        assert name in families, name
    slots = families["ragline_backend_kv_slots"].samples
    assert [s.value for s in slots if s.labels["model"] == MODEL] == [64.0]  # max_batch, a cap
    # the paged KV cache: by default room for 16 sequences of 2,048 tokens in blocks of 16
    blocks = {s.labels["state"]: s.value for s in families["ragline_engine_kv_blocks"].samples}
    assert blocks["total"] == 16 * 2048 / 16 and blocks["used"] <= blocks["total"]
    tokens = families["ragline_engine_prefix_cache_tokens"].samples
    queried = [s.value for s in tokens if s.labels.get("result") == "queried"]
    assert queried and queried[0] > 0  # the chat request above was looked up
    # the access log names the error code of each 4xx
    assert wait_until(lambda: '"error": "invalid_api_key"' in gw.logs()
                      or '"error":"invalid_api_key"' in gw.logs())  # fmt: skip
