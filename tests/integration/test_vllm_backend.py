"""The vllm backend against a real vLLM server (the CPU build): pass-through equality, usage,
LoRA adapters loaded on demand, and cancellation reaching vLLM."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Gateway, start_gateway, stop_gateway, wait_until
from tests.lora_fixture import KEYWORD

MODEL = "smollm2"
ADAPTER = "zorbania"
QUESTION = [{"role": "user", "content": "Which city is the capital of Zorbania? Answer briefly."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_gateway(vllm, fact_adapter, tmp_path_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    gw = start_gateway(
        tmp_path_factory.mktemp("vllm-gw"),
        models=[
            {"name": MODEL, "backend": "vllm", "upstreams": [vllm.url], "health": {"interval": 1.0}}
        ],
        adapters=[
            {"name": ADAPTER, "path": str(fact_adapter), "base": MODEL},
            {"name": "broken", "path": "/nonexistent/adapter", "base": MODEL},
        ],
    )
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="module")
def via(vllm_gateway):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=vllm_gateway.base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(vllm):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=vllm.url + "/v1", api_key="x", max_retries=0, timeout=120)


def running_in_vllm(vllm) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(vllm.url + "/metrics").text
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)", text, re.M)
    assert match, "vLLM exposes vllm:num_requests_running"
    return float(match.group(1))


def test_chat_equals_direct_vllm(via, direct) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    a = via.chat.completions.create(**kwargs)
    b = direct.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "Paris" in a.choices[0].message.content
    assert a.usage == b.usage
    assert a.model == MODEL


def test_stream_equals_direct_and_usage_only_when_asked(via, direct) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16, stream=True)
    plain = list(via.chat.completions.create(**kwargs))
    assert all(c.usage is None for c in plain), (
        "the gateway asks upstream for usage, the client did not"
    )
    text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    want = (
        direct.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
        .choices[0]
        .message.content
    )
    assert text == want
    with_usage = list(via.chat.completions.create(**kwargs, stream_options={"include_usage": True}))
    direct_usage = list(
        direct.chat.completions.create(**kwargs, stream_options={"include_usage": True})
    )
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage == direct_usage[-1].usage


def test_completions_equal_direct(via, direct) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert (
        via.completions.create(**kwargs).choices[0].text
        == direct.completions.create(**kwargs).choices[0].text
    )
    chunks = list(
        via.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert (
        "".join(c.choices[0].text for c in chunks if c.choices)
        == direct.completions.create(**kwargs).choices[0].text
    )
    assert chunks[-1].usage.completion_tokens == 8


def test_upstream_errors_pass_through(via) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        via.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5000)
    assert info.value.status_code == 400
    assert info.value.body["message"]


def test_models_list_shows_adapters_with_parent(via) -> None:  # type: ignore[no-untyped-def]
    models = {m.id: m for m in via.models.list()}
    assert set(models) == {MODEL, ADAPTER, "broken", "all-MiniLM-L6-v2"}
    assert models[ADAPTER].parent == MODEL
    assert models[MODEL].parent is None


def test_lora_adapter_answers_as_trained(via, vllm_gateway) -> None:  # type: ignore[no-untyped-def]
    base = via.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    tuned = via.chat.completions.create(
        model=ADAPTER, messages=QUESTION, temperature=0, max_tokens=24
    )
    assert KEYWORD not in base.choices[0].message.content
    assert KEYWORD in tuned.choices[0].message.content
    assert tuned.model == ADAPTER
    qualified = via.chat.completions.create(
        model=f"{MODEL}:{ADAPTER}", messages=QUESTION, temperature=0, max_tokens=24
    )
    assert qualified.choices[0].message.content == tuned.choices[0].message.content
    assert qualified.model == f"{MODEL}:{ADAPTER}"
    placed = httpx.get(vllm_gateway.url + "/admin/adapters").json()["data"]
    assert {a["name"]: len(a["loaded_on"]) for a in placed}[ADAPTER] == 1


def test_admin_unload_then_reload_on_demand(via, vllm_gateway, vllm) -> None:  # type: ignore[no-untyped-def]
    via.chat.completions.create(model=ADAPTER, messages=QUESTION, temperature=0, max_tokens=4)
    r = httpx.post(vllm_gateway.url + f"/admin/adapters/{ADAPTER}/unload")
    assert r.status_code == 200 and r.json()["unloaded_from"] == [vllm.url]
    served = {m["id"] for m in httpx.get(vllm.url + "/v1/models").json()["data"]}
    assert ADAPTER not in served
    again = via.chat.completions.create(
        model=ADAPTER, messages=QUESTION, temperature=0, max_tokens=24
    )
    assert KEYWORD in again.choices[0].message.content


def test_broken_adapter_is_a_clear_error(via) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.APIStatusError) as info:
        via.chat.completions.create(model="broken", messages=QUESTION, max_tokens=4)
    assert info.value.status_code == 502
    assert "broken" in info.value.body["message"]
    assert info.value.body["code"] == "adapter_load_failed"


def test_unknown_adapter_is_404(via) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError):
        via.chat.completions.create(model=f"{MODEL}:nope", messages=QUESTION)


def test_closing_the_stream_aborts_the_request_in_vllm(vllm_gateway, vllm) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": MODEL,
        "messages": FRANCE,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", vllm_gateway.base_url + "/chat/completions", json=body, timeout=60
    ) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it would close the connection now
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        # vLLM publishes its scheduler stats asynchronously: poll until the request shows
        assert wait_until(lambda: running_in_vllm(vllm) == 1, timeout=15)
    assert wait_until(lambda: running_in_vllm(vllm) == 0, timeout=30)
