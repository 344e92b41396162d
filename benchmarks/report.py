"""Benchmark output: a JSON file keyed like ``vllm bench serve``, an HTML report with plots, and a
pass/fail summary against the goals."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.metrics import SLO, RequestRecord

DEFINITIONS = {
    "ttft": "time to first token: request sent → first chunk with content",
    "tpot": "time per output token: (E2E − TTFT) / (output tokens − 1), tokens from usage",
    "itl": "inter-token latency: gaps between successive content chunks",
    "e2el": "end-to-end latency: request sent → last byte",
    "goodput": "completed requests per second that met every SLO",
}


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def verdict(summary: dict[str, Any], slo: SLO) -> dict[str, Any]:
    """Pass/fail of the run's medians against the goals (TTFT and tokens/s per stream)."""
    checks: dict[str, Any] = {}
    if slo.ttft_ms is not None:
        checks["median_ttft_ms"] = {
            "value": summary["median_ttft_ms"],
            "goal": f"<= {slo.ttft_ms}",
            "pass": summary["median_ttft_ms"] <= slo.ttft_ms,
        }
    if slo.tpot_ms is not None and summary["median_tpot_ms"]:
        tps = 1000 / summary["median_tpot_ms"]
        goal = 1000 / slo.tpot_ms
        checks["tokens_per_s_per_stream"] = {
            "value": tps,
            "goal": f">= {goal:.0f}",
            "pass": tps >= goal,
        }
    checks["no_errors"] = {
        "value": summary["failed"],
        "goal": "== 0",
        "pass": summary["failed"] == 0,
    }
    return {"pass": all(c["pass"] for c in checks.values()), "checks": checks}


def write_json(path: Path, runs: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "settings": settings,
                "environment": environment(),
                "definitions": DEFINITIONS,
                "runs": runs,
            },
            indent=2,
        )
    )


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(runs: list[dict[str, Any]], records: dict[str, list[RequestRecord]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, recs in records.items():
        for ax, key in zip(axes, ("ttft", "e2e"), strict=True):
            values = sorted(getattr(r, key) * 1000 for r in recs if r.ok)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    for ax, title in zip(axes, ("TTFT CDF", "E2E latency CDF"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    images.append(_png(fig))
    plt.close(fig)

    xs = [r["x"] for r in runs]
    if len(runs) > 1:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        axes[0].plot(xs, [r["median_ttft_ms"] for r in runs], "o-", label="median")
        axes[0].plot(xs, [r["p99_ttft_ms"] for r in runs], "o--", label="p99")
        axes[0].set_title("TTFT (ms)")
        axes[1].plot(xs, [r["output_throughput"] for r in runs], "o-", label="aggregate")
        axes[1].plot(
            xs, [r["mean_output_tokens_per_s_per_stream"] for r in runs], "o--", label="per stream"
        )
        axes[1].set_title("output tokens/s")
        axes[2].plot(xs, [r["request_goodput"] for r in runs], "o-", label="goodput")
        axes[2].plot(xs, [r["request_throughput"] for r in runs], "o--", label="throughput")
        axes[2].set_title("requests/s")
        for ax in axes:
            ax.set_xlabel(runs[0].get("x_name", "concurrency"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        images.append(_png(fig))
        plt.close(fig)
    return images


def write_html(
    path: Path,
    title: str,
    runs: list[dict[str, Any]],
    records: dict[str, list[RequestRecord]],
    settings: dict[str, Any],
) -> None:
    cols = [
        "x",
        "completed",
        "failed",
        "request_throughput",
        "output_throughput",
        "median_ttft_ms",
        "p99_ttft_ms",
        "median_tpot_ms",
        "p99_tpot_ms",
        "median_itl_ms",
        "p99_e2el_ms",
        "request_goodput",
        "slo_attainment",
    ]
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{_fmt(run.get(c))}</td>" for c in cols)
        + f"<td>{'PASS' if run['verdict']['pass'] else 'FAIL'}</td></tr>"
        for run in runs
    )
    images = "".join(f'<img src="data:image/png;base64,{img}">' for img in _plots(runs, records))
    defs = "".join(f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in DEFINITIONS.items())
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
img{{max-width:100%;margin:1em 0}}</style></head><body><h1>{html.escape(title)}</h1>
<p><code>{html.escape(json.dumps(settings))}</code></p>
<table><tr>{"".join(f"<th>{c}</th>" for c in cols)}<th>goals</th></tr>{rows}</table>
{images}<h2>Definitions</h2><ul>{defs}</ul>
<p><code>{html.escape(json.dumps(environment()))}</code></p></body></html>""")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return html.escape(str(value))
