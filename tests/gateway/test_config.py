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


# -- config errors: one formatter, file:line, did-you-mean, no secrets (issue 23, item 1) ----------

KEY = "rl-" + "s3cr3t" * 8


@pytest.mark.parametrize(
    ("text", "expected", "forbidden"),
    [
        (  # a key pasted where its hash belongs
            f"models: [{{name: a}}]\nkeys:\n  - id: team-a\n    sha256: {KEY}\n",
            ["ragline.yaml:4: keys[0].sha256: expected the SHA-256 of a key", "its hash"],
            [KEY, "s3cr3t", "input_value", "errors.pydantic.dev"],
        ),
        (  # a misspelt setting
            "models:\n  - name: a\n    max_bacth: 8\n",
            ["ragline.yaml:3: models[0].max_bacth: unknown setting; did you mean 'max_batch'?"],
            ["Extra inputs", "errors.pydantic.dev", "embedded."],
        ),
        (  # a misspelt backend
            "models:\n  - name: a\n    backend: embeded\n",
            [
                "ragline.yaml:3: models[0].backend: 'embeded' is not one of embedded, vllm, openai;"
                " did you mean 'embedded'?"
            ],
            ["_backend_of", "Input tag"],
        ),
        (  # a misspelt choice
            "models: [{name: a}]\nroutes:\n  - name: r\n    model: a\n"
            "    rag: {store: s, mode: hybird}\n",
            [
                "ragline.yaml:5: routes[0].rag.mode: expected one of hybrid, dense, bm25, got 'hybird';"
                " did you mean 'hybrid'?"
            ],
            ["literal_error"],
        ),
        (  # an upstream token is never echoed
            "models:\n  - name: a\n    backend: vllm\n    upstreams: ['http://h:1']\n"
            "    api_key: [sk-very-secret]\n",
            ["ragline.yaml:5: models[0].api_key: invalid api_key (the value is not shown)"],
            ["sk-very-secret"],
        ),
        (  # a section misspelt at the top level
            "models: [{name: a}]\nroute: []\n",
            ["ragline.yaml:2: route: unknown setting; did you mean 'routes'?"],
            [],
        ),
        (  # a wrong type names what it got
            "models:\n  - name: a\n    max_batch: lots\n",
            ["ragline.yaml:3: models[0].max_batch: input should be a valid integer", "'lots'"],
            [],
        ),
    ],
)
def test_config_errors_name_file_line_and_fix_and_never_a_secret(  # type: ignore[no-untyped-def]
    tmp_path, text, expected, forbidden
) -> None:
    path = tmp_path / "ragline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_file_config(Settings(config=path))
    message = str(info.value)
    for needle in expected:
        assert needle in message, message
    for needle in forbidden:
        assert needle not in message, message


def test_cli_prints_config_and_environment_errors_with_one_formatter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    config = tmp_path / "ragline.yaml"
    config.write_text(f"models: [{{name: smollm2}}]\nkeys:\n  - id: k\n    sha256: {KEY}\n")
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "ragline.yaml:4: keys[0].sha256" in " ".join(run.stderr.split())
    assert KEY not in run.stdout + run.stderr and "Traceback" not in run.stderr

    env = {**os.environ, "RAGLINE_ADMIN_KEY": "x", "RAGLINE_PORT": "eighty"}
    run = subprocess.run(cmd[:4], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2
    out = " ".join(run.stderr.split())
    assert "RAGLINE_PORT (--port): input should be a valid integer" in out, out
    assert "Traceback" not in run.stderr and "errors.pydantic.dev" not in out


def _serve_until_banner(cmd: list[str], env: dict[str, str]) -> tuple[str, int | None]:
    """Run ``ragline serve`` until its banner's last line (or its exit); return what it printed
    and its exit status (None: it was serving and got stopped)."""
    import subprocess

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)  # fmt: skip
    lines = []
    assert proc.stderr is not None
    serving = False
    for line in proc.stderr:
        lines.append(line)
        if line.lstrip().startswith("keys:"):
            serving = True
            break
    # stderr at its end: the process is exiting (its pipe can close before its status is set)
    code = None if serving else proc.wait(timeout=60)
    proc.terminate()
    proc.wait(timeout=60)
    return "".join(lines), code


def test_banner_prints_after_the_port_is_bound_and_lists_what_is_served(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 23, item 8: a port in use is one clear error with no banner before it; the banner
    lists models, routes, stores (with a did-you-mean for a misspelt route store), the safety
    policy and the number of keys."""
    import os
    import socket
    import sys

    from rag.store import VectorStore
    from tests.conftest import free_port

    rag = tmp_path / "rag"
    VectorStore.create(rag / "stores", "handbook", dim=384, embedder_name="all-MiniLM-L6-v2")
    config = tmp_path / "ragline.yaml"
    config.write_text(
        "models: [{name: smollm2}]\n"
        "routes: [{name: hr-qa, model: smollm2, rag: {store: handbok}}]\n"
        f"keys: [{{id: a, sha256: '{'a' * 64}'}}, {{id: b, sha256: '{'b' * 64}'}}]\n"
    )
    env = {**os.environ, "RAGLINE_RAG_DIR": str(rag)}
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "-c", str(config), "--port", str(port)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out, code = _serve_until_banner(cmd, env)
    assert code == 2, out
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out
    assert "serving on" not in out and "Traceback" not in out

    out, code = _serve_until_banner(cmd, env)
    assert code is None, out
    assert f"ragline serving on http://127.0.0.1:{port}/v1" in out
    assert "models:   smollm2 (embedded)" in out
    assert "route:    hr-qa -> smollm2, template grounded-qa, store handbok" in out
    assert "stores:   handbook" in out and "safety:   default" in out and "keys:     2" in out
    flat = " ".join(out.split())
    assert "Route 'hr-qa' searches vector store 'handbok', which does not exist" in flat
    assert "did you mean 'handbook'?" in flat


def test_every_setting_is_a_serve_flag_with_one_style_of_help() -> None:
    """Issue 23, item 9: `serve --help` showed 7 options while most settings were environment
    only, defaults were written two ways, every flag was labelled <bool>; no --version."""
    from importlib.metadata import version

    from typer.testing import CliRunner

    from gateway.cli import app
    from gateway.cli.flags import env_names

    runner = CliRunner()
    shown = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert shown.exit_code == 0
    text = " ".join(shown.output.split())
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert f"(env {' or '.join(env_names(name))}; default" in text, name
    assert "<bool>" not in text and "[default:" not in text
    for panel in ("Listening", "Models and files", "Retrieval and uploads", "Logging"):
        assert panel in text
    assert runner.invoke(app, ["--version"]).output.strip() == version("ragline")


def test_serve_flags_reach_the_settings(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A flag wins over the variable; a flag not given leaves the variable's value."""
    import typer
    from typer.testing import CliRunner

    from gateway.cli.flags import with_settings_flags
    from gateway.config_file import load_settings

    seen = {}

    def fake_serve(**flags: object) -> None:
        seen.update(load_settings(**flags).model_dump())

    probe = typer.Typer()
    probe.command()(with_settings_flags(fake_serve))
    monkeypatch.setenv("RAGLINE_MAX_N", "3")
    monkeypatch.setenv("RAGLINE_CACHE_TTL", "60")
    result = CliRunner().invoke(probe, ["--cache-ttl", "5", "--no-log-prompts", "--rag-dir", "/x"])
    assert result.exit_code == 0, result.output
    assert (seen["max_n"], seen["cache_ttl"], seen["log_prompts"]) == (3, 5, False)
    assert str(seen["rag_dir"]) == "/x"
