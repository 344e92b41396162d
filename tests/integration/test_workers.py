"""``ragline serve --workers 2``: two processes on one port, sharing limits through Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.auth import hash_key
from tests.conftest import REPO, start_gateway, stop_gateway, wait_until

KEY = "sk-workers-1234"
REDIS = "redis://127.0.0.1:6379/0"


def test_two_workers_keep_rpm_exact(model_path: Path, tmp_path: Path) -> None:
    key_id = f"workers-{time.time_ns()}"  # a fresh Redis bucket
    gw = start_gateway(
        tmp_path,
        models=[{"name": "smollm2"}],
        keys=[{"id": key_id, "sha256": hash_key(KEY), "policy": {"rpm": 20}}],
        env={"REDIS_URL": REDIS},
        args=["--workers", "2"],
        timeout=240,
    )
    try:
        # /ready answered from one process; the other may still be loading its model
        loaded = '"msg":"model smollm2 loaded'
        assert wait_until(lambda: gw.logs().count(loaded) == 2, timeout=180)

        async def one(i: int) -> int:
            # a new connection each time, so that both processes take requests
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(
                    gw.base_url + "/chat/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "smollm2", "max_tokens": 1,
                          "messages": [{"role": "user", "content": f"Say {i}."}]},
                )  # fmt: skip
                return r.status_code

        async def hammer() -> list[int]:
            return await asyncio.gather(*(one(i) for i in range(40)))

        started = time.monotonic()
        statuses = asyncio.run(hammer())
        refill = int((time.monotonic() - started) * 20 / 60) + 1
        assert statuses.count(200) + statuses.count(429) == 40
        assert 20 <= statuses.count(200) <= 20 + refill, statuses
    finally:
        stop_gateway(gw)
    served_by = {
        json.loads(line)["pid"]
        for line in gw.logs().splitlines()
        if line.startswith("{") and '"ragline.access"' in line and '"status":200' in line
    }
    assert len(served_by) == 2  # both processes answered


def test_workers_without_redis_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--port", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=120,
    )
    assert done.returncode == 2 and "needs Redis" in done.stderr
