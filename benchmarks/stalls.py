"""Does any hostile input stall the server? ``/health`` latency while each one is processed.

    python -m benchmarks.stalls [--probes 200] [--json]

Starts the mock upstream and one gateway in front of it with the default safety policy, prompt
templates and a tokenizer (so budget fitting runs), then, for each input of the hardening
issue, sends it from a second thread while this one asks ``/health`` over and over, until the
input's answer is back. It prints, per input, the status the input got, how long it took, and
``/health``'s p50 and worst latency meanwhile, as a ratio to ``/health``'s p50 with nothing else
running, measured in the same run (these machines are shared and noisy). A stall shows as a
worst ``/health`` of the order of the input's own time.

The inputs: a seed beyond int64, 100 kB messages of ``a.`` and ``eyJ-`` (the backtracking
patterns before), a 200,000-character message, a 100 kB HTML upload of void tags, and a
2,000-message history fitted into a template's budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.metrics import percentile

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Hostile:
    name: str
    send: Callable[[httpx.Client], httpx.Response]


def _chat(content: str | None = None, **extra: Any) -> Callable[[httpx.Client], httpx.Response]:
    messages = [{"role": "user", "content": content or "hi"}]
    body = {"model": "smollm2", "messages": messages, "max_tokens": 8, **extra}
    return lambda client: client.post("/v1/chat/completions", json=body)


def _upload(name: str, data: bytes) -> Callable[[httpx.Client], httpx.Response]:
    return lambda client: client.post("/v1/files", files={"file": (name, data)})


def _history(turns: int) -> Callable[[httpx.Client], httpx.Response]:
    roles = ("user", "assistant")
    messages = [
        {"role": roles[i % 2], "content": f"Turn {i}: which capital is this, again? " * 2}
        for i in range(turns - 1)
    ] + [{"role": "user", "content": "And Peru?"}]
    options = {"template": "capital-qa", "variables": {"country": "Peru"}}
    body = {"model": "smollm2", "messages": messages, "max_tokens": 8, "ragline": options}
    return lambda client: client.post("/v1/chat/completions", json=body)


HOSTILE = [
    Hostile("seed 2**64", _chat(seed=2**64)),
    Hostile("100 kB of 'a.'", _chat("a." * 50_000)),
    Hostile("100 kB of 'eyJ-'", _chat("eyJ-" * 25_000)),
    Hostile("200,000-character message", _chat("word " * 40_000)),
    Hostile("100 kB HTML of void tags", _upload("void.html", b"<br>" * 25_000)),
    Hostile("2,000-message history, templated", _history(2_000)),
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_dir() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "models", "path"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _start(work: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    mock_port, port = _free_port(), _free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mock_upstream", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    config = {
        "models": [
            {"name": "smollm2", "backend": "openai", "upstreams": [f"http://127.0.0.1:{mock_port}"],
             "served_model": "smollm2", "tokenizer": _model_dir(),
             "health": {"path": "/health", "interval": 60}},
        ],
        "prompts": {"dir": str(REPO / "prompts" / "templates")},
    }  # fmt: skip
    path = work / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "RAGLINE_RAG_DIR": str(work / "rag")}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--config", str(path)],
        stdout=(work / "gateway.log").open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError((work / "gateway.log").read_text())
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return [gateway, mock], url
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling readiness
    raise RuntimeError("gateway did not become ready")


def _probe(client: httpx.Client) -> float:
    start = time.perf_counter()
    reply = client.get("/health")
    elapsed = time.perf_counter() - start
    if reply.status_code != 200:
        raise RuntimeError(f"/health answered {reply.status_code}")
    return elapsed * 1000


def measure(url: str, inputs: list[Hostile], idle_probes: int) -> dict[str, Any]:
    """Idle ``/health`` latency, then each input with ``/health`` probed until it is answered."""
    with (
        httpx.Client(base_url=url, timeout=300) as health,
        httpx.Client(base_url=url, timeout=300) as sender,
    ):
        for _ in range(20):  # warm: connections, first-use paths
            _probe(health)
        idle = [_probe(health) for _ in range(idle_probes)]
        rows = []
        for hostile in inputs:
            answer: dict[str, Any] = {}

            def send(h: Hostile = hostile, out: dict[str, Any] = answer) -> None:
                start = time.perf_counter()
                reply = h.send(sender)
                out["ms"] = (time.perf_counter() - start) * 1000
                out["status"] = reply.status_code
                out["code"] = reply.json().get("error", {}).get("code") if reply.is_error else None

            thread = threading.Thread(target=send)
            thread.start()
            during = []
            while thread.is_alive():
                during.append(_probe(health))
            thread.join()
            rows.append(
                {
                    "input": hostile.name,
                    "status": answer["status"],
                    "code": answer["code"],
                    "answer_ms": round(answer["ms"], 1),
                    "health_probes": len(during),
                    "health_p50_ms": round(percentile(during, 50), 2) if during else None,
                    "health_max_ms": round(max(during), 2) if during else None,
                }
            )
    idle_p50 = percentile(idle, 50)
    for row in rows:
        if row["health_max_ms"] is not None:
            row["max_over_idle"] = round(row["health_max_ms"] / idle_p50, 1)
    return {"idle_health_p50_ms": round(idle_p50, 2), "inputs": rows}


def run(probes: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ragline-stalls-"))
    processes, url = _start(work)
    try:
        return measure(url, HOSTILE, probes)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200, help="idle /health probes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.probes)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"/health p50 with nothing else running: {result['idle_health_p50_ms']} ms\n")
    print(f"{'input':36} {'answer':>16} {'took ms':>9} {'probes':>7} {'p50 ms':>7} "
          f"{'max ms':>7} {'max/idle':>8}")  # fmt: skip
    for row in result["inputs"]:
        answer = f"{row['status']} {row['code'] or ''}".strip()
        print(
            f"{row['input']:36} {answer[:16]:>16} {row['answer_ms']:>9} {row['health_probes']:>7} "
            f"{row['health_p50_ms'] or '-':>7} {row['health_max_ms'] or '-':>7} "
            f"{row.get('max_over_idle', '-'):>8}"
        )


if __name__ == "__main__":
    main()
