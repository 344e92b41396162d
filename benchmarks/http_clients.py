"""Which clients should the request path use? Measured, not guessed.

    python -m benchmarks.http_clients [--requests 3000] [--redis redis://127.0.0.1:6379/0]

Starts the mock upstream and sends the same non-streaming chat request, one at a time, with
httpx, aiohttp and ragline's own HTTP/1.1 pool (``gateway/backends/http1.py``), interleaved in
one run; then, when Redis answers, the rate limiter's script through redis-py and through
ragline's RESP connection (``gateway/resp.py``). It prints the CPU time this process spent per
call (what a gateway pays for each upstream or Redis call, on top of what it does itself) and
the wall time per call. The upstream shares the machine, so compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from gateway.backends.http1 import HttpPool

BODY = json.dumps(
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
).encode()
PATH = "/v1/chat/completions"


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call, after a warm-up."""
    for _ in range(min(200, n)):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await call()
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def http_clients(url: str, n: int) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def with_httpx() -> None:
            (await client.post(PATH, content=BODY, headers=headers)).read()

        out["httpx"] = await _timed(with_httpx, n)
    async with aiohttp.ClientSession(url) as session:

        async def with_aiohttp() -> None:
            async with session.post(PATH, data=BODY, headers=headers) as r:
                await r.read()

        out["aiohttp"] = await _timed(with_aiohttp, n)
    pool = HttpPool(url, headers=headers)

    async def with_pool() -> None:
        await (await pool.request("POST", PATH, BODY)).read()

    out["ragline http1 (httptools)"] = await _timed(with_pool, n)
    await pool.aclose()
    return out


async def redis_clients(url: str, n: int) -> dict[str, tuple[float, float]]:
    import redis.asyncio as aioredis

    from gateway.ratelimit import _BATCH
    from gateway.resp import RespConnection

    keys = ["ragline:rl:bench-clients:req", "ragline:rl:bench-clients:tok"]
    args = [0, 1, 100_000_000, 1_000_000_000, 20]
    client = aioredis.from_url(url)
    script = client.register_script(_BATCH)

    async def with_redis_py() -> None:
        await script(keys=keys, args=args)

    out = {"redis-py EVALSHA": await _timed(with_redis_py, n)}
    await client.aclose()
    connection = RespConnection.from_url(url)
    assert connection is not None

    async def with_resp() -> None:
        await connection.script(_BATCH, keys, args)

    out["ragline RESP (hiredis) EVALSHA"] = await _timed(with_resp, n)
    await connection.aclose()
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait(url: str) -> None:
    for _ in range(300):
        try:
            async with httpx.AsyncClient() as client:
                if (await client.get(url + "/health")).status_code == 200:
                    return
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip")
    args = parser.parse_args()
    port = _port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import uvloop

        async def both() -> dict[str, tuple[float, float]]:
            await _wait(url)
            rows = await http_clients(url, args.requests)
            if args.redis:
                rows.update(await redis_clients(args.redis, args.requests))
            return rows

        rows = uvloop.run(both())
    finally:
        mock.terminate()
        mock.wait(timeout=30)
    print("| client | CPU per call | wall per call |")
    print("|---|---|---|")
    for name, (cpu, wall) in rows.items():
        print(f"| {name} | {cpu:.0f} µs | {wall:.0f} µs |")


if __name__ == "__main__":
    main()
