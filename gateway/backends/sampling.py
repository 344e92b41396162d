"""Per-sequence sampling: penalties, logit bias, temperature, top-p, seeds and log-probabilities.

Semantics follow OpenAI's documentation (and vLLM's implementation of it):
- ``presence_penalty`` and ``frequency_penalty`` act on tokens this sequence generated;
- ``logit_bias`` is added to the logits before sampling;
- ``temperature == 0`` is greedy; ``top_p`` keeps the smallest set of tokens whose probability
  mass reaches ``top_p``;
- a ``seed`` makes sampling repeatable: each choice ``i`` of a request samples from its own
  generator seeded with ``seed + i``;
- log-probabilities are those of the model's own distribution (before penalties, bias and
  temperature), as vLLM reports them by default;
- a ``grammar`` (structured output) masks the logits to the tokens it allows next, after
  penalties and bias and before temperature and top-p.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from gateway.backends.base import GenerationParams
from gateway.backends.grammar import Grammar


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sampler:
    """Sampling state of one sequence."""

    def __init__(
        self,
        params: GenerationParams,
        *,
        index: int,
        eos_ids: frozenset[int],
        grammar: Grammar | None = None,
    ) -> None:
        self.params = params
        self.eos_ids = eos_ids
        # structured output: the grammar's parser state for this sequence
        self.matcher = grammar.matcher() if grammar is not None else None
        seed = params.seed + index if params.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: dict[int, int] = {}
        self.generated = 0

    @property
    def greedy_plain(self) -> bool:
        """True when the choice is a plain argmax of the raw logits (the fast path)."""
        p = self.params
        return (
            p.temperature == 0.0
            and not p.presence_penalty
            and not p.frequency_penalty
            and not p.logit_bias
            and not self._eos_masked()
            and self.matcher is None
        )

    def _eos_masked(self) -> bool:
        return self.params.ignore_eos or self.generated < self.params.min_tokens

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)
            logits.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias]))
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype)
            logits.index_add_(0, ids, -(p.frequency_penalty * counts + p.presence_penalty))
        if self._eos_masked():
            logits[list(self.eos_ids)] = float("-inf")
        if self.matcher is not None:
            self.matcher.mask(logits)
        return logits

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from one row of raw float32 logits (modified in place)."""
        p = self.params
        logits = self._process(logits)
        if p.temperature == 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            # keep tokens until the mass *before* them reaches top_p (always keeps the first)
            keep = (cumulative - sorted_probs) < p.top_p
            sorted_probs = sorted_probs * keep
            pick = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[pick])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def record(self, token_id: int) -> None:
        if self.matcher is not None:
            self.matcher.consume(token_id)
        self.generated += 1
        self.counts[token_id] = self.counts.get(token_id, 0) + 1


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[TokenChoice]:
    """Choose one token per row of ``logits`` ``[n, vocab]`` (float32) for ``samplers[i]``."""
    want_logprobs = any(s.params.logprobs for s in samplers)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if all(s.greedy_plain for s in samplers):
        ids = logits.argmax(dim=-1).tolist()
    else:
        ids = [
            # sampling runs on the CPU: per-request generators live there, and one row is small
            int(logits[i].argmax()) if s.greedy_plain else s.choose(logits[i].to("cpu", copy=True))
            for i, s in enumerate(samplers)
        ]
    choices = []
    for i, (s, token_id) in enumerate(zip(samplers, ids, strict=True)):
        s.record(token_id)
        choice = TokenChoice(token_id)
        if logprobs is not None and s.params.logprobs:
            row = logprobs[i]
            choice.logprob = float(row[token_id])
            if s.params.top_logprobs:
                values, indices = row.topk(s.params.top_logprobs)
                choice.top = list(zip(indices.tolist(), values.tolist(), strict=True))
        choices.append(choice)
    return choices
