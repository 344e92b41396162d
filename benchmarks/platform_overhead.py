"""The gateway's own cost with auth, rate limits, metrics and logs on, against the fast mock.

    python -m benchmarks.platform_overhead [--requests 2000] [--rounds 3] [--connections 16]

Starts the mock upstream and one gateway process (an API key with RPM/TPM limits, Redis-backed
limits when ``REDIS_URL`` is set or Redis answers on 127.0.0.1:6379, Prometheus metrics, JSON
access logs to a file), then measures in one run, interleaved round by round:

- non-streaming latency at one connection, direct to the mock and through the gateway
  (p50 and p99 of end-to-end time, and their differences);
- the most non-streaming requests/s at ``--connections`` connections, each way.

The load generator runs on the same machine, so it competes for the same cores; compare the two
sides of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.metrics import percentile
from gateway.auth import hash_key

KEY = "sk-platform-bench"
BODY = json.dumps(
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
).encode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_url() -> str | None:
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return "redis://127.0.0.1:6379/0"
    except OSError:
        return None


async def _wait(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def latencies(url: str, headers: dict[str, str], n: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            out.append(time.perf_counter() - start)
        return out


async def max_rate(url: str, headers: dict[str, str], n: int, connections: int) -> float:
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = n
        failures = 0

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                async with session.post(url, data=BODY, headers=headers) as r:
                    await r.read()
                    failures += r.status != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
        if failures:
            raise RuntimeError(f"{failures} requests failed")
        return n / elapsed


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="ragline-platform-"))
    mock_port, gw_port = _port(), _port()
    redis_url = _redis_url()
    config = work / "gateway.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "smollm2",
                        "backend": "vllm",
                        "upstreams": [f"http://127.0.0.1:{mock_port}"],
                    }
                ],
                "keys": [
                    {
                        "id": "bench",
                        "sha256": hash_key(KEY),
                        "policy": {"rpm": 100_000_000, "tpm": 1_000_000_000},
                    }
                ],
            }
        )
    )
    env = {**os.environ, "RAGLINE_LOG_LEVEL": "info"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    mock = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--port",
            str(gw_port),
            "--config",
            str(config),
        ],
        env=env,
        stdout=(work / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait(f"http://127.0.0.1:{mock_port}/health")
        await _wait(f"http://127.0.0.1:{gw_port}/ready")
        direct = (
            f"http://127.0.0.1:{mock_port}/v1/chat/completions",
            {"Content-Type": "application/json"},
        )
        via = (
            f"http://127.0.0.1:{gw_port}/v1/chat/completions",
            {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        lat: dict[str, list[float]] = {"direct": [], "gateway": []}
        rate = {"direct": 0.0, "gateway": 0.0}
        await latencies(*via, 100)  # warm-up: connections, JIT-free but cache-warm paths
        for _ in range(args.rounds):
            for name, (url, headers) in (("direct", direct), ("gateway", via)):
                lat[name] += await latencies(url, headers, args.latency_requests)
            for name, (url, headers) in (("direct", direct), ("gateway", via)):
                rate[name] = max(
                    rate[name], await max_rate(url, headers, args.requests, args.connections)
                )
        result: dict[str, object] = {"redis": bool(redis_url), "connections": args.connections}
        for q in (50, 99):
            d = percentile(lat["direct"], q) * 1000
            g = percentile(lat["gateway"], q) * 1000
            result[f"p{q}_ms"] = {
                "direct": round(d, 3),
                "gateway": round(g, 3),
                "added": round(g - d, 3),
            }
        result["max_requests_per_s"] = {k: round(v) for k, v in rate.items()}
        return result
    finally:
        for proc in (gateway, mock):
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="per max-rate round")
    parser.add_argument("--latency-requests", type=int, default=500, help="per latency round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    result = asyncio.run(main_async(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
