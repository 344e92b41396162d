"""``/ui``: the admin console, a page and its assets served from the package (no CDN), and the
two admin reads only it needs: usage over time and recent safety findings. The page and its
assets need no key (a browser sends none); every call the page makes sends the admin key the
user signed in with, so the console can do exactly what that key may do through the API."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gateway.errors import NotFound
from gateway.ledger_db import series_rows

UI = Path(__file__).resolve().parent.parent / "ui"
ASSETS = "/ui/assets"
router = APIRouter()


@router.get("/ui", include_in_schema=False)
async def console() -> FileResponse:
    return FileResponse(UI / "index.html", headers={"Cache-Control": "no-store"})


@router.get("/admin/usage/series")
async def usage_series(
    request: Request,
    bucket: Annotated[int, Query(ge=10, le=86400, description="Seconds per point.")] = 60,
    window: Annotated[int, Query(ge=60, le=31 * 86400, description="Seconds back.")] = 3600,
) -> dict[str, Any]:
    """Per time bucket: requests, tokens, errors, cache hits, latency and TTFT p50/p99 (the
    last ``window`` seconds, at most 200,000 requests)."""
    ledger = request.app.state.ledger
    if ledger is None:
        raise NotFound("The usage ledger is off on this gateway (RAGLINE_USAGE_LEDGER=false).")
    await request.app.state.bookkeeping.flush()
    await ledger.flush()
    rows = await asyncio.to_thread(series_rows, ledger.engine, window)
    return {"bucket": bucket, "points": await asyncio.to_thread(_buckets, rows, bucket)}


def _buckets(
    rows: list[tuple[float, float, float | None, int, int, bool]], size: int
) -> list[dict[str, Any]]:
    groups: dict[int, list[tuple[float, float, float | None, int, int, bool]]] = {}
    for row in rows:
        groups.setdefault(int(row[0] // size) * size, []).append(row)
    out = []
    for start in sorted(groups):
        group = groups[start]
        latency = sorted(r[1] for r in group)
        ttft = sorted(r[2] for r in group if r[2] is not None)
        out.append({
            "t": start, "requests": len(group), "tokens": sum(r[3] for r in group),
            "errors": sum(1 for r in group if r[4] >= 400), "cached": sum(1 for r in group if r[5]),
            "latency_p50_ms": _q(latency, 0.5), "latency_p99_ms": _q(latency, 0.99),
            "ttft_p50_ms": _q(ttft, 0.5), "ttft_p99_ms": _q(ttft, 0.99),
        })  # fmt: skip
    return out


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 2)


@router.get("/admin/prompts/variants")
async def prompt_variants(request: Request) -> dict[str, Any]:
    """Per experiment variant and template version (this process, since it started): requests,
    mean prompt and completion tokens, feedback count and mean score."""
    m = request.app.state.metrics
    await request.app.state.bookkeeping.flush()
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(metric: Any, field: str) -> None:
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = sample.labels
                key = (labels["experiment"], labels["variant"], labels["template"])
                row = rows.setdefault(key, {"experiment": key[0], "variant": key[1],
                                            "template": key[2]})  # fmt: skip
                suffix = sample.name.rsplit("_", 1)[-1]
                name = field if suffix == "total" else f"{field}_{suffix}"
                row[name] = row.get(name, 0) + sample.value

    add(m.variant_requests, "requests")
    add(m.variant_prompt_tokens, "prompt_tokens")
    add(m.variant_completion_tokens, "completion_tokens")
    add(m.variant_feedback, "feedback")
    out = []
    for row in rows.values():
        requests = row.get("requests", 0) or 0
        feedback = row.get("feedback_count", 0) or 0
        out.append({
            "experiment": row["experiment"] or None, "variant": row["variant"] or None,
            "template": row["template"], "requests": int(requests),
            "mean_prompt_tokens": _mean(row.get("prompt_tokens", 0), requests),
            "mean_completion_tokens": _mean(row.get("completion_tokens", 0), requests),
            "feedback": int(feedback),
            "mean_feedback": round(row.get("feedback_sum", 0) / feedback, 3) if feedback else None,
        })  # fmt: skip
    return {
        "object": "list",
        "data": sorted(out, key=lambda r: (r["template"], r["variant"] or "")),
    }


def _mean(total: float, count: float) -> float | None:
    return round(total / count, 1) if count else None


@router.get("/admin/safety/findings")
async def safety_findings(request: Request) -> dict[str, Any]:
    """The latest findings of this process (scanner, type, action, when; never the text), and
    counts by scanner and type."""
    recent = list(request.app.state.pipeline.safety.recent)
    counts: dict[tuple[str, str, str], int] = {}
    for _, scanner, kind, action in recent:
        counts[scanner, kind, action] = counts.get((scanner, kind, action), 0) + 1
    return {
        "recent": [
            {"ts": ts, "scanner": s, "type": k, "action": a}
            for ts, s, k, a in reversed(recent[-100:])
        ],  # fmt: skip
        "counts": [
            {"scanner": s, "type": k, "action": a, "findings": n}
            for (s, k, a), n in sorted(counts.items())
        ],  # fmt: skip
    }


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=UI), name="console-assets")


def is_public(path: str) -> bool:
    return path == "/ui" or path.startswith(ASSETS + "/")
