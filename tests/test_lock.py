"""The supply chain: every dependency is installed from a lock that pins it with its hashes.

``requirements.lock`` holds what the server needs with the embedded engine (the CPU image installs
it), ``requirements-gateway.lock`` the same without PyTorch (the slim gateway image),
``requirements-dev.lock`` the first and the test tools (``make setup`` installs it); all with
``--require-hashes``, so a file that differs from the one locked is refused. These tests fail when
``pyproject.toml`` changes without ``make lock``, when the locks disagree, or when what is
installed is not what is locked."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
RUNTIME, DEV = REPO / "requirements.lock", REPO / "requirements-dev.lock"
SLIM = REPO / "requirements-gateway.lock"
TORCH = {"torch", "accelerate", "peft", "sentence-transformers"}


def pins(lock: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of each requirement in a pip-compile style lock."""
    out: dict[str, tuple[Version, list[str]]] = {}
    entry = re.compile(
        r"^([A-Za-z0-9._-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", re.M
    )
    for name, version, hashes in entry.findall(lock.read_text()):
        out[canonicalize_name(name)] = (Version(version), re.findall(r"[0-9a-f]{64}", hashes))
    return out


def declared() -> tuple[list[Requirement], list[Requirement]]:
    """(the server's requirements, the engine's included; the test tools)"""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = [Requirement(r) for r in project["dependencies"] + extras["engine"]]
    return runtime, [Requirement(r) for r in extras["dev"]]


def test_every_locked_requirement_has_hashes() -> None:
    for lock in (RUNTIME, DEV, SLIM):
        text = lock.read_text()
        requirements = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
        locked = pins(lock)
        assert len(requirements) == len(locked) > 50, lock.name
        assert all(hashes for _, hashes in locked.values()), lock.name


@pytest.mark.parametrize("lock", ["runtime", "dev"])
def test_every_declared_dependency_is_locked_within_its_range(lock: str) -> None:
    runtime, dev = declared()
    wanted, locked = (runtime, pins(RUNTIME)) if lock == "runtime" else (runtime + dev, pins(DEV))
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in the lock: run `make lock`"
        version, _ = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} in the lock is outside {requirement}: run `make lock`"
        )


def test_the_locks_agree() -> None:
    runtime, dev, slim = pins(RUNTIME), pins(DEV), pins(SLIM)
    assert set(runtime) <= set(dev)
    for name, (version, hashes) in runtime.items():
        assert dev[name] == (version, hashes), name
    assert set(slim) < set(runtime)
    for name, (version, hashes) in slim.items():
        assert runtime[name] == (version, hashes), name


def test_the_slim_lock_has_everything_but_pytorch() -> None:
    """The gateway's own requirements are all there; PyTorch and what only it needs are not."""
    slim = pins(SLIM)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        assert canonicalize_name(requirement.name) in slim, requirement
    assert not TORCH & set(slim)
    assert {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["engine"]
    } == TORCH


def test_what_is_installed_is_what_is_locked() -> None:
    for name, (version, _) in pins(DEV).items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # for another platform or Python (markers), or not needed here
        assert installed == version, f"{name} {installed} installed, {version} locked"


def test_setup_and_the_image_install_with_hashes_required() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes -r requirements-dev.lock" in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"--require-hashes[^\n]*\\\n\s*-r requirements\.lock", dockerfile)
    slim = (REPO / "deploy" / "image" / "Dockerfile.gateway").read_text()
    assert re.search(r"--no-deps --require-hashes[^\n]*-r requirements-gateway\.lock", slim)
