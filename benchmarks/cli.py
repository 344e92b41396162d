"""``ragline bench``: load tests with vLLM's metric definitions, reports, gates and suites."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from benchmarks import overhead as overhead_mod
from benchmarks.loadgen import LoadSpec
from benchmarks.metrics import GOALS, SLO
from benchmarks.sweep import (
    SHARED_SCIFACT,
    _default_model_dir,
    _floats,
    _ints,
    choose_goals,
    console,
    execute,
    load_prompts,
)

app = typer.Typer(
    help="Benchmark any OpenAI-compatible server (TTFT, TPOT, ITL, goodput).", no_args_is_help=True
)
Url = Annotated[str, typer.Option(help="Base URL of the OpenAI API, e.g. http://127.0.0.1:8000/v1")]
Model = Annotated[str, typer.Option(help="Model (or route) name to request.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar=["RAGLINE_BENCH_API_KEY", "RAGLINE_API_KEY", "OPENAI_API_KEY"],
        help="Bearer key (env RAGLINE_BENCH_API_KEY, RAGLINE_API_KEY or OPENAI_API_KEY).",
    ),
]
Out = Annotated[Path, typer.Option(help="Directory for the JSON and HTML reports.")]


@app.command("run")
def run_cmd(
    url: Url = "http://127.0.0.1:8000/v1",
    model: Model = "smollm2",
    api_key: ApiKey = None,
    endpoint: Annotated[str, typer.Option(help="chat or completions")] = "chat",
    stream: Annotated[bool, typer.Option(help="Stream responses (needed for TTFT/ITL).")] = True,
    concurrency: Annotated[str, typer.Option(help="Closed loop; a list sweeps: 1,4,8")] = "1",
    rate: Annotated[str | None, typer.Option(help="Open loop req/s instead; a list sweeps")] = None,
    burstiness: Annotated[float, typer.Option(help="Gamma shape for open loop; 1 = Poisson")] = 1.0,
    requests: Annotated[int, typer.Option(help="Measured requests per point.")] = 32,
    warmup: Annotated[int, typer.Option(help="Unrecorded requests before each point.")] = 2,
    max_seconds: Annotated[float, typer.Option(help="Time limit per point.")] = 600.0,
    dataset: Annotated[str, typer.Option(help="random, jsonl:PATH or scifact[:DIR]")] = "random",
    input_len: Annotated[int, typer.Option(help="Prompt tokens (random dataset).")] = 64,
    output_len: Annotated[int, typer.Option(help="Output tokens (max_tokens).")] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="Fixed-length output (vLLM, ragline).")] = True,
    cache: Annotated[
        bool, typer.Option(help="Let ragline's response cache answer (default: bypass it).")
    ] = False,
    adapters: Annotated[str | None, typer.Option(help="Models assigned round-robin.")] = None,
    goals: Annotated[
        str,
        typer.Option(
            help="Goals to judge by: gpu (TTFT <= 200 ms, >= 100 tok/s per stream), cpu "
            "(TTFT <= 1000 ms, >= 10 tok/s per stream), or auto: cpu when the server's /ready "
            "reports its model on CPU, else gpu."
        ),
    ] = "auto",
    slo_ttft_ms: Annotated[
        float | None, typer.Option(help="Goal: TTFT p50 at most (ms); overrides --goals.")
    ] = None,
    slo_tpot_ms: Annotated[
        float | None,
        typer.Option(help="Goal: TPOT p50 at most (ms; 10 = 100 tok/s); overrides --goals."),
    ] = None,
    out: Out = Path("bench-results/run"),
    gate: Annotated[bool, typer.Option(help="Exit 1 when a point misses the goals.")] = False,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going",
            help="Run every request even when some fail (default: the first failure stops "
            "the run with its status and body). Failed requests exit 1 either way.",
        ),
    ] = False,
) -> None:
    """Load-test one server; sweep concurrencies or rates; JSON + HTML report.

    Exit status: 1 when a request failed (or, with --gate, a point missed a goal)."""
    target, why = choose_goals(goals, url, api_key)
    base = GOALS[target]
    slo = SLO(
        slo_ttft_ms if slo_ttft_ms is not None else base.ttft_ms,
        slo_tpot_ms if slo_tpot_ms is not None else base.tpot_ms,
    )
    console.print(f"goals: {target} ({why})")
    spec = LoadSpec(
        base_url=url,
        model=model,
        api_key=api_key,
        endpoint=endpoint,
        stream=stream,
        burstiness=burstiness,
        num_requests=requests,
        warmup=warmup,
        max_seconds=max_seconds,
        ignore_eos=ignore_eos,
        adapters=[a for a in (adapters or "").split(",") if a],
        headers={} if cache else {"Cache-Control": "no-cache"},
    )
    prompts = load_prompts(dataset, requests, input_len, output_len, _default_model_dir())
    settings = {
        "url": url,
        "model": model,
        "endpoint": endpoint,
        "stream": stream,
        "dataset": dataset,
        "input_len": input_len,
        "output_len": output_len,
        "requests": requests,
        "concurrency": concurrency,
        "rate": rate,
        "goals": f"{target} ({why})",
    }
    ok, failed = execute(
        spec,
        prompts,
        _ints(concurrency),
        _floats(rate),
        slo,
        out,
        f"ragline bench: {model} at {url}",
        settings,
        keep_going,
    )
    if failed:
        console.print(f"[red]error:[/] {failed} request(s) failed; see the table and the report")
        raise typer.Exit(1)
    if gate and not ok:
        raise typer.Exit(1)


@app.command("overhead")
def overhead_cmd(
    direct: Annotated[str, typer.Option(help="The upstream's /v1 URL.")],
    gateway: Annotated[str, typer.Option(help="The gateway's /v1 URL in front of it.")],
    model: Model = "smollm2",
    api_key: ApiKey = None,
    concurrency: Annotated[str, typer.Option(help="Streams in flight; a list: 1,8")] = "1,8",
    requests: Annotated[int, typer.Option(help="Requests per round and side.")] = 16,
    rounds: Annotated[int, typer.Option(help="Interleaved direct/gateway rounds.")] = 3,
    output_len: int = 64,
    input_len: int = 32,
    max_rate_requests: Annotated[int, typer.Option(help="0 skips the max req/s test.")] = 2000,
    max_rate_connections: int = 16,
    out: Out = Path("bench-results/overhead"),
) -> None:
    """Same load direct vs through the gateway, interleaved; prints the deltas."""
    prompts = load_prompts("random", requests, input_len, output_len, _default_model_dir())
    results: dict[str, Any] = {
        "settings": {
            "direct": direct,
            "gateway": gateway,
            "model": model,
            "requests": requests,
            "rounds": rounds,
        }
    }
    table = Table(title=f"gateway overhead ({gateway} vs {direct})")
    for col in (
        "streams",
        "TTFT p50 Δms",
        "TTFT p99 Δms",
        "E2E p50 Δms",
        "ITL p50 Δms",
        "ITL p99 Δms",
        "tok/s gateway/direct",
        "direct tok/s",
        "gateway tok/s",
    ):
        table.add_column(col, justify="right")
    for c in _ints(concurrency):
        base = LoadSpec(
            base_url=direct,
            model=model,
            api_key=None,
            concurrency=c,
            num_requests=requests,
            warmup=c,
        )
        via = replace(base, base_url=gateway, api_key=api_key)
        res = asyncio.run(overhead_mod.compare(base, via, prompts, rounds, SLO()))
        d = res["deltas"]
        table.add_row(
            str(c),
            f"{d['delta_median_ttft_ms']:+.2f}",
            f"{d['delta_p99_ttft_ms']:+.2f}",
            f"{d['delta_median_e2el_ms']:+.2f}",
            f"{d['delta_median_itl_ms']:+.2f}",
            f"{d['delta_p99_itl_ms']:+.2f}",
            f"{d['output_throughput_ratio']:.3f}",
            f"{res['direct']['output_throughput']:.1f}",
            f"{res['gateway']['output_throughput']:.1f}",
        )
        results[f"concurrency_{c}"] = {k: res[k] for k in ("direct", "gateway", "deltas")}
    console.print(table)
    if max_rate_requests:
        base = LoadSpec(base_url=direct, model=model)
        via = replace(base, base_url=gateway, api_key=api_key)
        best = asyncio.run(
            overhead_mod.max_request_rate(
                base, via, max_rate_requests, max_rate_connections, rounds=2
            )
        )
        console.print(
            f"max non-streaming req/s at {max_rate_connections} connections: "
            f"direct {best['direct']:.0f}, gateway {best['gateway']:.0f}"
        )
        results["max_request_rate"] = best
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out / 'overhead.json'}")


SUITES: dict[str, dict[str, Any]] = {
    "chat-short": {"dataset": "random", "input_len": 64, "output_len": 64, "concurrency": "1,4,8"},
    "chat-long": {"dataset": "random", "input_len": 1024, "output_len": 256, "concurrency": "1,4"},
    "rag": {"dataset": "scifact", "input_len": 0, "output_len": 64, "concurrency": "1,4"},
    "lora-mix": {"dataset": "random", "input_len": 64, "output_len": 64, "concurrency": "4,8"},
}


@app.command("suite")
def suite_cmd(
    name: Annotated[str, typer.Argument(help="chat-short, chat-long, rag, lora-mix or overhead")],
    url: Url = "http://127.0.0.1:8000/v1",
    model: Model = "smollm2",
    api_key: ApiKey = None,
    adapters: Annotated[str | None, typer.Option(help="For lora-mix.")] = None,
    direct: Annotated[str | None, typer.Option(help="For overhead: the upstream URL.")] = None,
    requests: int = 16,
    out: Out = Path("bench-results"),
    gate: bool = False,
) -> None:
    """A named scenario against the embedded engine, a local vLLM or any URL."""
    if name == "overhead":
        if direct is None:
            raise typer.BadParameter("the overhead suite needs --direct (the upstream URL)")
        overhead_cmd(
            direct=direct,
            gateway=url,
            model=model,
            api_key=api_key,
            concurrency="1,8",
            requests=requests,
            rounds=3,
            output_len=64,
            input_len=32,
            max_rate_requests=2000,
            max_rate_connections=16,
            out=out / name,
        )
        return
    if name not in SUITES:
        raise typer.BadParameter(f"unknown suite {name!r}: {', '.join([*SUITES, 'overhead'])}")
    if name == "lora-mix" and not adapters:
        raise typer.BadParameter("lora-mix needs --adapters a,b,...")
    s = SUITES[name]
    run_cmd(
        url=url,
        model=model,
        api_key=api_key,
        endpoint="chat",
        stream=True,
        concurrency=s["concurrency"],
        rate=None,
        burstiness=1.0,
        requests=requests,
        warmup=2,
        max_seconds=900.0,
        dataset=s["dataset"],
        input_len=s["input_len"],
        output_len=s["output_len"],
        ignore_eos=True,
        cache=False,
        adapters=adapters,
        goals="auto",
        slo_ttft_ms=None,
        slo_tpot_ms=None,
        out=out / name,
        gate=gate,
        keep_going=False,
    )


@app.command("retrieval")
def retrieval_cmd(
    data: Annotated[
        Path, typer.Option(help="BEIR directory (default: ../shared/data/scifact).")
    ] = (SHARED_SCIFACT),
    hnsw_vectors: Annotated[
        int,
        typer.Option(
            help="Synthetic 384-d vectors for the HNSW test (0: skip; the README's scale figure "
            "uses 1000000, about 8 minutes here)."
        ),
    ] = 100_000,
    limit_docs: Annotated[int | None, typer.Option(min=1, help="Only the first N docs.")] = None,
    limit_queries: Annotated[int | None, typer.Option(min=1, help="Only N queries.")] = None,
    memory_vectors: Annotated[
        int,
        typer.Option(help="Synthetic vectors per index type for the memory figures (0: skip)."),
    ] = 200_000,
    out: Out = Path("bench-results"),
) -> None:
    """Retrieval: ingestion rate vs sentence-transformers, query latency, nDCG, HNSW at scale,
    memory per million vectors."""
    from benchmarks import rag_bench

    report = rag_bench.run(
        data, out / "retrieval.json", hnsw_vectors, limit_docs, limit_queries, memory_vectors
    )
    table = Table("mode", "nDCG@10", "R@10", "R@100", "MRR@10", "p50 ms", "p99 ms")
    for r in report["retrieval"]:
        lat = r["latency_ms"]
        table.add_row(r["mode"], f"{r['ndcg10']:.4f}", f"{r['recall10']:.4f}",
                      f"{r['recall100']:.4f}", f"{r['mrr10']:.4f}", f"{lat['p50']:.2f}",
                      f"{lat['p99']:.2f}")  # fmt: skip
    console.print(table)
    console.print(
        f"ingestion: {report['ingest_docs_per_s']:.1f} docs/s ({report['chunks']} chunks) vs "
        f"sentence-transformers default {report['baseline_docs_per_s']:.1f} docs/s: "
        f"{report['ingest_ratio']:.2f}x"
    )
    if "hnsw" in report:
        h = report["hnsw"]
        console.print(
            f"HNSW, {h['vectors']:,} vectors: build {h['build_s']:.0f}s, search p50 "
            f"{h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms, recall@1 {h['recall_at_1']:.3f}"
        )
    if "memory_mib_per_m_vectors" in report:
        per = report["memory_mib_per_m_vectors"]
        text = report.get("memory_text_mib_per_m_chunks", 0.0)
        console.print(
            "memory per million vectors (vectors + index): "
            + ", ".join(f"{kind} {mib:,.0f} MiB" for kind, mib in per.items())
            + f"; text, chunk table and BM25: {text:,.0f} MiB per million SciFact chunks"
        )
    for name, goal in report["goals"].items():
        mark = "met" if goal["met"] else "NOT met"
        console.print(f"  {name}: {goal['value']:.3f} (goal {goal['goal']}) {mark}")


@app.command("safety")
def safety_cmd(
    data: Annotated[Path, typer.Option(help="BEIR corpus directory for request texts.")] = (
        SHARED_SCIFACT
    ),
    requests: Annotated[int, typer.Option(min=1, help="Requests of 500 tokens.")] = 200,
    out: Out = Path("bench-results"),
) -> None:
    """What the default safety policy adds per 500-token request (safety off adds nothing)."""
    from benchmarks import safety_bench

    report = safety_bench.run(data / "corpus.jsonl", requests, out / "safety.json")
    for label in ("own_embedding", "shared_embedding"):
        r = report[label]
        console.print(f"{label}: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    for name, goal in report["goals"].items():
        mark = "met" if goal["met"] else "NOT met"
        console.print(f"  {name}: {goal['value']:.2f} (goal {goal['goal']}) {mark}")
