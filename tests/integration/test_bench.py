"""Short real benchmark runs produce valid JSON and HTML reports (embedded engine and vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, start_gateway, stop_gateway


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def check_reports(out) -> dict:  # type: ignore[no-untyped-def, type-arg]
    data = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in html and "TTFT" in html
    for run in data["runs"]:
        for key in (
            "request_throughput",
            "output_throughput",
            "mean_ttft_ms",
            "p99_tpot_ms",
            "median_itl_ms",
            "p99_e2el_ms",
            "request_goodput",
        ):
            assert key in run
        assert run["failed"] == 0 and run["completed"] == 4
        assert run["total_output_tokens"] == 4 * 8  # ignore_eos: fixed-length output
        assert run["mean_ttft_ms"] > 0 and run["mean_tpot_ms"] > 0
    assert {"settings", "environment", "definitions"} <= set(data)
    return data  # type: ignore[no-any-return]


def test_bench_against_the_embedded_engine(gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "embedded"
    result = bench(
        "run",
        "--url",
        gateway.base_url,
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--output-len",
        "8",
        "--input-len",
        "16",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr + result.stdout
    data = check_reports(out)
    assert [r["x"] for r in data["runs"]] == [1, 2]


def test_bench_against_vllm_through_the_gateway_and_gate(vllm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(
        tmp_path, models=[{"name": "smollm2", "backend": "vllm", "upstreams": [vllm.url]}]
    )
    try:
        out = tmp_path / "vllm"
        result = bench(
            "run",
            "--url",
            gw.base_url,
            "--concurrency",
            "2",
            "--requests",
            "4",
            "--output-len",
            "8",
            "--input-len",
            "16",
            "--out",
            str(out),
            "--slo-ttft-ms",
            "0.001",
            "--gate",
        )
        assert result.returncode == 1, "an impossible SLO must fail the gate"
        check_reports(out)
    finally:
        stop_gateway(gw)
