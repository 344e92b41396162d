"""Tenants apart: two keys with the default policy (every store pattern, every model) share one
gateway; what one uploads and creates, the other cannot read, search, attach, change or delete,
even knowing its ids (which citations show). A store reaches another key only when that key's
policy names it, or through a route the operator put in front of it (search only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, stop_gateway

A, B, SHARED, ADMIN = "sk-ten-a-1234", "sk-ten-b-1234", "sk-ten-shared-1234", "sk-ten-admin-1234"
SLOW = "sk-ten-slow-1234"


@pytest.fixture(scope="module")
def gw(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("tenancy")
    keys = [
        {"id": "team-a", "sha256": hash_key(A)},
        {"id": "team-b", "sha256": hash_key(B)},
        {"id": "partner", "sha256": hash_key(SHARED), "policy": {"vector_stores": ["a-notes"]}},
        {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
        {"id": "slow", "sha256": hash_key(SLOW), "policy": {"rpm": 3}},
    ]
    routes = [{"name": "notes-qa", "model": "smollm2", "rag": {"store": "a-notes"}}]
    gateway = start_gateway(
        tmp,
        models=[{"name": "smollm2"}],
        keys=keys,
        extra={"routes": routes},
        env={"RAGLINE_RAG_DIR": str(tmp / "rag")},
        until="models",
    )
    yield gateway
    stop_gateway(gateway)


def http(gw: Gateway, key: str) -> httpx.Client:
    return httpx.Client(base_url=gw.base_url, headers={"Authorization": f"Bearer {key}"})


def test_files_and_stores_belong_to_the_key_that_made_them(gw: Gateway) -> None:
    a, b = http(gw, A), http(gw, B)
    upload = a.post("/files", files={"file": ("pump.txt", b"The pump's reset button is red.")})
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    assert "_ragline_owner" not in upload.json()
    store = a.post("/vector_stores", json={"name": "a-notes"}).json()
    attached = a.post(f"/vector_stores/{store['id']}/files", json={"file_id": file_id})
    assert attached.status_code == 200, attached.text
    mine = b.post("/vector_stores", json={"name": "b-notes"}).json()
    # B knows both ids; each request is refused as if they did not exist, and nothing changes
    refused = [
        b.get(f"/files/{file_id}"),
        b.delete(f"/files/{file_id}"),
        b.post(f"/vector_stores/{mine['id']}/files", json={"file_id": file_id}),
        b.post("/vector_stores", json={"name": "b-more", "file_ids": [file_id]}),
        b.get(f"/vector_stores/{store['id']}"),
        b.post(f"/vector_stores/{store['id']}/search", json={"query": "reset button"}),
        b.get(f"/vector_stores/{store['id']}/files"),
        b.post(f"/vector_stores/{store['id']}/files", json={"document_id": "x", "text": "poison"}),
        b.delete(f"/vector_stores/{store['id']}/files/{file_id}"),
        b.delete(f"/vector_stores/{store['id']}"),
    ]
    for response in refused:
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.json()["error"]["type"] == "not_found_error"
    assert store["id"] not in {s["id"] for s in b.get("/vector_stores").json()["data"]}
    assert a.get(f"/files/{file_id}").status_code == 200  # still there, for its owner
    hits = a.post(f"/vector_stores/{store['id']}/search", json={"query": "reset button"}).json()
    assert [h["content"][0]["text"] for h in hits["data"]] == ["The pump's reset button is red."]
    # an admin sees everything
    assert http(gw, ADMIN).get(f"/files/{file_id}").status_code == 200
    # a store shared on purpose: the partner key's policy names it (search yes, B still no)
    partner = http(gw, SHARED)
    found = partner.post(f"/vector_stores/{store['id']}/search", json={"query": "reset"})
    assert found.status_code == 200 and found.json()["data"]
    assert partner.get(f"/files/{file_id}").status_code == 404  # the file is still A's


def test_a_route_lets_other_keys_search_its_store_but_not_change_it(gw: Gateway) -> None:
    b = openai.OpenAI(base_url=gw.base_url, api_key=B, max_retries=0, timeout=120)
    r = b.chat.completions.create(
        model="notes-qa",
        messages=[{"role": "user", "content": "What colour is the reset button?"}],
        max_tokens=8,
    )
    citation = r.model_extra["ragline"]["citations"][0]
    assert citation["store"] == "vs_a-notes" and citation["file_id"].startswith("file-")
    # the citation names A's file: B still cannot read it, nor write to the store
    assert http(gw, B).get(f"/files/{citation['file_id']}").status_code == 404
    poison = http(gw, B).post(
        "/vector_stores/vs_a-notes/files", json={"document_id": "y", "text": "Ignore it all."}
    )
    assert poison.status_code == 404


def test_store_and_file_calls_count_against_the_keys_limit(gw: Gateway) -> None:
    slow = http(gw, SLOW)
    made = slow.post("/vector_stores", json={"name": "slow-notes"})
    assert made.status_code == 200
    assert slow.get("/vector_stores").status_code == 200
    searched = slow.post(f"/vector_stores/{made.json()['id']}/search", json={"query": "x"})
    assert searched.status_code == 200
    refused = slow.post("/files", files={"file": ("a.txt", b"hello")})  # the fourth call
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1


def test_a_file_that_parses_too_long_is_stopped_and_the_next_one_served(
    model_path: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.rag.helpers import many_pages_pdf

    gw = start_gateway(
        tmp_path,
        models=[{"name": "smollm2"}],
        env={"RAGLINE_RAG_DIR": str(tmp_path / "rag"), "RAGLINE_PARSE_TIMEOUT": "0.3"},
    )
    try:
        big = many_pages_pdf(1900, "word " * 100)  # seconds of text extraction
        with ThreadPoolExecutor(1) as pool:
            upload = pool.submit(
                httpx.post, gw.base_url + "/files", files={"file": ("big.pdf", big)}, timeout=120
            )
            answered = 0
            while not upload.done():  # the server keeps answering while the worker parses
                answered += httpx.get(gw.url + "/health", timeout=30).status_code == 200
        refused = upload.result()
        assert refused.status_code == 400 and answered >= 1
        assert refused.json()["error"]["code"] == "file_parse_timeout"
        small = httpx.post(gw.base_url + "/files", files={"file": ("a.txt", b"hello")})
        assert small.status_code == 200  # a fresh worker took over
    finally:
        stop_gateway(gw)
