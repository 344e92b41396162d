"""One contract, three backends: the embedded engine, vLLM (the real CPU build) and the generic
``openai`` backend (here in front of a second ragline, its key from the environment). The same
requests through the same gateway pipeline must give the same shapes, usage, errors, safety
annotations and cancellation, whichever backend serves them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import Gateway, start_gateway, stop_gateway, wait_until

MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
UPSTREAM_KEY = "sk-upstream-contract-1234"


@dataclass
class Served:
    name: str
    client: openai.OpenAI
    running: Callable[[], float]  # requests the backend is working on right now


def _ready_running(gw: Gateway) -> Callable[[], float]:
    def running() -> float:
        return float(httpx.get(gw.url + "/ready").json()["models"][MODEL]["running"])

    return running


@pytest.fixture(scope="module")
def upstream_ragline(model_path, tmp_path_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    """A second ragline (embedded engine, a key required): the `openai` backend's upstream."""
    gw = start_gateway(
        tmp_path_factory.mktemp("upstream"),
        models=[{"name": MODEL}],
        keys=[{"id": "front", "sha256": hash_key(UPSTREAM_KEY)}],
        extra={"safety": {"enabled": False}},
    )
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="module")
def openai_gateway(upstream_ragline, tmp_path_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    model = {
        "name": MODEL,
        "backend": "openai",
        "upstreams": [upstream_ragline.base_url],
        "api_key_env": "RAGLINE_TEST_UPSTREAM_KEY",
        "health": {"path": "/health"},
    }
    gw = start_gateway(
        tmp_path_factory.mktemp("openai-gw"),
        models=[model],
        env={"RAGLINE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="module")
def vllm_contract_gateway(vllm, tmp_path_factory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    gw = start_gateway(
        tmp_path_factory.mktemp("vllm-contract"),
        models=[{"name": MODEL, "backend": "vllm", "upstreams": [vllm.url]}],
    )
    yield gw
    stop_gateway(gw)


def _sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(params=["embedded", "vllm", "openai"])
def served(request) -> Served:  # type: ignore[no-untyped-def]
    if request.param == "embedded":
        gw = request.getfixturevalue("gateway")
        return Served("embedded", _sdk(gw), _ready_running(gw))
    if request.param == "vllm":
        gw = request.getfixturevalue("vllm_contract_gateway")
        upstream = request.getfixturevalue("vllm")

        def running() -> float:
            text = httpx.get(upstream.url + "/metrics").text
            match = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)", text, re.M)
            assert match, "vLLM exposes vllm:num_requests_running"
            return float(match.group(1))

        return Served("vllm", _sdk(gw), running)
    gw = request.getfixturevalue("openai_gateway")
    return Served("openai", _sdk(gw), _ready_running(request.getfixturevalue("upstream_ragline")))


def test_chat_json(served: Served) -> None:
    r = served.client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24
    )
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same pipeline annotates every backend's answer: output safety ran on it
    assert r.model_extra["ragline"]["safety"]["policy"] == "default"


def test_stream_equals_json_and_usage_only_when_asked(served: Served) -> None:
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    whole = served.client.chat.completions.create(**kwargs)
    plain = list(served.client.chat.completions.create(**kwargs, stream=True))
    assert plain[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in plain) and all(c.id == plain[0].id for c in plain)
    text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in plain if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    counted = list(
        served.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert counted[-1].choices == [] and counted[-1].usage == whole.usage


def test_n_choices_stop_and_completions(served: Served) -> None:
    r = served.client.chat.completions.create(
        model=MODEL, messages=FRANCE, n=2, temperature=0.8, seed=3, max_tokens=8
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    stopped = served.client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"]
    )
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    kwargs = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    text = served.client.completions.create(**kwargs).choices[0].text
    chunks = list(
        served.client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_a_request_the_model_cannot_take_is_a_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5000)
    assert info.value.status_code == 400 and info.value.body["message"]


def test_closing_the_stream_cancels_the_work(served: Served) -> None:
    stream = served.client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert wait_until(lambda: served.running() >= 1, timeout=15)
    stream.close()
    assert wait_until(lambda: served.running() == 0, timeout=30)
