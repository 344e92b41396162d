from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.http import param_path, validation_error
from gateway.protocol import ChatCompletionRequest


@pytest.mark.parametrize(
    ("loc", "want"),
    [
        (("messages", 0, "content", "str"), "messages[0].content"),
        (
            ("messages", 1, "content", "list[TextContentPart]", 0, "type"),
            "messages[1].content[0].type",
        ),
        (("stop", "list[str]"), "stop"),
        ((), None),
    ],
)
def test_param_path(loc, want) -> None:  # type: ignore[no-untyped-def]
    assert param_path(loc) == want


def test_validation_error_prefers_the_specific_branch() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}'
        )
    err = validation_error(info.value)
    assert err.param == "messages[0].content[0].type"
    assert err.status_code == 400


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": []}'
        )
    err = validation_error(info.value)
    assert err.param == "functions"
    assert "Unrecognized" in err.message


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ('"function-call": 1', "function-call"),  # a dash is not a union tag here
        ('"": 1', ""),
        ('"messages": [{"role": "user", "content": "x", "x-trace": 1}]', "messages[0].x-trace"),
    ],
)
def test_unknown_field_named_as_sent(extra: str, want: str) -> None:
    body = '{"model": "m", "messages": [{"role": "user", "content": "y"}], ' + extra + "}"
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(body)
    err = validation_error(info.value)
    assert err.param == want
    assert err.message == f"Unrecognized request argument supplied: {want or repr(want)}"
