"""Embedded engine throughput next to plain ``model.generate``, measured in the same run.

    python -m benchmarks.engine [--streams 1,8] [--tokens 128] [--device auto] [--json out.json]

For each concurrency C it runs C requests at once through the embedded backend (the same
scheduler the server uses, minus HTTP), each generating exactly ``--tokens`` tokens at
temperature 0 (``ignore_eos``), and reports aggregate output tokens/s and mean time to first
token. The baseline is transformers' ``model.generate`` on the same checkpoint and dtype with a
static batch of C identical-length prompts. Numbers on a shared machine are noisy: compare the
ratios printed side by side, not absolute values across runs.
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


@dataclass
class Result:
    streams: int
    tokens_per_s: float
    mean_ttft_ms: float
    baseline_tokens_per_s: float


async def _one(backend: EmbeddedBackend, prompt: str, tokens: int) -> tuple[float, float, int]:
    request = GenerationRequest(
        request_id="bench",
        model=backend.config.name,
        params=GenerationParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        messages=({"role": "user", "content": prompt},),
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


async def run_engine(backend: EmbeddedBackend, streams: int, tokens: int) -> tuple[float, float]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    await asyncio.gather(*(_one(backend, p, 8) for p in prompts))  # warm-up
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(backend, p, tokens) for p in prompts))
    elapsed = time.perf_counter() - start
    total = sum(r[2] for r in results)
    return total / elapsed, 1000 * sum(r[0] for r in results) / len(results)


def run_generate(
    model_path: Path, device: torch.device, dtype: torch.dtype, streams: int, tokens: int
) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


async def main_async(args: argparse.Namespace) -> list[Result]:
    settings = Settings()
    path = Path(args.model) if args.model else settings.default_model_path()
    config = EmbeddedModelConfig(
        name="bench", device=args.device, dtype=args.dtype, max_batch=max(args.streams)
    )
    backend = EmbeddedBackend(config, path)
    await backend.start()
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    results = []
    try:
        for streams in args.streams:
            tps, ttft = await run_engine(backend, streams, args.tokens)
            base = await asyncio.to_thread(run_generate, path, device, dtype, streams, args.tokens)
            results.append(Result(streams, tps, ttft, base))
    finally:
        await backend.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: pulled SmolLM2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = asyncio.run(main_async(args))
    device = choose_device(args.device)
    env = {
        "device": torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": str(choose_dtype(args.dtype, device)).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    table = Table(title=f"embedded engine, {args.tokens} output tokens/stream, {env}")
    for col in ("streams", "engine tok/s", "mean TTFT ms", "generate() tok/s", "engine/generate"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r.streams),
            f"{r.tokens_per_s:.1f}",
            f"{r.mean_ttft_ms:.0f}",
            f"{r.baseline_tokens_per_s:.1f}",
            f"{r.tokens_per_s / r.baseline_tokens_per_s:.2f}x",
        )
    console = Console()
    console.print(table)
    by = {r.streams: r for r in results}
    if 1 in by and len(by) > 1:
        for r in results:
            if r.streams > 1:
                console.print(
                    f"scaling {r.streams} streams / 1 stream: engine "
                    f"{r.tokens_per_s / by[1].tokens_per_s:.2f}x, generate() "
                    f"{r.baseline_tokens_per_s / by[1].baseline_tokens_per_s:.2f}x"
                )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"env": env, "tokens": args.tokens, "results": [r.__dict__ for r in results]},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
