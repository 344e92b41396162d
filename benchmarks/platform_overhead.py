"""The gateway's own cost with keys, Redis limits, metrics and JSON logs on, against the mock.

    python -m benchmarks.platform_overhead [--seconds 5] [--rounds 3] [--connections 16] [--json]

Starts the mock upstream and two gateway processes in front of it (an API key with RPM/TPM
limits, Redis-backed limits when ``REDIS_URL`` is set or Redis answers on 127.0.0.1:6379,
Prometheus metrics, JSON access logs to a file, the usage ledger on SQLite): one with safety
off, one with the default policy, and the default policy with the usage ledger off (what the
ledger costs). Then, in one run, interleaved round by round so all see the same machine noise:

- non-streaming latency at one connection (p50 and p99), each of the three;
- the most non-streaming requests/s at ``--connections`` connections, each of the three;
- the time to the first text of a stream, one at a time, from a second mock that answers
  ordinary prose at 50 tokens/s (a stream guard that held a word back would show it).

It prints the added latency and the requests/s of each gateway beside the goals of the
pipeline issue. The load comes from ``wrk`` when it is installed (Debian's ``wrk``: a C load
generator that leaves the cores to the servers), else from an aiohttp client in this process,
which competes for the same two cores (its figures are lower; compare sides of one run only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.metrics import percentile
from gateway.auth import hash_key

KEY = "sk-platform-bench"
BODY = json.dumps(
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
)
# goals: added p50 latency at one connection (ms), requests/s at 16 connections
GOALS = {"off": (0.5, 2500), "default": (1.0, 1500)}
TTFT_GOAL_MS = 2.0  # what the default policy may add to a stream's TTFT p50 over safety off
# the usage ledger may add nothing measurable to request latency: at most this to the p50 at
# one connection (ms; two runs of the same code differ by about this much here). Its cost in
# requests/s at saturation is printed beside it.
LEDGER_GOAL_MS = 0.1
_TEXT = re.compile(rb'"content": ?"[^"]')  # a chunk with text (not the empty role chunk)
REPLY = "I'm sorry for any confusion. The capital of France is Paris, a city of 2.1 million."


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]


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
        for _ in range(600):
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


# -- load: wrk when installed, else aiohttp ------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[{body}]]
{headers}
"""


def _wrk(target: Target, connections: int, seconds: float, script_dir: Path) -> dict[str, float]:
    script = script_dir / f"{target.name}.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items())
    script.write_text(_WRK_SCRIPT.format(body=BODY, headers=headers))
    duration = f"-d{max(1, round(seconds))}s"
    command = ["wrk", "-t1", f"-c{connections}", duration, "--latency", "-s", str(script)]
    out = subprocess.run([*command, target.url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{target.name}: some requests failed:\n{out}")

    def latency(q: str) -> float:
        match = re.search(rf"^\s+{q}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        assert match, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    rate = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    assert rate, out
    return {"p50_ms": latency("50"), "p99_ms": latency("99"), "rps": float(rate.group(1))}


async def _aiohttp(target: Target, connections: int, seconds: float) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=connections)
    latencies: list[float] = []
    failures = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with session.post(target.url, data=BODY, headers=target.headers) as r:
                    await r.read()
                    failures += r.status != 200
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{target.name}: {failures} requests failed")
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "rps": len(latencies) / elapsed,
    }


def measure(target: Target, connections: int, seconds: float, script_dir: Path) -> dict[str, float]:
    if shutil.which("wrk"):
        return _wrk(target, connections, seconds, script_dir)
    return asyncio.run(_aiohttp(target, connections, seconds))


# -- the run -------------------------------------------------------------------------------------


async def _ttfts(url: str, headers: dict[str, str], model: str, n: int) -> list[float]:
    """Seconds to the first text of ``n`` streams, one after the other."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            start = time.perf_counter()
            first = None
            async with session.post(url, data=body, headers=headers) as r:
                async for line in r.content:
                    if first is None and _TEXT.search(line):
                        first = time.perf_counter() - start
            assert first is not None, "no text came back"
            out.append(first)
    return out


def _gateway(
    work: Path,
    name: str,
    mock_port: int,
    prose_port: int,
    redis_url: str | None,
    safety: bool,
    ledger: bool = True,
) -> Any:
    port = _port()
    config = work / f"{name}.yaml"
    fast = {"name": "smollm2", "backend": "vllm", "upstreams": [f"http://127.0.0.1:{mock_port}"]}
    prose = {
        "name": "prose",
        "backend": "openai",
        "served_model": "smollm2",
        "upstreams": [f"http://127.0.0.1:{prose_port}"],
    }
    config.write_text(
        json.dumps(
            {
                "models": [fast, prose],
                "keys": [
                    {
                        "id": "bench",
                        "sha256": hash_key(KEY),
                        "policy": {"rpm": 100_000_000, "tpm": 1_000_000_000},
                    }
                ],
                "safety": {"enabled": safety},
            }  # fmt: skip
        )
    )
    env = {**os.environ, "RAGLINE_LOG_LEVEL": "info",
           "RAGLINE_DATABASE_URL": f"sqlite:///{work}/usage-{name}.db",
           "RAGLINE_USAGE_SPOOL_DIR": str(work / f"spool-{name}"),
           "RAGLINE_USAGE_LEDGER": "true" if ledger else "false"}  # fmt: skip
    if redis_url:
        env["REDIS_URL"] = redis_url
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--config",
         str(config)],
        env=env, stdout=(work / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, port


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ragline-platform-"))
    mock_port, prose_port = _port(), _port()
    redis_url = _redis_url()
    mock = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prose = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(prose_port),
         "--reply", REPLY, "--tokens-per-s", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    off, off_port = _gateway(work, "off", mock_port, prose_port, redis_url, safety=False)
    default, default_port = _gateway(work, "default", mock_port, prose_port, redis_url, safety=True)
    bare, bare_port = _gateway(work, "noledger", mock_port, prose_port, redis_url, True, False)
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    targets = [
        Target("mock", f"http://127.0.0.1:{mock_port}/v1/chat/completions",
               {"Content-Type": "application/json"}),
        Target("off", f"http://127.0.0.1:{off_port}/v1/chat/completions", auth),
        Target("default", f"http://127.0.0.1:{default_port}/v1/chat/completions", auth),
        Target("noledger", f"http://127.0.0.1:{bare_port}/v1/chat/completions", auth),
    ]  # fmt: skip
    try:
        asyncio.run(_wait(f"http://127.0.0.1:{mock_port}/health"))
        for port in (off_port, default_port, bare_port):
            asyncio.run(_wait(f"http://127.0.0.1:{port}/ready"))
        for target in targets:  # warm-up: connections, caches
            measure(target, args.connections, 1.0, work)
        p50: dict[str, list[float]] = {t.name: [] for t in targets}
        p99: dict[str, list[float]] = {t.name: [] for t in targets}
        rps: dict[str, float] = {t.name: 0.0 for t in targets}
        ttft: dict[str, list[float]] = {t.name: [] for t in targets}
        streams = {
            "mock": (
                f"http://127.0.0.1:{prose_port}/v1/chat/completions",
                targets[0].headers,
                "smollm2",
            ),
            "off": (targets[1].url, auth, "prose"),
            "default": (targets[2].url, auth, "prose"),
            "noledger": (targets[3].url, auth, "prose"),
        }
        for i in range(args.rounds):
            order = targets if i % 2 == 0 else targets[::-1]
            for target in order:
                one = measure(target, 1, args.seconds, work)
                p50[target.name].append(one["p50_ms"])
                p99[target.name].append(one["p99_ms"])
            for target in order:
                many = measure(target, args.connections, args.seconds, work)
                rps[target.name] = max(rps[target.name], many["rps"])
            for target in order:
                ttft[target.name] += asyncio.run(_ttfts(*streams[target.name], args.streams))
    finally:
        for process in (off, default, bare, mock, prose):
            process.terminate()
            process.wait(timeout=30)
    median = {name: sorted(values)[len(values) // 2] for name, values in p50.items()}
    first = {name: percentile(values, 50) * 1000 for name, values in ttft.items()}
    result: dict[str, Any] = {
        "load": "wrk" if shutil.which("wrk") else "aiohttp (in process)",
        "redis": bool(redis_url),
        "connections": args.connections,
        "mock": {
            "p50_ms": round(median["mock"], 3),
            "rps": round(rps["mock"]),
            "ttft_p50_ms": round(first["mock"], 2),
        },
    }
    for name in ("off", "default"):
        added = median[name] - median["mock"]
        goal_ms, goal_rps = GOALS[name]
        result[f"safety_{name}"] = {
            "p50_ms": round(median[name], 3),
            "p99_ms": round(sorted(p99[name])[len(p99[name]) // 2], 3),
            "added_p50_ms": round(added, 3),
            "rps": round(rps[name]),
            "ttft_p50_ms": round(first[name], 2),
            "goal_added_p50_ms": goal_ms,
            "goal_rps": goal_rps,
            "pass": added <= goal_ms and rps[name] >= goal_rps,
        }
    ledger_ms = median["default"] - median["noledger"]
    ledger_share = rps["default"] / rps["noledger"] if rps["noledger"] else 0.0
    result["ledger"] = {
        "off_p50_ms": round(median["noledger"], 3),
        "off_rps": round(rps["noledger"]),
        "added_p50_ms": round(ledger_ms, 3),
        "rps_ratio": round(ledger_share, 3),
        "goal_added_p50_ms": LEDGER_GOAL_MS,
        "pass": ledger_ms <= LEDGER_GOAL_MS,
    }
    added_ttft = first["default"] - first["off"]
    result["default_policy_ttft_ms"] = {
        "added_over_off": round(added_ttft, 2),
        "goal": TTFT_GOAL_MS,
        "pass": added_ttft <= TTFT_GOAL_MS,
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"load: {result['load']}; Redis limits: {'on' if result['redis'] else 'off'}; "
        f"latency at 1 connection, requests/s at {result['connections']}"
    )
    print("| | p50, 1 connection | added p50 (goal) | p99 | requests/s (goal) | goals |")
    print("|---|---|---|---|---|---|")
    mock = result["mock"]
    print(f"| mock upstream alone | {mock['p50_ms']:.3f} ms | | | {mock['rps']:,} | |")
    for name in ("off", "default"):
        r = result[f"safety_{name}"]
        label = "ragline, safety off" if name == "off" else "ragline, default policy"
        print(
            f"| {label} | {r['p50_ms']:.3f} ms | +{r['added_p50_ms']:.3f} ms "
            f"(≤ {r['goal_added_p50_ms']}) | {r['p99_ms']:.3f} ms | {r['rps']:,} "
            f"(≥ {r['goal_rps']:,}) | {'PASS' if r['pass'] else 'FAIL'} |"
        )
    led = result["ledger"]
    print(
        f"| ragline, default policy, usage ledger off | {led['off_p50_ms']:.3f} ms | | | "
        f"{led['off_rps']:,} | |"
    )
    print(
        f"\nusage ledger (default policy, on vs off): {led['added_p50_ms']:+.3f} ms p50 "
        f"(goal ≤ {led['goal_added_p50_ms']}): {'PASS' if led['pass'] else 'FAIL'}; "
        f"requests/s at {result['connections']} connections: {led['rps_ratio']:.3f} of the "
        "ledger-off figure"
    )
    t = result["default_policy_ttft_ms"]
    print(
        f"\nstream TTFT p50, one stream of prose at 50 tokens/s: mock {mock['ttft_p50_ms']:.2f} "
        f"ms, safety off {result['safety_off']['ttft_p50_ms']:.2f} ms, default policy "
        f"{result['safety_default']['ttft_p50_ms']:.2f} ms; the default policy adds "
        f"{t['added_over_off']:+.2f} ms over safety off (goal ≤ {t['goal']} ms): "
        f"{'PASS' if t['pass'] else 'FAIL'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--streams", type=int, default=40, help="streams per round (TTFT)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    passed = [result[f"safety_{n}"]["pass"] for n in ("off", "default")]
    passed += [result["default_policy_ttft_ms"]["pass"], result["ledger"]["pass"]]
    sys.exit(0 if all(passed) else 1)


if __name__ == "__main__":
    main()
