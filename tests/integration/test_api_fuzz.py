"""The API fuzzer: schemathesis sends every operation of the gateway's own OpenAPI schema
requests built from that schema, valid ones and invalid ones, with an admin key (the deepest
validation) and with a tenant's key (the ownership checks), first with the ids it makes up and
then with ids that exist (a file, a store, a key, an adapter made for the run). No answer may be
a 5xx or break the schema (errors included), and every operation must be reached: answered by
its own code at least once, not only refused by authentication or routing.

The upstream is the mock: the point is the gateway's input handling, not the model's answers
(the real engine is exercised by the API tests)."""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.app import create_app
from gateway.auth import hash_key
from tests.conftest import REPO, Gateway, Upstream, start_gateway, start_mock, stop_gateway

ADMIN, TENANT = "sk-fuzz-admin-1234", "sk-fuzz-tenant-1234"
ADAPTER = "fuzz-lora"
EMBEDDING = "all-MiniLM-L6-v2"
# a few examples per operation and mode keep the run to under a minute while still reaching
# every operation with valid and invalid input; RAGLINE_FUZZ_EXAMPLES=500 for a long run
EXAMPLES = int(os.environ.get("RAGLINE_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, response_schema_conformance]

# the operations are known at collection time: the schema of an app built in this process (the
# same code as the server's; ``test_the_served_schema_is_the_one_fuzzed`` holds them equal)
schema = schemathesis.openapi.from_dict(create_app().api.openapi())
# operation -> statuses its own code answered with (not 401/403, not an unknown id's 404)
REACHED: dict[str, set[int]] = defaultdict(set)


@dataclass
class Fuzzed:
    gateway: Gateway
    ids: dict[str, str]  # path parameter -> an id that exists, owned by TENANT
    serial: Iterator[int] = field(default_factory=itertools.count)

    def http(self, key: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=60)

    def fresh(self, path: str) -> dict[str, str]:
        """Ids for a DELETE: a new resource each time, so the shared ones stay."""
        tenant, admin = self.http(TENANT), self.http(ADMIN)
        if path == "/admin/keys/{key_id}":
            return {"key_id": admin.post("/admin/keys", json={"name": "doomed"}).json()["id"]}
        if path == "/admin/budgets/{scope}/{owner}":
            owner = f"doomed-{next(self.serial)}"
            made = admin.put(f"/admin/budgets/team/{owner}", json={"tokens_per_day": 1})
            assert made.status_code == 200, made.text
            return {"scope": "team", "owner": owner}
        file_id = upload(tenant, b"A file made to be deleted by the fuzzer.")
        if path == "/v1/files/{file_id}":
            return {"file_id": file_id}
        if path == "/v1/vector_stores/{store_id}":
            return {"store_id": tenant.post("/v1/vector_stores", json={}).json()["id"]}
        store_id = self.ids["store_id"]
        attached = tenant.post(f"/v1/vector_stores/{store_id}/files", json={"file_id": file_id})
        assert attached.status_code == 200, attached.text
        return {"store_id": store_id, "file_id": file_id}


def upload(client: httpx.Client, text: bytes) -> str:
    reply = client.post("/v1/files", files={"file": ("note.txt", text)}, data={"purpose": "x"})
    assert reply.status_code == 200, reply.text
    file_id: str = reply.json()["id"]
    return file_id


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    mock = start_mock(tmp_path_factory.mktemp("fuzz-mock"), reply="a short answer", model="mock")
    yield mock
    mock.kill()


@pytest.fixture(scope="module")
def fuzzed(
    upstream: Upstream, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    model = {
        "name": "smollm2",
        "backend": "vllm",  # the mock speaks vLLM's adapter API too
        "upstreams": [upstream.url],
        "served_model": "mock",
        "tokenizer": str(model_path),  # for the prompt templates
        "health": {"path": "/health", "interval": 60},
    }
    keys = [
        {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
        {"id": "team", "sha256": hash_key(TENANT)},
    ]
    gw = start_gateway(
        tmp,
        models=[model],
        keys=keys,
        adapters=[{"name": ADAPTER, "path": str(tmp / "lora"), "base": "smollm2"}],
        extra={"prompts": {"dir": str(REPO / "prompts" / "templates")}},
        env={
            "RAGLINE_RAG_DIR": str(tmp / "rag"),
            # a long run makes a store per DELETE: the quotas must not run out first
            "RAGLINE_MAX_VECTOR_STORES": "1000000",
            "RAGLINE_UPLOAD_BYTES_PER_DAY": str(1 << 40),
        },
    )
    run = Fuzzed(gw, {"name": ADAPTER, "model_id": "smollm2"})
    tenant = run.http(TENANT)
    run.ids["file_id"] = upload(tenant, b"The pump's reset button is red. Hold it for 5 s.")
    store = tenant.post(
        "/v1/vector_stores", json={"name": "fuzz", "file_ids": [run.ids["file_id"]]}
    )
    assert store.status_code == 200, store.text
    run.ids["store_id"] = store.json()["id"]
    key = run.http(ADMIN).post("/admin/keys", json={"name": "kept"})
    run.ids["key_id"] = key.json()["id"]
    # a budget that exists (for a team no key is in: it limits nothing the fuzzer sends)
    budget = run.http(ADMIN).put("/admin/budgets/team/kept", json={"tokens_per_day": 10**12})
    assert budget.status_code == 200, budget.text
    run.ids.update(scope="team", owner="kept")
    templated = {"template": "capital-qa", "variables": {"country": "Peru"}}
    chat = tenant.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "?"}],
            "ragline": templated,
        },
    )
    assert chat.status_code == 200, chat.text
    run.ids["request_id"] = chat.headers["x-request-id"]
    yield run
    stop_gateway(gw)


@pytest.fixture(scope="module")
def served(fuzzed: Fuzzed) -> dict[str, Any]:
    """The schema the running gateway serves."""
    reply = fuzzed.http(ADMIN).get("/openapi.json")
    assert reply.status_code == 200, reply.text
    document: dict[str, Any] = reply.json()
    return document


def answered(response: Any) -> bool:
    """The operation's own code answered: not refused by auth, not an id that does not exist."""
    if response.status_code in (401, 403):
        return False
    return not (response.status_code == 404 and "found" in str(response.json()["error"]["code"]))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=EXAMPLES <= 12,  # the CI run is the same every time
)
def test_no_input_gets_a_server_error(case: Any, fuzzed: Fuzzed) -> None:
    label = f"{case.method} {case.path}"
    url = fuzzed.gateway.url
    for key in (ADMIN, TENANT):
        case.call_and_validate(base_url=url, headers=auth(key), checks=CHECKS, timeout=60)
    if case.method.upper() != case.operation.method.upper():
        return  # a method the path does not have (a 405, checked above)
    # the same input with ids that exist, for the served model: past the lookups, into the code
    if case.path_parameters:
        exists = fuzzed.fresh(case.path) if case.method == "DELETE" else fuzzed.ids
        case.path_parameters = {name: exists[name] for name in case.path_parameters}
    if isinstance(case.body, dict):
        case.body = {**case.body, **existing(case.path, case.body, fuzzed.ids)}
    response = case.call_and_validate(base_url=url, headers=auth(TENANT), checks=CHECKS, timeout=60)
    if answered(response):
        REACHED[label].add(response.status_code)
    response = case.call_and_validate(base_url=url, headers=auth(ADMIN), checks=CHECKS, timeout=60)
    if answered(response):
        REACHED[label].add(response.status_code)


def existing(path: str, body: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """The fields of a JSON body that name something, set to something that exists."""
    named: dict[str, Any] = {"model": EMBEDDING if path == "/v1/embeddings" else "smollm2"}
    named.update({name: ids[name] for name in ("file_id", "request_id")})
    named["file_ids"] = [ids["file_id"]]
    return {name: value for name, value in named.items() if isinstance(body.get(name), str | list)}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_operation_was_reached(served: dict[str, Any]) -> None:
    """Run after the fuzzing above: each operation answered some input with its own code."""
    operations = {
        f"{method.upper()} {path}" for path, item in served["paths"].items() for method in item
    }
    assert REACHED, "run with test_no_input_gets_a_server_error"
    unreached = sorted(operations - set(REACHED))
    assert unreached == []
    # and answered a valid input, not only refused a bad one; the fuzzer's uploads are named
    # ``file`` or ``file.png`` and refused for their type (uploads succeed in test_rag_api)
    succeeded = {label for label, statuses in REACHED.items() if min(statuses) < 300}
    failed = operations - succeeded - UPLOADS
    assert sorted(failed) == [], {label: REACHED[label] for label in failed}


def test_the_served_schema_is_the_one_fuzzed(served: dict[str, Any]) -> None:
    assert served["paths"] == schema.raw_schema["paths"]
    assert served["components"] == schema.raw_schema["components"]


UPLOADS = {"POST /v1/files", "POST /v1/vector_stores/{store_id}/files"}
# admin actions named by their path alone: they read no body
BODILESS = {
    "POST /admin/adapters/{name}/load",
    "POST /admin/adapters/{name}/unload",
    "POST /admin/prompts/reload",
}


def test_every_operation_with_a_body_describes_it(served: dict[str, Any]) -> None:
    """Fuzzing reaches an operation's checks only if the schema says what its body is."""
    undescribed = {
        f"{method.upper()} {path}"
        for path, item in served["paths"].items()
        for method, operation in item.items()
        if method in {"post", "put", "patch"} and "requestBody" not in operation
    }
    assert undescribed == BODILESS
