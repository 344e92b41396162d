"""``ragline bench safety``: what the default safety policy adds to a request of 500 tokens.

For each request text (SciFact abstracts cut to 500 MiniLM tokens, a realistic long user
message), the default policy's input scanners run once with the embedding computed by the
injection classifier itself (nothing else embedded the text) and once with it shared (retrieval
or few-shot selection already embedded it: the embedder's LRU). The injection scanner's char-only
gate lets most ordinary texts through without an embedding; ``embedded`` is the share it sent on.
Safety off adds nothing to the request path, so these times are the overhead. Goal (issue 5):
p50 <= 5 ms, p99 <= 20 ms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

GOALS = {"p50_ms": 5.0, "p99_ms": 20.0}


def request_texts(corpus: Path, n: int, tokens: int = 500) -> list[str]:
    from transformers import AutoTokenizer

    from rag.embeddings import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    with open(corpus) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    texts = []
    for row in rows:
        body = f"Please explain this abstract to me. {row['title']}. {row['text']} " * 3
        ids = tokenizer.encode(body, add_special_tokens=False)[:tokens]
        texts.append(str(tokenizer.decode(ids)))
    return texts


def run(corpus: Path, n: int, out: Path | None) -> dict[str, Any]:
    from rag.embeddings import SentenceTransformerEmbedder
    from safety.base import ScanContext
    from safety.policy import build_policy, default_policy

    embedder = SentenceTransformerEmbedder()
    policy = build_policy(default_policy(), {"embedder": embedder})
    texts = request_texts(corpus, n)
    report: dict[str, Any] = {"requests": len(texts), "tokens": 500}
    injection = next(s for spec, s in policy.scanners if spec.type == "injection")
    gate = injection.model.gate(texts)  # type: ignore[attr-defined]
    # the share of requests the char-only gate sends on to the embedding classifier
    report["embedded"] = float((gate >= injection.model.gate_below).mean())  # type: ignore[attr-defined]
    for label, shared in (("own_embedding", False), ("shared_embedding", True)):
        times = []
        for text in texts:
            embedder.clear_cache()
            if shared:
                embedder.embed_one(text)  # as retrieval would have, before safety runs
            started = time.perf_counter()
            policy.run(text, ScanContext("input"))
            times.append((time.perf_counter() - started) * 1000)
        p50, p99 = np.percentile(times, [50, 99])
        report[label] = {"p50_ms": float(p50), "p99_ms": float(p99)}
    report["goals"] = {
        k: {"goal": g, "value": report["own_embedding"][k], "met": report["own_embedding"][k] <= g}
        for k, g in GOALS.items()
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report
