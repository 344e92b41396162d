"""Cancellation on disconnect, the bounded queue, and readiness, against real gateways."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import start_gateway, stop_gateway, wait_until

MODEL = "smollm2"
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to one thousand."}],
    "max_tokens": 1500,
    "ignore_eos": True,
}


def running(gateway) -> int:  # type: ignore[no-untyped-def]
    return int(httpx.get(gateway.url + "/ready").json()["models"][MODEL]["running"])


def test_health_and_ready(gateway) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["models"][MODEL]["status"] == "ready"


def test_closing_a_stream_stops_its_generation(gateway) -> None:  # type: ignore[no-untyped-def]
    with httpx.stream(
        "POST", gateway.base_url + "/chat/completions", json={**LONG, "stream": True}, timeout=60
    ) as r:
        lines = r.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # generation is under way
        assert running(gateway) == 1
    # the connection is closed: the engine must drop the sequence long before 1500 tokens
    assert wait_until(lambda: running(gateway) == 0, timeout=30)


def test_disconnect_before_a_non_streaming_answer_cancels_it(gateway) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.base_url + "/chat/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0)
        )
    assert wait_until(lambda: running(gateway) == 0, timeout=30)


async def test_full_queue_answers_503_with_retry_after(model_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, models=[{"name": MODEL, "max_batch": 1, "max_waiting": 1}])
    try:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
        results = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=MODEL,
                    messages=LONG["messages"],
                    max_tokens=40,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(4)
            ),
            return_exceptions=True,
        )
        rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert rejected and served
        for exc in rejected:
            assert exc.status_code == 503
            assert exc.response.headers["retry-after"] == "1"
            assert exc.body["type"] == "server_overloaded"
        assert len(served) + len(rejected) == 4
    finally:
        stop_gateway(gw)


def test_a_missing_model_reports_not_ready(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port  # noqa: F401  (start_gateway waits for /ready)

    with pytest.raises(RuntimeError) as info:
        start_gateway(
            tmp_path, models=[{"name": "ghost", "path": str(tmp_path / "none")}], timeout=15
        )
    assert "ragline models pull" in str(info.value)


async def test_concurrent_requests_are_batched_and_independent(model_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Six requests decoded in one batch answer exactly as each does alone.

    float32, because bf16 matmuls round differently at different batch sizes and a near-tie
    can then flip a greedy choice (vLLM has the same property); float32 shows that batching
    itself never mixes sequences up.
    """
    gw = start_gateway(tmp_path, models=[{"name": MODEL, "dtype": "float32"}])
    try:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
        questions = [
            "What is the capital of France?",
            "What is 2 + 2?",
            "Name a color.",
            "Who wrote Hamlet?",
            "What is water made of?",
            "Say hello.",
        ]

        def ask(q: str):  # type: ignore[no-untyped-def]
            return client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
            )

        alone = [(await ask(q)).choices[0].message.content for q in questions]
        together = await asyncio.gather(*(ask(q) for q in questions))
        assert [r.choices[0].message.content for r in together] == alone
        assert len(set(alone)) == len(alone)
    finally:
        stop_gateway(gw)
