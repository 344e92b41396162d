"""Bad input gets OpenAI-shaped errors with the right status and ``param``; nothing reaches the
model, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "smollm2"
MSG = [{"role": "user", "content": "hi"}]


def assert_error_shape(body: dict, status_type: str | None = None) -> dict:  # type: ignore[type-arg]
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if status_type:
        assert err["type"] == status_type
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 100}, "n"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -9}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
                }
            },
            "response_format",
        ),
        ({"top_logprobs": 3}, None),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ],
)
def test_bad_parameters_name_the_param(client, kwargs, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MSG, **kwargs)
    assert info.value.status_code == 400
    err = assert_error_shape(info.value.response.json(), "invalid_request_error")
    assert err["param"] == param


def test_unknown_field_is_refused_not_ignored(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MSG, audio={"voice": "alloy", "format": "wav"}
        )
    assert info.value.body["param"] == "audio"
    assert "Unrecognized request argument" in info.value.body["message"]


def test_unknown_model_is_404(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    err = assert_error_shape(info.value.response.json())
    assert err["param"] == "model" and err["code"] == "model_not_found"


def test_empty_messages(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.body["param"] == "messages"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0]"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
        ),
        ([{"role": "user", "content": "hi", "name": "bob"}], "messages[0].name"),
        ("hello", "messages"),
    ],
)
def test_bad_messages(client, messages, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert info.value.body["param"] == param


def test_context_length_exceeded(client) -> None:  # type: ignore[no-untyped-def]
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=5000)
    assert info.value.code == "context_length_exceeded"


def test_malformed_json(gateway) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        content=b'{"model": "smollm2", "mess',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert_error_shape(r.json(), "invalid_request_error")
    for body in (b"", b"[1, 2]", b"null", b'"text"'):
        r = httpx.post(gateway.base_url + "/chat/completions", content=body)
        assert r.status_code == 400, body
        assert_error_shape(r.json())


def test_invalid_utf8(gateway) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "UTF-8" in assert_error_shape(r.json())["message"]


def test_lone_surrogate_escape_is_a_clear_400(gateway) -> None:  # type: ignore[no-untyped-def]
    # JSON can escape an unpaired surrogate, which is no Unicode text: 400, never a 500.
    body = b'{"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert_error_shape(r.json(), "invalid_request_error")


def test_control_characters_are_fine(client) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": "a\x00\x07\x1bb"}],
    )
    assert r.choices[0].message.content is not None


def test_ten_megabyte_body_is_413(gateway) -> None:  # type: ignore[no-untyped-def]
    big = b'{"model": "smollm2", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20)
    big += b'"}]}'
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        content=big,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413
    assert_error_shape(r.json(), "invalid_request_error")

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(11):
            yield b"a" * (1 << 20)

    r = httpx.post(gateway.base_url + "/chat/completions", content=chunked(), timeout=60)
    assert r.status_code == 413


def test_unknown_route_and_method(gateway) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(gateway.url + "/v1/nope")
    assert r.status_code == 404
    assert_error_shape(r.json(), "not_found_error")
    r = httpx.get(gateway.base_url + "/chat/completions")
    assert r.status_code == 405
    assert_error_shape(r.json())


def test_stream_options_without_stream(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=MSG, stream_options={"include_usage": True}
        )


def test_completions_bad_input(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert info.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[10**9])
    assert info.value.body["param"] == "prompt"
    # negative or wider than 32 bits: refused before any tokenizer sees them (found by fuzzing)
    for prompt in ([-1], [[5], [7, -8284791]], [[1, 2**40]]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt)
        assert info.value.body["param"].startswith("prompt")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", logprobs=9)
    assert info.value.body["param"] == "logprobs"


def test_server_still_serves_after_bad_input(client) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def test_request_id_is_echoed(gateway) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(gateway.base_url + "/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert httpx.get(gateway.base_url + "/models").headers["x-request-id"]


def test_a_multipart_header_buys_the_upload_limit_on_upload_routes_only(gateway) -> None:  # type: ignore[no-untyped-def]
    body = b"x" * (5 << 20)  # over the 4 MiB request limit, under the 32 MiB upload limit
    multipart = {"content-type": "multipart/form-data; boundary=zz"}
    r = httpx.post(gateway.base_url + "/chat/completions", content=body, headers=multipart)
    assert r.status_code == 413  # not an upload route: the request limit
    r = httpx.post(gateway.base_url + "/vector_stores", content=body, headers=multipart)
    assert r.status_code == 413
    r = httpx.post(gateway.base_url + "/files", content=body, headers=multipart, timeout=60)
    assert r.status_code == 400  # read whole (the upload limit), then refused as a bad form


def test_n_times_max_tokens_is_bounded(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:  # 8 × 5,000 > 32,768
        client.chat.completions.create(model=MODEL, messages=MSG, n=8, max_tokens=5000)
    assert info.value.body["param"] == "max_tokens" and "32768" in info.value.body["message"]


def test_numbers_sent_as_strings_or_floats_are_read_as_validated(client) -> None:  # type: ignore[no-untyped-def]
    # accepted as OpenAI's and vLLM's servers accept them; every step after validation sees the
    # numbers (a string max_tokens once reached the limits and the engine as a string)
    r = client.chat.completions.create(
        model=MODEL,
        messages=MSG,
        extra_body={"n": "2", "max_tokens": "3", "seed": 7.0, "temperature": "0"},
    )
    assert len(r.choices) == 2
    assert r.usage.completion_tokens <= 6
    completion = client.completions.create(model=MODEL, prompt=[[504.0, 2.0]], max_tokens=2)
    assert completion.usage.prompt_tokens == 2
