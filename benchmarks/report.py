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
    """Pass/fail of the run's medians against the goals (TTFT and tokens/s per stream). A
    metric the run could not measure (no completed request, no streamed tokens) fails: a
    missing number never passes."""
    checks: dict[str, Any] = {}
    measured = summary["completed"] > 0
    if slo.ttft_ms is not None:
        value = summary["median_ttft_ms"] if measured else None
        checks["median_ttft_ms"] = _check(value, f"<= {slo.ttft_ms:g}", value is not None
                                          and value <= slo.ttft_ms)  # fmt: skip
    if slo.tpot_ms is not None:
        tps = summary.get("median_output_tokens_per_s_per_stream") if measured else None
        goal = 1000 / slo.tpot_ms
        checks["tokens_per_s_per_stream"] = _check(tps, f">= {goal:g}", tps is not None
                                                   and tps >= goal)  # fmt: skip
    checks["no_errors"] = _check(summary["failed"], "== 0", summary["failed"] == 0)
    failed = [f"{name} {_shown(c['value'])} (goal {c['goal']})" for name, c in checks.items()
              if not c["pass"]]  # fmt: skip
    return {"pass": not failed, "checks": checks, "reasons": failed}


def _check(value: float | None, goal: str, ok: bool) -> dict[str, Any]:
    return {"value": value, "goal": goal, "pass": ok, "missing": value is None}


def _shown(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


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


# (record attribute or function, title, SLO attribute): the distributions the report plots
_DISTRIBUTIONS: list[tuple[str, str, str | None]] = [
    ("ttft", "TTFT (ms)", "ttft_ms"),
    ("tpot", "TPOT (ms)", "tpot_ms"),
    ("itl", "ITL (ms)", None),
]


def _values(recs: list[RequestRecord], name: str) -> list[float]:
    done = [r for r in recs if r.ok]
    if name == "itl":
        return sorted(gap * 1000 for r in done for gap in r.itl)
    if name == "tpot":
        return sorted(t * 1000 for r in done if (t := r.tpot) is not None)
    return sorted(getattr(r, name) * 1000 for r in done)


def _plots(
    runs: list[dict[str, Any]], records: dict[str, list[RequestRecord]], slo: dict[str, Any]
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator

    images = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, title, goal) in zip(axes, _DISTRIBUTIONS, strict=True):
        for point, recs in records.items():
            values = _values(recs, name)
            if values:  # an empirical CDF as steps, with a marker per request when few
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                marker = "o" if len(values) <= 64 else None
                ax.step(values, fractions, where="post", marker=marker, markersize=3, label=point)
        if goal is not None and slo.get(goal) is not None:
            ax.axvline(slo[goal], color="crimson", linestyle="--", label=f"goal {slo[goal]:g}")
        ax.set_title(f"{title}: distribution")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    images.append(("Distributions (empirical CDFs; dashed: the goal)", _png(fig)))
    plt.close(fig)

    if len(runs) > 1:
        xs = [r["x"] for r in runs]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(xs, [r["median_ttft_ms"] for r in runs], "o-", label="p50")
        axes[0].plot(xs, [r["p99_ttft_ms"] for r in runs], "o--", label="p99")
        if slo.get("ttft_ms") is not None:
            axes[0].axhline(slo["ttft_ms"], color="crimson", linestyle="--", label="goal")
        axes[0].set_title("TTFT (ms)")
        per_stream = [r.get("median_output_tokens_per_s_per_stream") or 0 for r in runs]
        axes[1].plot(xs, per_stream, "o-", label="per stream (1/p50 TPOT)")
        if slo.get("tpot_ms"):
            axes[1].axhline(1000 / slo["tpot_ms"], color="crimson", linestyle="--", label="goal")
        axes[1].set_title("output tokens/s per stream")
        axes[2].plot(xs, [r["output_throughput"] for r in runs], "o-", label="all streams")
        axes[2].set_title("output tokens/s, aggregate")
        for ax in axes:
            ax.set_xlabel(runs[0].get("x_name", "concurrency"))
            ax.xaxis.set_major_locator(FixedLocator(xs))  # the points measured, not 1.2, 1.4
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        images.append(("Across the sweep (dashed: the goal)", _png(fig)))
        plt.close(fig)
    return images


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.pass{color:#070;font-weight:bold}
.fail{color:#b00;font-weight:bold}.kv td{text-align:left}img{max-width:100%;margin:.5em 0}
h2{margin-top:1.4em;border-bottom:1px solid #eee}small{color:#666}"""


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return html.escape(str(value))


def point_name(run: dict[str, Any]) -> str:
    return f"{run.get('x_name', 'concurrency')} {run['x']:g}"


def write_html(
    path: Path,
    title: str,
    runs: list[dict[str, Any]],
    records: dict[str, list[RequestRecord]],
    settings: dict[str, Any],
) -> None:
    """A report a person reads: the verdict with its reasons, the workload, a results table,
    percentile tables, distributions and sweep plots with the goals drawn in, the errors."""
    slo = runs[0]["slo"] if runs else {}
    passed = bool(runs) and all(r["verdict"]["pass"] for r in runs)
    verdicts = []
    for run in runs:
        ok = run["verdict"]["pass"]
        reasons = "; ".join(run["verdict"].get("reasons", []))
        label = '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'
        verdicts.append([point_name(run), label, html.escape(reasons or "every goal met")])
    workload = [[html.escape(str(k)), html.escape(str(v))] for k, v in settings.items()]
    goal_ttft, goal_tpot = slo.get("ttft_ms"), slo.get("tpot_ms")
    goals = [
        f"TTFT p50 ≤ {goal_ttft:g} ms" if goal_ttft is not None else "",
        f"≥ {1000 / goal_tpot:g} tokens/s per stream (TPOT p50 ≤ {goal_tpot:g} ms)"
        if goal_tpot
        else "",
        "no failed request",
    ]
    workload.append(["thresholds", html.escape(", ".join(g for g in goals if g))])
    results = [
        [
            point_name(r),
            f"{r['completed']}/{r['completed'] + r['failed']}",
            _num(r["request_throughput"], 2),
            _num(r["output_throughput"]),
            _num(r.get("median_output_tokens_per_s_per_stream")),
            _num(r["request_goodput"], 2),
            _num(r["slo_attainment"] * 100, 0) + " %",
        ]
        for r in runs
    ]
    percentiles = ""
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        rows = [
            [point_name(r), *(_num(r.get(f"{s}_{name}_ms")) for s in ("mean", "median", "p90",
                                                                       "p99", "std"))]
            for r in runs
        ]  # fmt: skip
        percentiles += f"<h3>{label} (ms)</h3>" + _table(
            ["point", "mean", "p50", "p90", "p99", "std"], rows
        )
    errors = [
        [point_name(r), html.escape(message), str(count)]
        for r in runs
        for message, count in r.get("errors", {}).items()
    ]
    images = "".join(
        f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
        f'src="data:image/png;base64,{img}">'
        for caption, img in _plots(runs, records, slo)
    )
    defs = "".join(f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in DEFINITIONS.items())
    env = [[html.escape(str(k)), html.escape(str(v))] for k, v in environment().items()]
    headline = '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Verdict: {headline} <small>(each point is judged against the goals below)</small></p>
{_table(["point", "verdict", "why"], verdicts)}
<h2>Workload</h2>{_table(["setting", "value"], workload, "kv")}
<h2>Results</h2>
{
        _table(
            [
                "point",
                "completed",
                "req/s",
                "output tok/s",
                "tok/s per stream",
                "goodput req/s",
                "met every goal",
            ],
            results,
        )
    }
<h2>Latency percentiles</h2>{percentiles}
<h2>Plots</h2>{images}
<h2>Errors</h2>{_table(["point", "error", "requests"], errors) if errors else "<p>None.</p>"}
<h2>Definitions</h2><ul>{defs}</ul>
<h2>Environment</h2>{_table(["", ""], env, "kv")}
</body></html>""")
