from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.config_file import ConfigError, load_file_config


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
        ("models: [{name: a}]\nroutes: [{name: r, model: b}]", "neither a model nor an adapter"),
        ("models: [{name: a}]\nroutes: [{name: a, model: a}]", "already taken"),
        ("models: [{name: a}]\nroutes: [{name: r, model: a, template: t}]", "prompts.dir"),
        (
            "models: [{name: a}]\nprompts: {dir: t}\nroutes: [{name: r, model: a, experiment: x}]",
            "experiment 'x' is not declared",
        ),
        (
            "models: [{name: a, backend: vllm, upstreams: ['http://h:1']}]\nprompts: {dir: t}\n"
            "routes: [{name: r, model: a, template: t}]",
            "set `tokenizer`",
        ),
        (
            "models: [{name: a}]\nexperiments: [{name: e, variants: [{name: v, weight: 0}]}]",
            "weight",
        ),
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


def test_serve_refuses_broken_templates_and_dangling_refs_before_starting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "qa.yaml").write_text("name: qa\nversion: 1\nuser: '{{ question }}'\n")
    config = tmp_path / "ragline.yaml"
    config.write_text(
        "models: [{name: smollm2}]\nprompts: {dir: templates}\n"
        "routes: [{name: r, model: smollm2, template: 'qa:canary'}]\n"
    )
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", "1"]
    broken = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2
    out = " ".join((broken.stdout + broken.stderr).split())
    assert "qa.yaml:3: user uses the undeclared variable 'question'" in out
    (templates / "qa.yaml").write_text("name: qa\nversion: 1\nuser: '{{ input }}'\n")
    dangling = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert dangling.returncode == 2
    assert "routes[r].template: template 'qa' has no version labelled 'canary'" in " ".join(
        (dangling.stdout + dangling.stderr).split()
    )


def test_served_hybrid_weights_are_the_measured_ones() -> None:
    """Routes and the vector-store search API default to the weights the library (and the
    README's nDCG@10) use: what is served is what was measured."""
    from gateway.config import RagConfig
    from gateway.routes.vector_stores import SearchBody
    from rag.retriever import SearchOptions

    assert RagConfig(store="s").weights == SearchBody(query="q").weights == (0.4, 0.6)
    assert SearchOptions().weights == (0.4, 0.6)
