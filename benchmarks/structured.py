"""The cost of constrained decoding (structured outputs) on the embedded engine, against
unconstrained decoding in the same run.

    python -m benchmarks.structured [--streams 1,8] [--tokens 96] [--rounds 3]

For each concurrency C: C greedy streams of exactly ``--tokens`` tokens, unconstrained
(``ignore_eos``) and constrained by a JSON schema that cannot end before them (an array of at
least 500 short strings), and a mixed batch (half of each) to show that constrained and free
sequences share a step. Rounds alternate the kinds; the medians are printed with the
milliseconds each constrained token adds and the ratio. Also the schema's first compilation
and a cached one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gateway.backends.base import Chunk, GenerationParams, GenerationRequest, Usage
from gateway.backends.embedded import EmbeddedBackend
from gateway.config import EmbeddedModelConfig, Settings
from gateway.structured import format_key

SCHEMA = {
    "type": "array",
    "items": {"type": "string", "maxLength": 24},
    "minItems": 500,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA}}
PROMPT = "List as many English words about the sea as you can, as a JSON array of strings."


async def _one(backend: EmbeddedBackend, tokens: int, constrained: bool) -> int:
    params = GenerationParams(
        max_tokens=tokens,
        temperature=0.0,
        ignore_eos=not constrained,
        response_format=format_key(FORMAT) if constrained else None,
    )
    request = GenerationRequest(
        request_id="bench",
        model=backend.config.name,
        params=params,
        messages=({"role": "user", "content": PROMPT},),
    )
    count = 0
    async for event in backend.stream(request):
        if isinstance(event, Usage):
            count = event.completion_tokens
        elif isinstance(event, Chunk):
            pass
    return count


async def _batch(backend: EmbeddedBackend, streams: int, tokens: int, kinds: list[bool]) -> float:
    """Milliseconds per decode step (wall time / tokens per stream) for one batch."""
    start = time.perf_counter()
    counts = await asyncio.gather(*(_one(backend, tokens, kinds[i]) for i in range(streams)))
    elapsed = time.perf_counter() - start
    assert all(c == tokens for c in counts), counts  # every stream ran the full length
    return 1000 * elapsed / tokens


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    path = Path(args.model) if args.model else Settings().default_model_path()
    config = EmbeddedModelConfig(name="bench", max_batch=max(args.streams))
    backend = EmbeddedBackend(config, path)
    await backend.start()
    assert backend._grammars is not None
    key = format_key(FORMAT) or ""
    started = time.perf_counter()
    await asyncio.to_thread(backend._grammars.compile, key)
    first_compile = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.to_thread(backend._grammars.compile, key)
    cached_compile = time.perf_counter() - started
    rows: dict[int, dict[str, float]] = {}
    try:
        for streams in args.streams:
            await _batch(backend, streams, 8, [True] * streams)  # warm-up, both kinds
            await _batch(backend, streams, 8, [False] * streams)
            samples: dict[str, list[float]] = {"free": [], "constrained": [], "mixed": []}
            half = [i % 2 == 0 for i in range(streams)]
            for _ in range(args.rounds):
                free = await _batch(backend, streams, args.tokens, [False] * streams)
                samples["free"].append(free)
                samples["constrained"].append(
                    await _batch(backend, streams, args.tokens, [True] * streams)
                )
                if streams > 1:
                    samples["mixed"].append(await _batch(backend, streams, args.tokens, half))
            rows[streams] = {k: statistics.median(v) for k, v in samples.items() if v}
    finally:
        await backend.aclose()
    return {"compile_ms": 1000 * first_compile, "cached_ms": 1000 * cached_compile, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: pulled SmolLM2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(main_async(args))
    rows: dict[int, dict[str, float]] = result["rows"]  # type: ignore[assignment]
    table = Table(
        title=f"constrained decoding on the embedded engine, {args.tokens} tokens per stream, "
        f"median of {args.rounds} interleaved rounds (ms per decode step)"
    )
    for col in ("streams", "free", "constrained", "added per token", "ratio", "mixed (half)"):
        table.add_column(col, justify="right")
    for streams, row in rows.items():
        mixed = row.get("mixed")
        table.add_row(
            str(streams),
            f"{row['free']:.2f}",
            f"{row['constrained']:.2f}",
            f"{row['constrained'] - row['free']:+.2f} ms",
            f"{row['constrained'] / row['free']:.2f}x",
            f"{mixed:.2f}" if mixed is not None else "",
        )
    console = Console()
    console.print(table)
    console.print(
        f"schema compiled in {result['compile_ms']:.1f} ms the first time (with the tokenizer "
        f"table), {result['cached_ms']:.3f} ms from the cache"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
