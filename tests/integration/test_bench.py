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
    assert 'src="data:image/png;base64,' in html and "TTFT" in html
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
    # the embedded engine reports CPU on /ready: the CPU goals judge the run, and say so
    assert "goals: cpu (the server reports its model on CPU)" in result.stdout
    assert data["runs"][0]["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 100.0, "e2el_ms": None}
    # the table's per-stream rate is the one the verdict judges
    for run in data["runs"]:
        check = run["verdict"]["checks"]["tokens_per_s_per_stream"]
        assert check["value"] == run["median_output_tokens_per_s_per_stream"]
    screenshot_report(out / "report.html", "bench-report-embedded.png")


def screenshot_report(report, name: str):  # type: ignore[no-untyped-def]
    """Issue 23, item 11: the report as a person sees it, in Chromium; the screenshot is kept
    under test-artifacts/. The layout fits 1,300 px: the results table is no wider than that."""
    import shutil

    from PIL import Image

    html = report.read_text()
    for section in ("Workload", "Results", "Latency percentiles", "Distributions", "Errors",
                    "Environment", "TTFT p50 ≤ 1000 ms", "≥ 10 tokens/s per stream"):  # fmt: skip
        assert section in html, section
    assert "<th>x</th>" not in html and '{"url"' not in html  # no raw JSON, no bare `x`
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (apt-get install chromium; .ci/run installs it)"
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / name
    shot.unlink(missing_ok=True)
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1300,2600", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), done.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 2600)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the page rendered blank"
    # nothing drawn in the right margin: the page's max-width layout holds on 1,300 px
    margin = image.crop((1260, 0, 1300, 2600)).getcolors(maxcolors=1 << 16) or []
    assert len(margin) <= 2, "the report overflows 1,300 px"


def test_bench_stops_at_the_first_failure_with_its_cause_and_exits_1(gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 23, item 2: no server, or a model the server does not have, used to print a
    table of failures and exit 0."""
    args = ["run", "--requests", "2", "--output-len", "4", "--input-len", "8", "--out"]
    refused = bench(*args, str(tmp_path / "a"), "--url", "http://127.0.0.1:1/v1")
    assert refused.returncode == 1
    assert "ClientConnectorError" in refused.stdout and "127.0.0.1:1" in refused.stdout
    assert not (tmp_path / "a" / "results.json").exists()
    unknown = bench(*args, str(tmp_path / "b"), "--url", gateway.base_url, "--model", "nope")
    assert unknown.returncode == 1
    out = " ".join(unknown.stdout.split())
    assert "HTTP 404" in out and "model_not_found" in out and "--keep-going" in out
    # --keep-going: every request runs, the report records why each failed, still exit 1
    kept = bench(*args, str(tmp_path / "c"), "--url", gateway.base_url, "--model", "nope",
                 "--keep-going")  # fmt: skip
    assert kept.returncode == 1 and "2 request(s) failed" in " ".join(kept.stdout.split())
    run = json.loads((tmp_path / "c" / "results.json").read_text())["runs"][0]
    assert run["completed"] == 0 and not run["verdict"]["pass"]
    assert run["verdict"]["checks"]["median_ttft_ms"]["missing"]  # never passed as 0.0
    assert any("model_not_found" in e for e in run["errors"])


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
