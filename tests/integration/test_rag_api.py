"""Vector stores and grounded chat through a real gateway (embedded SmolLM2, real MiniLM, FAISS,
bm25s), with the ``openai`` SDK's ``files`` and ``vector_stores`` methods; raw HTTP for ragline's
extensions (text documents by id)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth import hash_key
from rag import RELEVANCE_FLOOR
from tests.conftest import REPO, Gateway, start_gateway, stop_gateway
from tests.rag.helpers import claims_for, corpus, minimal_pdf, slice_jsonl

TEAM, READER = "sk-rag-team", "sk-rag-reader"
SLICE = 300


@pytest.fixture(scope="module")
def rag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rag-data")


@pytest.fixture(scope="module")
def gw(
    model_path: Path, rag_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("rag")
    keys = [
        {"id": "team", "sha256": hash_key(TEAM)},
        {"id": "reader", "sha256": hash_key(READER),
         "policy": {"vector_stores": ["handbook"], "prompt_overrides": False}},
    ]  # fmt: skip
    routes = [
        {"name": "scifact-qa", "model": "smollm2", "rag": {"store": "scifact", "top_k": 3}},
        {"name": "handbook-qa", "model": "smollm2", "rag": {"store": "handbook", "top_k": 2}},
    ]
    gateway = start_gateway(
        tmp,
        models=[{"name": "smollm2", "backend": "embedded"}],
        keys=keys,
        extra={"routes": routes},
        env={"RAGLINE_RAG_DIR": str(rag_dir)},
        until="models",  # the routes' stores are created by the tests
    )
    yield gateway
    stop_gateway(gateway)


def sdk(gw: Gateway, key: str = TEAM) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=300)


def http(gw: Gateway, key: str = TEAM) -> httpx.Client:
    return httpx.Client(
        base_url=gw.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    )


@pytest.fixture(scope="module")
def scifact(gw: Gateway) -> Any:
    client = sdk(gw)
    store = client.vector_stores.create(name="scifact", metadata={"source": "beir"})
    uploaded = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("scifact.jsonl", slice_jsonl(SLICE))
    )
    assert uploaded.status == "completed", uploaded
    return store


def test_a_route_whose_store_is_missing_is_not_ready_until_it_exists(
    gw: Gateway, request: pytest.FixtureRequest
) -> None:
    """Issue 23, item 3: a route naming a store that does not exist keeps /ready at 503 and
    says which route and store; its requests get a 503 naming the route, not a 404 about a
    `vector_store_id` the client never sent; the store created later is picked up."""
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"]
    problems = ready.json()["routes"]
    assert {"scifact-qa", "handbook-qa"} <= set(problems)
    assert "vector store 'scifact'" in problems["scifact-qa"]
    assert all(m["status"] == "ready" for m in ready.json()["models"].values())
    with pytest.raises(openai.InternalServerError) as info:
        sdk(gw).chat.completions.create(
            model="scifact-qa", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
    error = info.value.body
    assert info.value.status_code == 503 and error["code"] == "route_unavailable"
    assert "Route 'scifact-qa'" in error["message"] and error["param"] is None
    request.getfixturevalue("scifact")  # creates the store through the API
    after = httpx.get(gw.url + "/ready").json().get("routes", {})
    assert "scifact-qa" not in after and "handbook-qa" in after


def test_ingested_corpus_is_searchable_with_the_sdk(gw: Gateway, scifact: Any) -> None:
    client = sdk(gw)
    store = client.vector_stores.retrieve(scifact.id)
    assert store.status == "completed" and store.file_counts.completed == 1
    assert store.model_extra["ragline"]["documents"] == SLICE
    assert store.id in {s.id for s in client.vector_stores.list().data}
    claims = claims_for(frozenset(d["_id"] for d in corpus()[:SLICE]))
    assert len(claims) >= 8
    found = 0
    for claim, relevant in claims:
        page = client.vector_stores.search(scifact.id, query=claim, max_num_results=5)
        assert page.data and all(r.content[0].type == "text" for r in page.data)
        found += bool(relevant & {r.model_extra["ragline"]["document_id"] for r in page.data})
    assert found / len(claims) >= 0.9
    # each retrieval mode answers, and reports which scores it used
    for mode in ("dense", "bm25"):
        page = client.vector_stores.search(
            scifact.id, query=claims[0][0], max_num_results=3, extra_body={"mode": mode}
        )
        other = "bm25" if mode == "dense" else "dense"
        assert len(page.data) == 3 and all(
            r.model_extra["ragline"][other] is None for r in page.data
        )


def test_text_documents_update_noop_and_delete(gw: Gateway) -> None:
    client, raw = sdk(gw), http(gw)
    store = client.vector_stores.create(name="notes")
    doc = {"document_id": "pump-1", "title": "Pump", "attributes": {"team": "ops"}}
    first = raw.post(
        f"/vector_stores/{store.id}/files", json={**doc, "text": "The pump's reset button is red."}
    )
    assert first.status_code == 200, first.text
    assert first.json()["ragline"]["added"] == 1
    again = raw.post(
        f"/vector_stores/{store.id}/files", json={**doc, "text": "The pump's reset button is red."}
    )
    assert again.json()["ragline"]["unchanged"] == 1
    assert again.json()["ragline"]["version"] == first.json()["ragline"]["version"]
    updated = raw.post(
        f"/vector_stores/{store.id}/files", json={**doc, "text": "The pump's reset button is blue."}
    )
    assert updated.json()["ragline"]["updated"] == 1
    hits = client.vector_stores.search(store.id, query="reset button colour").data
    assert [h.content[0].text for h in hits] == ["The pump's reset button is blue."]
    assert hits[0].attributes == {"team": "ops"}
    # filters: on a known attribute, and a clear 400 on an unknown one
    matched = client.vector_stores.search(
        store.id, query="pump", filters={"type": "eq", "key": "team", "value": "ops"}
    )
    assert len(matched.data) == 1
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(
            store.id, query="pump", filters={"type": "eq", "key": "colour", "value": "red"}
        )
    assert err.value.code == "unknown_filter_field"
    deleted = client.vector_stores.files.delete("pump-1", vector_store_id=store.id)
    assert deleted.deleted
    assert client.vector_stores.search(store.id, query="reset button").data == []
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve("pump-1", vector_store_id=store.id)


def test_uploaded_files_attach_update_and_detach(gw: Gateway) -> None:
    client = sdk(gw)
    store = client.vector_stores.create(name="manuals")
    pdf = client.files.create(
        file=("spec.pdf", minimal_pdf("Torque limit is 42 newton metres")), purpose="assistants"
    )
    md = client.files.create(
        file=("guide.md", b"# Guide\n\nDrain the tank before winter."), purpose="assistants"
    )
    for f in (pdf, md):
        attached = client.vector_stores.files.create_and_poll(
            file_id=f.id, vector_store_id=store.id, attributes={"kind": "manual"}
        )
        assert attached.status == "completed"
    listed = client.vector_stores.files.list(vector_store_id=store.id)
    assert {f.id for f in listed.data} == {pdf.id, md.id}
    top = client.vector_stores.search(
        store.id, query="what is the torque limit", max_num_results=1
    ).data[0]
    assert top.file_id == pdf.id and top.filename == "spec.pdf"
    client.vector_stores.files.update(
        file_id=md.id, vector_store_id=store.id, attributes={"kind": "guide"}
    )
    guides = client.vector_stores.search(
        store.id, query="tank", filters={"type": "eq", "key": "kind", "value": "guide"}
    )
    assert [r.file_id for r in guides.data] == [md.id]
    client.vector_stores.files.delete(pdf.id, vector_store_id=store.id)
    assert {r.file_id for r in client.vector_stores.search(store.id, query="torque").data} == {
        md.id
    }
    client.vector_stores.delete(store.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.vector_stores.retrieve(store.id)
    assert err.value.code == "vector_store_not_found"


def test_files_list_per_key_with_the_sdk(gw: Gateway) -> None:
    """Issue 23, item 10: `GET /v1/files` was a 405, so the SDK's files.list() failed."""
    team, reader = sdk(gw), sdk(gw, READER)
    mine = [
        team.files.create(file=(f"note-{i}.md", f"# Note {i}\n\nText {i}.".encode()),
                          purpose="assistants")
        for i in range(3)
    ]  # fmt: skip
    theirs = reader.files.create(file=("r.md", b"# Reader\n\nTheirs."), purpose="assistants")
    listed = [f.id for f in team.files.list()]
    assert {f.id for f in mine} <= set(listed) and theirs.id not in listed  # per key
    assert [f.id for f in reader.files.list()] == [theirs.id]
    # newest first; a page of one at a time walks every file through the cursor
    pages = [f.id for f in team.files.list(limit=1, order="asc")]
    assert pages == sorted(pages, key=listed.index, reverse=True) and set(pages) == set(listed)
    assert team.files.list(purpose="batch").data == []
    assert team.files.content(mine[0].id).read() == b"# Note 0\n\nText 0."
    with pytest.raises(openai.NotFoundError):
        reader.files.content(mine[0].id)  # another key's file does not exist for it
    with pytest.raises(openai.BadRequestError) as info:
        team.files.list(limit=0)
    assert info.value.body["param"] == "limit"


def test_docs_open_in_a_browser_without_a_key_and_without_a_cdn(gw: Gateway) -> None:
    """Issue 23, item 10: /docs needed a Bearer header (a browser got 401) and loaded Swagger
    UI from a CDN; now the page, its assets and the schema are served here, without a key."""
    page = httpx.get(gw.url + "/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        got = httpx.get(f"{gw.url}/docs/assets/{asset}")
        assert got.status_code == 200 and len(got.content) > 10_000
    spec = httpx.get(gw.url + "/openapi.json").json()
    assert "/v1/files" in spec["paths"] and "get" in spec["paths"]["/v1/files"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # Chromium renders it (Swagger UI draws the operations from the schema with its script)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (apt-get install chromium; .ci/run installs it)"
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000", "--dump-dom", gw.url + "/docs"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert "opblock" in dom and "/v1/chat/completions" in dom, dom[-2000:]
    # everything else still needs a key
    assert httpx.get(gw.base_url + "/files").status_code == 401
    assert httpx.get(gw.url + "/docs/../v1/files").status_code in (401, 404)


def test_bad_input_gets_a_clear_4xx_and_writes_nothing(gw: Gateway, scifact: Any) -> None:
    client, raw = sdk(gw), http(gw)
    version = client.vector_stores.retrieve(scifact.id).model_extra["ragline"]["version"]
    cases = [
        (("empty.txt", b""), "empty_file"),
        (("tool.exe", b"MZ\x90\x00"), "unsupported_file_type"),
        (("broken.pdf", b"%PDF-1.4\nnot really a pdf"), "file_parse_error"),
        (("bad.jsonl", b'{"_id": "x", "text": "fine"}\n{oops\n'), "file_parse_error"),
    ]
    for file, code in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.vector_stores.files.upload_and_poll(vector_store_id=scifact.id, file=file)
        assert err.value.code == code, (file[0], err.value)
        assert file[0].split(".")[0] in err.value.message
    big = raw.post(
        f"/vector_stores/{scifact.id}/files",
        files={"file": ("huge.txt", b"a" * (100 * 1024 * 1024))},
    )
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    for call in (
        lambda: client.vector_stores.search("vs_nope", query="x"),
        lambda: client.vector_stores.files.create(vector_store_id=scifact.id, file_id="file-nope"),
        lambda: client.vector_stores.files.retrieve("file-nope", vector_store_id=scifact.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.search(
            scifact.id, query="x", filters={"type": "eq", "key": "nope", "value": 1}
        )
    assert err.value.code == "unknown_filter_field"
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(scifact.id, query="x", max_num_results=500)
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.create(name="scifact")  # the name is taken
    after = client.vector_stores.retrieve(scifact.id).model_extra["ragline"]
    assert after["version"] == version and after["documents"] == SLICE


def test_grounded_chat_cites_the_ingested_documents(gw: Gateway, scifact: Any) -> None:
    client = sdk(gw)
    claim, relevant = claims_for(frozenset(d["_id"] for d in corpus()[:SLICE]))[0]
    r = client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=24,
        temperature=0,
    )  # fmt: skip
    info = r.model_extra["ragline"]
    cites = info["citations"]
    assert 1 <= len(cites) <= 3 and info["prompt"]["template"].startswith("grounded-qa@")
    ids = {d["_id"]: d for d in corpus()[:SLICE]}
    for cite in cites:
        assert 1 <= cite["index"] <= info["retrieval"]["used"] and cite["store"] == scifact.id
        assert cite["marker"] == f"[{cite['index']}]" and cite["similarity"] >= RELEVANCE_FLOOR
        assert cite["document_id"] in ids and cite["snippet"] in ids[cite["document_id"]]["text"]
        assert isinstance(cite["chunk_id"], int) and isinstance(cite["score"], float)
    # the answer's [n] markers choose the citations when it has any; else every prompted chunk
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", r.choices[0].message.content or "")}
    cited &= set(range(1, info["retrieval"]["used"] + 1))
    assert {c["index"] for c in cites} == (cited or set(range(1, info["retrieval"]["used"] + 1)))
    assert info["retrieval"]["cited"] == sorted(cited)
    everything = client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=1
    ).model_extra["ragline"]  # one token cites nothing: every prompted chunk is listed
    assert relevant & {c["document_id"] for c in everything["citations"]}
    # an off-topic question: what falls below the relevance floor is neither prompted nor cited
    joke = client.chat.completions.create(
        model="scifact-qa", max_tokens=1,
        messages=[{"role": "user", "content": "Tell me a joke about pirates and their parrots."}],
    ).model_extra["ragline"]  # fmt: skip
    assert joke["retrieval"]["used"] < info["retrieval"]["used"]
    assert all(c["similarity"] >= RELEVANCE_FLOOR for c in joke["citations"])
    # a stream: the same citations as the same answer unstreamed, on its final chunk. Both
    # reuse the first request's prompt blocks: in bf16 a prefix-cache hit may change a greedy
    # answer's last tokens against the first, uncached run (README, "Prefix caching")
    again = client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=24,
        temperature=0, extra_headers={"Cache-Control": "no-cache"},
    )  # fmt: skip
    chunks = list(client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    finals = [c for c in chunks if (c.model_extra or {}).get("ragline")]
    assert len(finals) == 1 and finals[0].choices and finals[0].choices[0].finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == again.choices[0].message.content  # greedy: the same answer
    assert (
        finals[0].model_extra["ragline"]["citations"] == again.model_extra["ragline"]["citations"]
    )
    # per-request override: fewer chunks, or none
    one = client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=4,
        extra_body={"ragline": {"rag": {"top_k": 1}}},
    )  # fmt: skip
    assert len(one.model_extra["ragline"]["citations"]) == 1
    off = client.chat.completions.create(
        model="scifact-qa", messages=[{"role": "user", "content": claim}], max_tokens=4,
        extra_body={"ragline": {"rag": {"enabled": False}}},
    )  # fmt: skip
    assert "citations" not in off.model_extra["ragline"]


def test_grounded_answer_as_json_schema_with_citations(gw: Gateway, scifact: Any) -> None:
    """A grounded route asked for structured output: the answer validates against the schema,
    and its citations come beside it as usual."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "supported": {"type": "boolean"},
            "sources": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 3},
        },
        "required": ["supported", "sources"],
        "additionalProperties": False,
    }
    claim, _ = claims_for(frozenset(d["_id"] for d in corpus()[:SLICE]))[0]
    r = sdk(gw).chat.completions.create(
        model="scifact-qa",
        messages=[{"role": "user", "content": claim}],
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    assert 1 <= len(r.model_extra["ragline"]["citations"]) <= 3


def test_store_permissions_follow_the_key(gw: Gateway, scifact: Any) -> None:
    team, reader = sdk(gw), sdk(gw, READER)
    handbook = team.vector_stores.create(name="handbook")
    http(gw).post(
        f"/vector_stores/{handbook.id}/files",
        json={"document_id": "leave", "text": "Staff get 30 days of paid leave a year."},
    ).raise_for_status()
    assert {s.id for s in reader.vector_stores.list().data} == {handbook.id}
    with pytest.raises(openai.PermissionDeniedError):
        reader.vector_stores.search(scifact.id, query="x")
    r = reader.chat.completions.create(
        model="handbook-qa",
        messages=[{"role": "user", "content": "How many days of leave?"}],
        max_tokens=16,
    )
    assert r.model_extra["ragline"]["citations"][0]["document_id"] == "leave"
    with pytest.raises(openai.PermissionDeniedError):  # no per-request retrieval changes
        reader.chat.completions.create(
            model="handbook-qa", messages=[{"role": "user", "content": "leave?"}], max_tokens=4,
            extra_body={"ragline": {"rag": {"store": "scifact"}}},
        )  # fmt: skip
    with pytest.raises(openai.PermissionDeniedError):  # the route's store is not this key's
        reader.chat.completions.create(
            model="scifact-qa", messages=[{"role": "user", "content": "x"}], max_tokens=4
        )


def test_cli_ingest_next_to_the_gateway_is_served(
    gw: Gateway, rag_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "faq.md").write_text(
        "# FAQ\n\nThe office wifi password rotates every Monday."
    )
    env = {**os.environ, "RAGLINE_RAG_DIR": str(rag_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", str(tmp_path / "docs"), "--store", "faq"],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    hits = sdk(gw).vector_stores.search("vs_faq", query="when does the wifi password change").data
    assert hits and "Monday" in hits[0].content[0].text
    found = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "search", "faq", "wifi password", "--json"],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(found.stdout)[0]["document_id"] == "faq.md"
    # `ragline stores list|delete` see the same directory
    listed = subprocess.run([sys.executable, "-m", "gateway.cli", "stores", "list", "--json"],
                            env=env, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    faq = next(s for s in json.loads(listed.stdout) if s["name"] == "faq")
    assert faq["id"] == "vs_faq" and faq["documents"] == 1 and faq["owner"] is None
    # an ingest killed mid-write (SIGKILL, parked by the test hook) changes nothing being served
    (tmp_path / "docs" / "more.md").write_text("# More\n\nThe canteen opens at noon.")
    version = sdk(gw).vector_stores.retrieve("vs_faq").model_extra["ragline"]["version"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "ingest", str(tmp_path / "docs"), "--store", "faq"],
        env={**env, "RAGLINE_TEST_HOLD": "index-written"}, cwd=REPO,
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"holding at index-written" in line:
            break
    # readers keep being served while that write is in progress
    during = sdk(gw).vector_stores.search("vs_faq", query="wifi password").data
    assert during and "Monday" in during[0].content[0].text
    proc.kill()
    proc.wait()
    store = sdk(gw).vector_stores.retrieve("vs_faq").model_extra["ragline"]
    assert store["version"] == version and store["documents"] == 1
    hits = sdk(gw).vector_stores.search("vs_faq", query="canteen opening time").data
    assert all("canteen" not in h.content[0].text for h in hits)
    assert "Monday" in sdk(gw).vector_stores.search("vs_faq", query="wifi").data[0].content[0].text
    # deleted from the command line: the running gateway stops serving it at once
    deleted = subprocess.run([sys.executable, "-m", "gateway.cli", "stores", "delete", "faq",
                              "--yes"], env=env, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert deleted.returncode == 0 and "deleted vs_faq" in deleted.stdout, deleted.stderr
    with pytest.raises(openai.NotFoundError):
        sdk(gw).vector_stores.retrieve("vs_faq")
