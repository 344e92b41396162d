from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings, load_file_config


def test_default_config_serves_smollm2_without_a_file() -> None:
    config = load_file_config(Settings(config=None))
    assert [m.name for m in config.models] == ["smollm2"]


def test_env_prefix(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RAGLINE_PORT", "9123")
    monkeypatch.setenv("RAGLINE_MAX_N", "3")
    s = Settings()
    assert (s.port, s.max_n) == (9123, 3)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models: [{name: a}, {name: a}]", "repeated: a"),
        ("models: [{name: a, backend: tpu}]", "backend"),
        ("models: [{name: a, max_batch: 0}]", "max_batch"),
        ("models: [{name: a, colour: red}]", "colour"),
        ("models: [", "not valid YAML"),
        ("models: []", "declares no models"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, needle) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ragline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_file_config(Settings(config=path))
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        load_file_config(Settings(config=tmp_path / "nope.yaml"))
