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
    adapters: list[dict[str, object]] | None = None,
    keys: list[dict[str, object]] | None = None,
    extra: dict[str, object] | None = None,
    args: list[str] | None = None,
    until: str = "ready",
    python_args: list[str] | None = None,
) -> Gateway:
    """Run ``ragline serve`` in a subprocess on a free port and wait until ``/ready``.

    ``extra`` adds top-level sections to the config file (prompts, routes, experiments).
    ``until="models"``: wait for the models only, for routes whose vector stores the test
    creates through the API after start (``/ready`` stays 503 until they exist).
    ``python_args``: interpreter options (``-S`` for an environment built on PYTHONPATH).
    """
    port = free_port()
    cmd = [sys.executable, *(python_args or []), "-m", "gateway.cli", "serve", "--port", str(port)]
    cmd += args or []
    if models is not None:
        config = tmp / f"config-{port}.yaml"
        document = {"models": models, "adapters": adapters or [], "keys": keys or []}
        config.write_text(yaml.safe_dump({**document, **(extra or {})}))
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
            ready = httpx.get(gw.url + "/ready", timeout=1)
            if ready.status_code == 200:
                return gw
            models = ready.json().get("models", {}).values()
            if until == "models" and all(m.get("status") == "ready" for m in models):
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


# -- real vLLM (CPU build) and the mock upstream ----------------------------------------------

VLLM_PYTHON = Path(os.environ.get("RAGLINE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


@dataclass
class Upstream:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a readiness probe
    proc.kill()
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start_vllm(model_path: Path, tmp: Path, port: int | None = None) -> Upstream:
    """A real vLLM OpenAI server (the CPU build, from .venv-vllm) on the converted SmolLM2."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError(f"{VLLM_PYTHON} is missing: run `make vllm-install` (make test does)")
    port = port or free_port()
    log = tmp / f"vllm-{port}.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "4",
        # tools as ragline's embedded engine renders and parses them (make vllm does the same)
        "--chat-template",
        str(REPO / "gateway" / "backends" / "chatml_tools.jinja"),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/v1/models", proc, log, timeout=300)
    return Upstream(url, proc, log)


def start_mock(tmp: Path, port: int | None = None, **options: object) -> Upstream:
    """``benchmarks.mock_upstream`` in its own process (a fake, for fault injection only)."""
    port = port or free_port()
    log = tmp / f"mock-{port}.log"
    cmd = [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(port)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", proc, log, timeout=30)
    return Upstream(url, proc, log)


@pytest.fixture(scope="session")
def vllm(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """One real vLLM-CPU server for the whole run."""
    upstream = start_vllm(model_path, tmp_path_factory.mktemp("vllm"))
    yield upstream
    upstream.process.terminate()
    try:
        upstream.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        upstream.kill()


@pytest.fixture(scope="session")
def fact_adapter(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.lora_fixture import train_fact_adapter

    return train_fact_adapter(model_path, tmp_path_factory.mktemp("adapter") / "zorbania")
