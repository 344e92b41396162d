"""Gateway overhead: the same load sent directly to an upstream and through the gateway,
interleaved round by round in one run so both see the same machine noise."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.loadgen import LoadSpec, Prompt, run
from benchmarks.metrics import SLO, RequestRecord, summarize

DELTA_KEYS = (
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
    "median_itl_ms",
    "p99_itl_ms",
)


async def compare(
    direct: LoadSpec,
    gateway: LoadSpec,
    prompts: list[Prompt],
    rounds: int,
    slo: SLO,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Alternate direct/gateway rounds of ``num_requests`` each; returns both summaries and
    the deltas (gateway − direct; tokens/s as a ratio)."""
    records: dict[str, list[RequestRecord]] = {"direct": [], "gateway": []}
    durations = {"direct": 0.0, "gateway": 0.0}
    for i in range(rounds):
        # alternate which goes first, so neither always runs on a warmer machine
        order = [("direct", direct), ("gateway", gateway)]
        for label, spec in order if i % 2 == 0 else order[::-1]:
            recs, duration = await run(
                spec, prompts, label=f"{label} r{i + 1}", show_progress=show_progress
            )
            for r in recs:
                r.label = label
            records[label] += recs
            durations[label] += duration
    summaries = {k: summarize(v, durations[k], slo) for k, v in records.items()}
    d, g = summaries["direct"], summaries["gateway"]
    deltas = {f"delta_{k}": g[k] - d[k] for k in DELTA_KEYS}
    deltas["output_throughput_ratio"] = (
        g["output_throughput"] / d["output_throughput"] if d["output_throughput"] else 0.0
    )
    deltas["tokens_per_s_per_stream_ratio"] = (
        g["mean_output_tokens_per_s_per_stream"] / d["mean_output_tokens_per_s_per_stream"]
        if d["mean_output_tokens_per_s_per_stream"]
        else 0.0
    )
    return {"direct": d, "gateway": g, "deltas": deltas, "records": records}


async def max_request_rate(
    direct: LoadSpec,
    gateway: LoadSpec,
    requests: int,
    connections: int,
    rounds: int,
    show_progress: bool = True,
) -> dict[str, float]:
    """Best non-streaming requests/s of each at ``connections`` in flight (short answers)."""
    prompts = [Prompt("Say hi.", 1)]
    best = {"direct": 0.0, "gateway": 0.0}
    for _ in range(rounds):
        for label, spec in (("direct", direct), ("gateway", gateway)):
            s = replace(
                spec,
                stream=False,
                concurrency=connections,
                num_requests=requests,
                warmup=connections,
                rate=None,
            )
            recs, duration = await run(
                s, prompts, label=f"{label} max rate", show_progress=show_progress
            )
            done = sum(1 for r in recs if r.ok)
            best[label] = max(best[label], done / duration)
    return best
