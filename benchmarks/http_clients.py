"""Which async HTTP client should the vLLM backend use? Measured, not guessed.

    python -m benchmarks.http_clients --url http://127.0.0.1:9100 [--requests 3000]

Sends the same non-streaming and streaming chat requests to an upstream (start
``python -m benchmarks.mock_upstream`` first) with httpx and with aiohttp, interleaved in one run,
and prints requests/s for each. Both clients share the machine with the upstream, so compare the
ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def run_httpx(url: str, n: int, concurrency: int, stream: bool) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        body = {**BODY, "stream": stream}

        async def one() -> None:
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_raw():
                        pass
            else:
                r = await client.post("/v1/chat/completions", json=body)
                r.json()

        return await _drive(one, n, concurrency)


async def run_aiohttp(url: str, n: int, concurrency: int, stream: bool) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        data = json.dumps({**BODY, "stream": stream}).encode()
        headers = {"content-type": "application/json"}

        async def one() -> None:
            async with session.post("/v1/chat/completions", data=data, headers=headers) as r:
                if stream:
                    async for _ in r.content.iter_any():
                        pass
                else:
                    await r.json()

        return await _drive(one, n, concurrency)


async def _drive(one: Callable[[], Awaitable[None]], n: int, concurrency: int) -> float:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def main_async(args: argparse.Namespace) -> None:
    for stream in (False, True):
        results: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
        for _ in range(args.rounds):  # interleaved rounds: both see the same machine noise
            results["httpx"].append(
                await run_httpx(args.url, args.requests, args.concurrency, stream)
            )
            results["aiohttp"].append(
                await run_aiohttp(args.url, args.requests, args.concurrency, stream)
            )
        best = {k: max(v) for k, v in results.items()}
        print(
            f"{'stream' if stream else 'json  '}: httpx {best['httpx']:.0f} req/s, "
            f"aiohttp {best['aiohttp']:.0f} req/s, "
            f"aiohttp/httpx {best['aiohttp'] / best['httpx']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:9100")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
