"""The capacity guide's figures (README, "Capacity guide"), each measured here with the code
that does the work in production:

- Redis: bytes per active API key (its RPM and TPM buckets, through the gateway's own batched
  Lua admission) and per cached answer, from ``INFO memory`` on a scratch database;
- PostgreSQL (or SQLite): bytes per usage-ledger row, through the ledger's own insert, from the
  table's total relation size (indexes included);
- the gateway: streamed tokens/s one gateway process relays (default safety policy, Redis
  limits, ledger, metrics) against the mock upstream alone, in the same run, and its resident
  memory afterwards.

    python -m benchmarks.capacity [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def redis_bytes_per_key(url: str, keys: int) -> float:
    import redis

    from gateway.config import KeyPolicy
    from gateway.ratelimit import RedisRateLimiter

    client = redis.Redis.from_url(url)
    prefix = f"cap-{secrets.token_hex(4)}"
    before = int(client.info("memory")["used_memory"])

    async def admit() -> None:
        import redis.asyncio as aredis

        conn = aredis.Redis.from_url(url)
        limiter = RedisRateLimiter(conn, fail_open=False)
        policy = KeyPolicy(rpm=600, tpm=100_000)
        for start in range(0, keys, 500):
            await asyncio.gather(*(limiter.reserve(f"{prefix}-{i}", policy, 300)
                                   for i in range(start, min(start + 500, keys))))  # fmt: skip
        await conn.aclose()

    asyncio.run(admit())
    after = int(client.info("memory")["used_memory"])
    for key in client.scan_iter(f"ragline:rl:{prefix}-*", count=1000):
        client.delete(key)
    return (after - before) / keys


def ledger_bytes_per_row(url: str, rows: int) -> float:
    from sqlalchemy import text

    from gateway.ledger_db import UsageRecord, engine_for, insert, migrate

    scratch = None
    if url.startswith("postgresql"):
        import psycopg

        scratch = f"ragline_capacity_{secrets.token_hex(4)}"
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {scratch}")
        target = url.rsplit("/", 1)[0] + "/" + scratch
    else:
        target = url
    engine = engine_for(target)
    try:
        migrate(engine)
        now = time.time()
        batch = [
            UsageRecord(
                f"req-{i:08d}-{secrets.token_hex(6)}",
                now + i / 1000,
                time.strftime("%Y-%m-%d"),
                f"team-key-{i % 200}",
                f"team-{i % 20}",
                "smollm2",
                "chat",
                "http://vllm-0:8000",
                None,
                None,
                412,
                128,
                False,
                200,
                812.5,
                41.2,
                0.000123,
            )  # fmt: skip
            for i in range(rows)
        ]
        for start in range(0, rows, 5000):
            insert(engine, batch[start : start + 5000])
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                size = connection.execute(
                    text("SELECT pg_total_relation_size('usage_records')")
                ).scalar()
            else:
                size = Path(target.removeprefix("sqlite:///")).stat().st_size
        return float(size or 0) / rows
    finally:
        engine.dispose()
        if scratch is not None:
            import psycopg

            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(f"DROP DATABASE {scratch} WITH (FORCE)")


async def _relay(
    url: str, headers: dict[str, str], model: str, streams: int, seconds: float
) -> float:
    """Tokens/s received over ``streams`` concurrent streams kept busy for ``seconds``."""
    import httpx
    import orjson

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 256}  # fmt: skip
    received = 0
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal received
        while time.monotonic() < deadline:
            async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                     headers=headers) as reply:  # fmt: skip
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        choices = orjson.loads(line[6:]).get("choices") or [{}]
                        received += bool(choices[0].get("delta", {}).get("content"))

    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        return received / (time.monotonic() - started)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def gateway_stream_rate(redis_url: str, streams: int, seconds: float) -> dict[str, float]:
    import yaml

    from gateway.auth import hash_key

    work = Path(tempfile.mkdtemp(prefix="ragline-capacity-"))
    mock_port, gw_port = _port(), _port()
    key = "sk-capacity"
    config = {"models": [{"name": "smollm2", "backend": "openai",
                          "upstreams": [f"http://127.0.0.1:{mock_port}"]}],
              "keys": [{"id": f"capacity-{time.time_ns()}", "sha256": hash_key(key),
                        "policy": {"rpm": 10_000_000, "tpm": 10_000_000_000}}]}  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "REDIS_URL": redis_url, "RAGLINE_LOG_LEVEL": "warning",
           "RAGLINE_DATABASE_URL": f"sqlite:///{work}/u.db",
           "RAGLINE_USAGE_SPOOL_DIR": str(work / "spool")}  # fmt: skip
    mock = subprocess.Popen([sys.executable, "-m", "benchmarks.mock_upstream", "--port",
                             str(mock_port), "--output-tokens", "256"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port",
                                str(gw_port), "--config", str(work / "config.yaml")], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{mock_port}/health", mock)
        _wait(f"http://127.0.0.1:{gw_port}/ready", gateway)
        auth = {"Authorization": f"Bearer {key}"}
        rates: dict[str, list[float]] = {"mock": [], "gateway": []}
        for _ in range(2):  # interleaved rounds
            rates["mock"].append(
                asyncio.run(
                    _relay(f"http://127.0.0.1:{mock_port}", {}, "smollm2", streams, seconds)
                )
            )
            rates["gateway"].append(
                asyncio.run(
                    _relay(f"http://127.0.0.1:{gw_port}", auth, "smollm2", streams, seconds)
                )
            )
        with open(f"/proc/{gateway.pid}/statm") as f:  # after the load: what a pod holds
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {
            **{name: max(values) for name, values in rates.items()},
            "gateway_rss_mib": rss / 2**20,
        }
    finally:
        for proc in (gateway, mock):
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "redis_bytes_per_key": redis_bytes_per_key(args.redis_url, args.keys),
        "ledger_bytes_per_row": ledger_bytes_per_row(args.database_url, args.rows),
        "stream_tokens_per_s": gateway_stream_rate(args.redis_url, args.streams, args.seconds),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rate = result["stream_tokens_per_s"]
    print(f"Redis: {result['redis_bytes_per_key']:.0f} bytes per active key (RPM + TPM buckets)")
    print(f"usage ledger: {result['ledger_bytes_per_row']:.0f} bytes per row with indexes "
          f"({args.database_url.split(':', 1)[0]})")  # fmt: skip
    print(f"streamed tokens/s, {args.streams} streams: mock alone {rate['mock']:,.0f}, through "
          f"one gateway process {rate['gateway']:,.0f} (default safety policy, Redis limits, "
          "ledger)")  # fmt: skip
    print(f"gateway process resident memory after that load: {rate['gateway_rss_mib']:,.0f} MiB "
          "(no vector store loaded)")  # fmt: skip


if __name__ == "__main__":
    main()
