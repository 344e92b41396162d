"""Quotas beside the rate limits: upload bytes per UTC day (shared through Redis by every gateway
process) and vector stores per key. Over a quota is a 429 ``insufficient_quota`` that stores
nothing; other keys are untouched."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, stop_gateway

REDIS = "redis://127.0.0.1:6379/0"
SMALL, OTHER = "sk-quota-small-1234", "sk-quota-other-1234"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes on one Redis; a fresh key id per run, so the day's count starts
    at zero however often the suite runs today."""
    tmp = tmp_path_factory.mktemp("quotas")
    run = secrets.token_hex(4)
    quota = {"upload_bytes_per_day": 100, "max_vector_stores": 2}
    keys = [
        {"id": f"small-{run}", "sha256": hash_key(SMALL), "policy": quota},
        {"id": f"other-{run}", "sha256": hash_key(OTHER)},
    ]
    gateways = []
    for name in ("one", "two"):
        gateways.append(
            start_gateway(
                tmp,
                models=[{"name": "smollm2"}],
                keys=keys,
                env={"REDIS_URL": REDIS, "RAGLINE_RAG_DIR": str(tmp / f"rag-{name}")},
            )
        )
    yield gateways[0], gateways[1]
    for gw in gateways:
        stop_gateway(gw)


def sdk(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=60)


def test_upload_bytes_per_day_are_counted_across_processes(pair: tuple[Gateway, Gateway]) -> None:
    one, two = pair
    first = sdk(one, SMALL).files.create(file=("a.txt", b"x" * 60), purpose="assistants")
    assert first.bytes == 60
    with pytest.raises(openai.RateLimitError) as info:  # the other process knows the 60
        sdk(two, SMALL).files.create(file=("b.txt", b"y" * 60), purpose="assistants")
    error = info.value.body
    assert error["type"] == "insufficient_quota" and error["code"] == "upload_quota_exceeded"
    assert "100 bytes per day" in error["message"] and "60 bytes uploaded today" in error["message"]
    reset = int(info.value.response.headers["retry-after"])
    assert 0 < reset <= 86_401
    # what fits still fits; text posted to a store counts too
    sdk(two, SMALL).files.create(file=("c.txt", b"z" * 30), purpose="assistants")
    store = sdk(one, SMALL).vector_stores.create(name="notes")
    with pytest.raises(openai.RateLimitError):
        sdk(one, SMALL).post(
            f"/vector_stores/{store.id}/files",
            body={"text": "more than ten bytes", "document_id": "d1"},
            cast_to=object,
        )
    assert sdk(one, SMALL).vector_stores.files.list(vector_store_id=store.id).data == []
    # another key's quota is its own
    sdk(one, OTHER).files.create(file=("d.txt", b"w" * 500), purpose="assistants")


def test_a_key_owns_a_bounded_number_of_stores(pair: tuple[Gateway, Gateway]) -> None:
    one, _ = pair
    client = sdk(one, SMALL)
    owned = [s.id for s in client.vector_stores.list().data]
    while len(owned) < 2:
        owned.append(client.vector_stores.create().id)
    with pytest.raises(openai.RateLimitError) as info:
        client.vector_stores.create(name="third")
    assert info.value.body["code"] == "vector_store_quota_exceeded"
    assert len(client.vector_stores.list().data) == 2  # nothing made
    sdk(one, OTHER).vector_stores.create(name="theirs")  # another key: its own count
    client.vector_stores.delete(owned[0])
    assert client.vector_stores.create(name="third").name == "third"
