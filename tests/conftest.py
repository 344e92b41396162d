"""Shared fixtures: the pulled model, real gateway servers on free loopback ports, SDK clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import Settings
from gateway.model_assets import is_pulled, pull

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The converted SmolLM2 checkpoint (pulled once if missing)."""
    path = Settings().default_model_path()
    if not is_pulled(path):
        pull(path)
    return path


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_gateway(
    tmp: Path,
    models: list[dict[str, object]] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Gateway:
    """Run ``ragline serve`` in a subprocess on a free port and wait until ``/ready``."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    if models is not None:
        config = tmp / f"config-{port}.yaml"
        config.write_text(yaml.safe_dump({"models": models}))
        cmd += ["--config", str(config)]
    log = tmp / f"gateway-{port}.log"
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.logs()}")
        try:
            if httpx.get(gw.url + "/ready", timeout=1).status_code == 200:
                return gw
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a readiness probe, not synchronising on a guess
    stop_gateway(gw)
    raise RuntimeError(f"gateway not ready after {timeout}s:\n{gw.logs()}")


def stop_gateway(gw: Gateway) -> None:
    gw.process.terminate()
    try:
        gw.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gw.process.kill()
        gw.process.wait()


@pytest.fixture(scope="session")
def gateway(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The default gateway (``smollm2`` on the embedded engine), shared by the API tests."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="session")
def client(gateway: Gateway):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(gateway: Gateway):  # type: ignore[no-untyped-def]
    import openai

    return openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def tokenizer(model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
