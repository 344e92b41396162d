"""The pipeline's order, counted (not timed): a request its limits refuse runs no scanner, no
retrieval and no backend; a cache hit makes no backend call. Real gateway, real model, real
MiniLM retrieval, the default safety policy, Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, stop_gateway

KEY, TIGHT = "sk-order-team-1234", "sk-order-tight-1234"
REDIS = "redis://127.0.0.1:6379/0"


def counts(gw: Gateway) -> dict[str, float]:
    """Scanner runs, retrievals and backend calls so far, from /metrics."""
    text = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    def total(name: str) -> float:
        return sum(
            float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        )

    return {
        "scans": total("ragline_safety_duration_seconds_count"),
        "retrievals": total("ragline_retrieval_duration_seconds_count"),
        "backend": total("ragline_backend_duration_seconds_count"),
    }


@pytest.fixture(scope="module")
def gw(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("order")
    gateway = start_gateway(
        tmp,
        models=[{"name": "smollm2"}],
        keys=[
            {"id": "order-team", "sha256": hash_key(KEY), "policy": {"metrics": True}},
            {
                "id": f"order-tight-{time.time_ns()}",
                "sha256": hash_key(TIGHT),
                "policy": {"rpm": 1},
            },
        ],
        extra={"routes": [{"name": "notes-qa", "model": "smollm2", "rag": {"store": "notes"}}]},
        env={"RAGLINE_RAG_DIR": str(tmp / "rag"), "REDIS_URL": REDIS},
        until="models",
    )
    raw = httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {KEY}"})
    store = raw.post("/vector_stores", json={"name": "notes"}).json()
    added = raw.post(
        f"/vector_stores/{store['id']}/files",
        json={"document_id": "pump", "text": "The pump's reset button is red."},
    )
    assert added.status_code == 200, added.text
    yield gateway
    stop_gateway(gateway)


def test_a_rate_limited_request_scans_retrieves_and_generates_nothing(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=TIGHT, max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What colour is the reset button?"}]
    before = counts(gw)
    client.chat.completions.create(model="notes-qa", messages=question, max_tokens=8)
    served = counts(gw)
    assert served["scans"] > before["scans"] and served["retrievals"] == before["retrievals"] + 1
    assert served["backend"] == before["backend"] + 1
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="notes-qa", messages=question, max_tokens=8)
    assert counts(gw) == served  # refused at admission: nothing after it ran


def test_a_cache_hit_makes_no_backend_call(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=120)
    kwargs = dict(
        model="smollm2",
        messages=[{"role": "user", "content": f"Name a colour. ({time.time_ns()})"}],
        temperature=0,
        max_tokens=6,
    )
    first = client.chat.completions.with_raw_response.create(**kwargs)
    assert first.headers["x-ragline-cache"] == "miss"
    before = counts(gw)
    second = client.chat.completions.with_raw_response.create(**kwargs)
    assert second.headers["x-ragline-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    after = counts(gw)
    assert after["backend"] == before["backend"]  # answered from the cache
    assert after["scans"] > before["scans"]  # input safety still ran: it comes before the cache
