"""The supply chain: every dependency is installed from a lock that pins it with its hashes.

``requirements.lock`` holds what the server needs (the image installs it), ``requirements-dev.lock``
that and the test tools (``make setup`` installs it); both with ``--require-hashes``, so a file
that differs from the one locked is refused. These tests fail when ``pyproject.toml`` changes
without ``make lock``, when the two locks disagree, or when what is installed is not what is
locked."""

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
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    return runtime, [Requirement(r) for r in project["optional-dependencies"]["dev"]]


def test_every_locked_requirement_has_hashes() -> None:
    for lock in (RUNTIME, DEV):
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


def test_the_two_locks_agree() -> None:
    runtime, dev = pins(RUNTIME), pins(DEV)
    assert set(runtime) <= set(dev)
    for name, (version, hashes) in runtime.items():
        assert dev[name] == (version, hashes), name


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
    assert "COPY pyproject.toml README.md requirements.lock" in dockerfile
